//! The KServe v2 HTTP body: JSON, or JSON followed by binary tensor data (Triton's binary
//! tensor data extension), or a raw binary body for a single input. Decoding names the
//! field at fault; encoding puts outputs in the binary section when asked.

use bytes::Bytes;
use serde_json::{Map, Value, json};

use super::json::{self, JsonRequest};
use crate::serving::prepare::ModelInterface;
use crate::serving::{
    ApiError, DataType, InferInput, InferRequest, InferResponse, InputData, ParamValue, RequestedOutput,
};

/// The header carrying the JSON part's length in a binary body.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// Decodes a request body. `header_length` is the `Inference-Header-Content-Length`
/// header's value (`None` when absent: all JSON). `model` gives the raw body's meaning and
/// bounds what the JSON may hold.
pub fn decode_request(
    body: Bytes,
    header_length: Option<usize>,
    model: &ModelInterface,
) -> Result<InferRequest, ApiError> {
    let bad = |m: String| ApiError::BadRequest(m);
    match header_length {
        Some(0) => Ok(raw_request(body, model)),
        Some(n) if n > body.len() => Err(bad(format!(
            "header `Inference-Header-Content-Length` is {n}, but the body has only {} bytes",
            body.len()
        ))),
        Some(n) => {
            let binary = body.slice(n..);
            let req = from_json(json::decode(&body[..n], model)?, binary, model)?;
            Ok(all_outputs_binary(req, model))
        }
        None => Ok(all_outputs_binary(from_json(json::decode(&body, model)?, Bytes::new(), model)?, model)),
    }
}

/// `binary_data_output: true` with no outputs listed: every output, in binary.
fn all_outputs_binary(mut req: InferRequest, model: &ModelInterface) -> InferRequest {
    if req.outputs.is_empty()
        && matches!(req.parameters.get("binary_data_output"), Some(ParamValue::Bool(true)))
    {
        req.outputs = model
            .outputs()
            .into_iter()
            .map(|(name, _, _)| RequestedOutput { name, binary: Some(true), classification: None })
            .collect();
    }
    req
}

/// A raw binary body: the one input's data, batch 1; every output comes back binary.
fn raw_request(body: Bytes, model: &ModelInterface) -> InferRequest {
    let (shape, data) = match model.input_datatype {
        DataType::Bytes => (vec![1, 1], InputData::Bytes(vec![body.to_vec()])),
        _ => (std::iter::once(1).chain(model.dims).collect(), InputData::Raw(body)),
    };
    InferRequest {
        model: model.name.clone(),
        inputs: vec![InferInput {
            name: model.input_name.clone(),
            datatype: model.input_datatype.name().into(),
            shape,
            data,
        }],
        outputs: model
            .outputs()
            .into_iter()
            .map(|(name, _, _)| RequestedOutput { name, binary: Some(true), classification: None })
            .collect(),
        ..Default::default()
    }
}

/// The request the JSON part describes, with each input's binary data cut from `binary` in
/// order.
fn from_json(json: JsonRequest, mut binary: Bytes, model: &ModelInterface) -> Result<InferRequest, ApiError> {
    let bad = |m: String| ApiError::BadRequest(m);
    let mut req = InferRequest { id: json.id, parameters: json.parameters, ..Default::default() };
    let binary_output = matches!(req.parameters.get("binary_data_output"), Some(ParamValue::Bool(true)));
    for input in json.inputs {
        let field = format!("input `{}`", input.name);
        let data = match (input.parameters.get("binary_data_size"), input.data) {
            (Some(ParamValue::Int(size)), None) if *size >= 0 => {
                let size = *size as usize;
                if size > binary.len() {
                    return Err(bad(format!(
                        "{field}: binary_data_size is {size}, but only {} bytes of binary data remain",
                        binary.len()
                    )));
                }
                let data = binary.split_to(size);
                if input.datatype == DataType::Bytes.name() && model.input_datatype != DataType::Bytes {
                    return Err(bad(format!(
                        "{field}: datatype BYTES given, the model expects {}",
                        model.input_datatype.name()
                    )));
                }
                InputData::Raw(data)
            }
            (Some(ParamValue::Int(_)), Some(_)) => {
                return Err(bad(format!("{field}: has both `data` and binary_data_size")));
            }
            (Some(other), _) => {
                return Err(bad(format!(
                    "{field}: binary_data_size must be a non-negative integer, got {other:?}"
                )));
            }
            (None, Some(data)) => data,
            (None, None) => return Err(bad(format!("{field}: no `data` and no binary_data_size"))),
        };
        req.inputs.push(InferInput { name: input.name, datatype: input.datatype, shape: input.shape, data });
    }
    if !binary.is_empty() {
        return Err(bad(format!(
            "{} bytes of binary data are not claimed by any input's binary_data_size",
            binary.len()
        )));
    }
    for o in json.outputs {
        let name = o.name;
        let binary = match o.parameters.get("binary_data") {
            Some(ParamValue::Bool(b)) => Some(*b),
            Some(other) => {
                return Err(bad(format!("output `{name}`: binary_data must be a boolean, got {other:?}")));
            }
            None => binary_output.then_some(true),
        };
        let classification = match o.parameters.get("classification") {
            Some(ParamValue::Int(k)) if *k > 0 => Some(*k as usize),
            Some(other) => {
                return Err(bad(format!(
                    "output `{name}`: classification must be a positive integer, got {other:?}"
                )));
            }
            None => None,
        };
        req.outputs.push(RequestedOutput { name, binary, classification });
    }
    Ok(req)
}

