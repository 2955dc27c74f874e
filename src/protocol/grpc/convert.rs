//! Protobuf messages ⇄ the protocol's plain data.

use super::pb;
use super::pb::infer_parameter::ParameterChoice;
use crate::serving::prepare::{ModelInterface, check_input_header};
use crate::serving::{
    ApiError, DataType, InferInput, InferRequest, InferResponse, InputData, ParamValue, Parameters,
    RequestedOutput,
};

fn param(p: &pb::InferParameter) -> Option<ParamValue> {
    Some(match p.parameter_choice.as_ref()? {
        ParameterChoice::BoolParam(b) => ParamValue::Bool(*b),
        ParameterChoice::Int64Param(i) => ParamValue::Int(*i),
        ParameterChoice::Uint64Param(u) => ParamValue::Int(i64::try_from(*u).unwrap_or(i64::MAX)),
        ParameterChoice::DoubleParam(d) => ParamValue::Double(*d),
        ParameterChoice::StringParam(s) => ParamValue::Str(s.clone()),
    })
}

fn params(map: &std::collections::HashMap<String, pb::InferParameter>) -> Parameters {
    map.iter().filter_map(|(k, v)| param(v).map(|v| (k.clone(), v))).collect()
}

fn to_pb(p: &ParamValue) -> pb::InferParameter {
    let choice = match p {
        ParamValue::Bool(b) => ParameterChoice::BoolParam(*b),
        ParamValue::Int(i) => ParameterChoice::Int64Param(*i),
        ParamValue::Double(d) => ParameterChoice::DoubleParam(*d),
        ParamValue::Str(s) => ParameterChoice::StringParam(s.clone()),
    };
    pb::InferParameter { parameter_choice: Some(choice) }
}

/// A `ModelInferRequest` to `model` as plain data; raw contents (one per input) win over
/// typed ones. Each input's name, datatype and shape are checked before its contents are
/// touched, and typed contents are moved, never widened or copied.
pub fn request(msg: pb::ModelInferRequest, model: &ModelInterface) -> Result<InferRequest, ApiError> {
    let bad = |m: String| ApiError::BadRequest(m);
    let raw = msg.raw_input_contents;
    if !raw.is_empty() && raw.len() != msg.inputs.len() {
        return Err(bad(format!(
            "raw_input_contents has {} entries for {} inputs (one per input, in order)",
            raw.len(),
            msg.inputs.len()
        )));
    }
    if msg.inputs.len() > 1 {
        return Err(bad(format!(
            "model `{}` takes one input (`{}`); the request has {}",
            model.name,
            model.input_name,
            msg.inputs.len()
        )));
    }
    let mut raw = raw.into_iter();
    let mut inputs = Vec::with_capacity(msg.inputs.len());
    for t in msg.inputs {
        check_input_header(model, &t.name, &t.datatype, &t.shape)?;
        let field = format!("input `{}`", t.name);
        let data = match (raw.next(), t.contents) {
            (Some(_), Some(_)) => {
                return Err(bad(format!("{field}: both contents and raw_input_contents are set")));
            }
            (Some(bytes), None) => InputData::Raw(bytes.into()),
            (None, Some(c)) => typed(c, model.input_datatype, &field)?,
            (None, None) => {
                return Err(bad(format!("{field}: no contents and no raw_input_contents")));
            }
        };
        inputs.push(InferInput { name: t.name, datatype: t.datatype, shape: t.shape, data });
    }
    let outputs = msg
        .outputs
        .into_iter()
        .map(|o| {
            let p = params(&o.parameters);
            let classification = match p.get("classification") {
                Some(ParamValue::Int(k)) if *k > 0 => Some(*k as usize),
                Some(other) => {
                    return Err(ApiError::BadRequest(format!(
                        "output `{}`: classification must be a positive integer, got {other:?}",
                        o.name
                    )));
                }
                None => None,
            };
            Ok(RequestedOutput { name: o.name, binary: None, classification })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(InferRequest {
        model: msg.model_name,
        version: (!msg.model_version.is_empty()).then_some(msg.model_version),
        id: (!msg.id.is_empty()).then_some(msg.id),
        parameters: params(&msg.parameters),
        inputs,
        outputs,
        timeout: None,
    })
}

/// Typed contents for an input of `datatype` (already checked against the model): the one
/// matching field, moved out of the message.
fn typed(c: pb::InferTensorContents, datatype: DataType, field: &str) -> Result<InputData, ApiError> {
    let others = [
        ("bool_contents", c.bool_contents.len()),
        ("int_contents", c.int_contents.len()),
        ("int64_contents", c.int64_contents.len()),
        ("uint_contents", c.uint_contents.len()),
        ("uint64_contents", c.uint64_contents.len()),
        ("fp64_contents", c.fp64_contents.len()),
        ("fp32_contents", c.fp32_contents.len()),
        ("bytes_contents", c.bytes_contents.len()),
    ];
    let wanted = match datatype {
        DataType::Bytes => "bytes_contents",
        _ => "fp32_contents",
    };
    if let Some((name, _)) = others.iter().find(|(name, n)| *n > 0 && *name != wanted) {
        return Err(ApiError::BadRequest(format!(
            "{field}: {name} given for a {} tensor (use {wanted})",
            datatype.name()
        )));
    }
    Ok(match datatype {
        DataType::Bytes => InputData::Bytes(c.bytes_contents),
        _ => InputData::F32(c.fp32_contents),
    })
}

/// A response as a `ModelInferResponse`, every output in `raw_output_contents`.
pub fn response(resp: InferResponse) -> pb::ModelInferResponse {
    let mut raw = Vec::with_capacity(resp.outputs.len());
    let outputs = resp
        .outputs
        .into_iter()
        .map(|o| {
            raw.push(o.data.to_raw());
            pb::model_infer_response::InferOutputTensor {
                name: o.name,
                datatype: o.data.datatype().name().into(),
                shape: o.shape,
                parameters: Default::default(),
                contents: None,
            }
        })
        .collect();
    pb::ModelInferResponse {
        model_name: resp.model_name,
        model_version: resp.model_version,
        id: resp.id.unwrap_or_default(),
        parameters: resp.parameters.iter().map(|(k, v)| (k.clone(), to_pb(v))).collect(),
        outputs,
        raw_output_contents: raw,
    }
}

/// Triton's config datatype enum.
pub fn config_datatype(d: DataType) -> pb::DataType {
    use DataType as D;
    match d {
        D::Bool => pb::DataType::TypeBool,
        D::Uint8 => pb::DataType::TypeUint8,
        D::Uint16 => pb::DataType::TypeUint16,
        D::Uint32 => pb::DataType::TypeUint32,
        D::Uint64 => pb::DataType::TypeUint64,
        D::Int8 => pb::DataType::TypeInt8,
        D::Int16 => pb::DataType::TypeInt16,
        D::Int32 => pb::DataType::TypeInt32,
        D::Int64 => pb::DataType::TypeInt64,
        D::Fp16 => pb::DataType::TypeFp16,
        D::Fp32 => pb::DataType::TypeFp32,
        D::Fp64 => pb::DataType::TypeFp64,
        D::Bf16 => pb::DataType::TypeBf16,
        D::Bytes => pb::DataType::TypeString,
    }
}