fn param_json(p: &ParamValue) -> Value {
    match p {
        ParamValue::Bool(b) => json!(b),
        ParamValue::Int(i) => json!(i),
        ParamValue::Double(d) => json!(d),
        ParamValue::Str(s) => json!(s),
    }
}

/// Encodes a response: `(body, json_length)`; `json_length` is `Some` when outputs follow
/// in a binary section.
pub fn encode_response(resp: &InferResponse) -> (Vec<u8>, Option<usize>) {
    let mut binary = Vec::new();
    let outputs: Vec<Value> = resp
        .outputs
        .iter()
        .map(|o| {
            let mut t = json!({
                "name": o.name,
                "datatype": o.data.datatype().name(),
                "shape": o.shape,
            });
            if o.binary {
                let raw = o.data.to_raw();
                t["parameters"] = json!({ "binary_data_size": raw.len() });
                binary.extend(raw);
            } else {
                t["data"] = match &o.data {
                    crate::serving::OutputData::F32(v) => json!(v),
                    crate::serving::OutputData::I64(v) => json!(v),
                    crate::serving::OutputData::I32(v) => json!(v),
                    crate::serving::OutputData::Bytes(v) => {
                        json!(v.iter().map(|b| String::from_utf8_lossy(b).into_owned()).collect::<Vec<_>>())
                    }
                };
            }
            t
        })
        .collect();
    let params: Map<String, Value> =
        resp.parameters.iter().map(|(k, v)| (k.clone(), param_json(v))).collect();
    let mut body = json!({
        "model_name": resp.model_name,
        "model_version": resp.model_version,
        "parameters": params,
        "outputs": outputs,
    });
    if let Some(id) = &resp.id {
        body["id"] = json!(id);
    }
    let mut bytes = serde_json::to_vec(&body).unwrap_or_default();
    if resp.outputs.iter().any(|o| o.binary) {
        let n = bytes.len();
        bytes.extend(binary);
        (bytes, Some(n))
    } else {
        (bytes, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serving::limits::ModelLimits;
    use crate::serving::{InferOutput, OutputData, Parameters};

    fn model() -> ModelInterface {
        ModelInterface {
            name: "m".into(),
            version: "1".into(),
            input_name: "input".into(),
            input_datatype: DataType::Fp32,
            dims: [1, 1, 2],
            image: None,
            output_name: "logits".into(),
            labels: vec!["a".into(), "b".into()],
            max_batch_size: 4,
            limits: ModelLimits {
                max_items: 4,
                item_values: 2,
                max_image_bytes: 0,
                max_image_pixels: 0,
                max_body_bytes: 1 << 20,
            },
        }
    }

    #[test]
    fn json_binary_and_raw_bodies_decode() {
        let body = br#"{"inputs":[{"name":"input","datatype":"FP32","shape":[1,1,1,2],"data":[[1,2.5]]}]}"#;
        let req = decode_request(Bytes::from_static(body), None, &model()).unwrap();
        assert_eq!(req.inputs[0].data, InputData::F32(vec![1.0, 2.5]));

        let json = br#"{"inputs":[{"name":"input","datatype":"FP32","shape":[1,1,1,2],"parameters":{"binary_data_size":8}}],"outputs":[{"name":"logits","parameters":{"binary_data":true}}]}"#;
        let mut body = json.to_vec();
        body.extend(1f32.to_le_bytes());
        body.extend(2f32.to_le_bytes());
        let req = decode_request(Bytes::from(body), Some(json.len()), &model()).unwrap();
        assert!(matches!(&req.inputs[0].data, InputData::Raw(b) if b.len() == 8));
        assert_eq!(req.outputs[0].binary, Some(true));

        let req = decode_request(Bytes::from(vec![0u8; 8]), Some(0), &model()).unwrap();
        assert_eq!(req.inputs[0].shape, vec![1, 1, 1, 2]);
        assert!(req.outputs.iter().all(|o| o.binary == Some(true)));
    }

    #[test]
    fn malformed_bodies_name_the_problem() {
        let err = |body: &[u8], h: Option<usize>| {
            decode_request(Bytes::copy_from_slice(body), h, &model()).unwrap_err().to_string()
        };
        assert!(err(b"{not json", None).contains("malformed JSON"));
        assert!(err(b"[]", None).contains("JSON object"));
        assert!(err(br#"{"inputs":[{"name":"input","datatype":"FP32"}]}"#, None).contains("missing `shape`"));
        assert!(
            err(br#"{"inputs":[{"name":"input","datatype":"FP32","shape":[1,1,1,2],"data":["x",1]}]}"#, None)
                .contains("element 0")
        );
        let json = br#"{"inputs":[{"name":"input","datatype":"FP32","shape":[1,1,1,2],"parameters":{"binary_data_size":8}}]}"#;
        let mut body = json.to_vec();
        body.extend([0u8; 4]);
        assert!(err(&body, Some(json.len())).contains("only 4 bytes"));
        assert!(err(b"{}", Some(10)).contains("only 2 bytes"));
    }

    #[test]
    fn tensor_data_is_bounded_before_it_is_stored() {
        let decode = |body: &str| decode_request(Bytes::from(body.to_string()), None, &model());
        // Shape first: the declared count bounds the data.
        let e = decode(r#"{"inputs":[{"name":"input","datatype":"FP32","shape":[1,1,1,2],"data":[1,2,3]}]}"#);
        assert!(
            matches!(e, Err(ApiError::BadRequest(m)) if m.contains("more data elements than the shape's 2"))
        );
        // Data first: the model's largest request (4 × 2 values) bounds it.
        let many = ["0"; 9].join(",");
        let e = decode(&format!(
            r#"{{"inputs":[{{"data":[{many}],"name":"input","datatype":"FP32","shape":[1,1,1,2]}}]}}"#
        ));
        assert!(matches!(e, Err(ApiError::PayloadTooLarge(m)) if m.contains("more than 8 data elements")));
        // Datatype and shape are checked before any data is read.
        let e = decode(r#"{"inputs":[{"name":"input","datatype":"INT64","shape":[1,1,1,2],"data":[1,2]}]}"#);
        assert!(matches!(e, Err(ApiError::BadRequest(m)) if m.contains("datatype INT64 given")));
        let e = decode(r#"{"inputs":[{"name":"input","datatype":"FP32","shape":[9,1,1,2],"data":[1,2]}]}"#);
        assert!(matches!(e, Err(ApiError::BadRequest(m)) if m.contains("max_batch_size 4")));
        let e = decode(
            r#"{"inputs":[{"name":"input","datatype":"FP32","shape":[1,1,1,2],"data":[[[[[[[[[[1]]]]]]]]]]}]}"#,
        );
        assert!(matches!(e, Err(ApiError::BadRequest(m)) if m.contains("nested")));
        let e = decode(
            r#"{"inputs":[{"name":"input","datatype":"FP32","shape":[1,1,1,2],"data":[1,2]},{"name":"b"}]}"#,
        );
        assert!(matches!(e, Err(ApiError::BadRequest(m)) if m.contains("takes one input")));
    }

    #[test]
    fn responses_put_binary_outputs_after_the_json() {
        let resp = InferResponse {
            model_name: "m".into(),
            model_version: "1".into(),
            id: Some("r1".into()),
            parameters: Parameters::new(),
            outputs: vec![
                InferOutput {
                    name: "a".into(),
                    shape: vec![1, 1],
                    data: OutputData::F32(vec![1.5]),
                    binary: true,
                },
                InferOutput {
                    name: "b".into(),
                    shape: vec![1, 1],
                    data: OutputData::I64(vec![7]),
                    binary: false,
                },
            ],
        };
        let (body, n) = encode_response(&resp);
        let n = n.unwrap();
        let v: Value = serde_json::from_slice(&body[..n]).unwrap();
        assert_eq!(v["outputs"][0]["parameters"]["binary_data_size"], 4);
        assert_eq!(v["outputs"][1]["data"], json!([7]));
        assert_eq!(&body[n..], &1.5f32.to_le_bytes());
    }
}
