//! The KServe v2 HTTP body: JSON, or JSON followed by binary tensor data (Triton's binary
//! tensor data extension), or a raw binary body for a single input. Decoding names the
//! field at fault; encoding puts outputs in the binary section when asked.

use bytes::Bytes;
use serde_json::{Map, Value, json};

use crate::protocol::prepare::ModelInterface;
use crate::protocol::{
    ApiError, DataType, InferInput, InferRequest, InferResponse, InputData, ParamValue, Parameters,
    RequestedOutput,
};

/// The header carrying the JSON part's length in a binary body.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// Decodes a request body. `header_length` is the `Inference-Header-Content-Length`
/// header's value (`None` when absent: all JSON). `model` gives the raw body's meaning.
pub fn decode_request(
    body: Bytes,
    header_length: Option<usize>,
    model: &ModelInterface,
) -> Result<(InferRequest, bool), ApiError> {
    let bad = |m: String| ApiError::BadRequest(m);
    match header_length {
        Some(0) => Ok((raw_request(body, model), true)),
        Some(n) if n > body.len() => Err(bad(format!(
            "header `Inference-Header-Content-Length` is {n}, but the body has only {} bytes",
            body.len()
        ))),
        Some(n) => {
            let binary = body.slice(n..);
            let req = parse_json(&body[..n], binary)?;
            Ok((all_outputs_binary(req, model), false))
        }
        None => Ok((all_outputs_binary(parse_json(&body, Bytes::new())?, model), false)),
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

fn parse_json(json: &[u8], mut binary: Bytes) -> Result<InferRequest, ApiError> {
    let bad = |m: String| ApiError::BadRequest(m);
    let value: Value =
        serde_json::from_slice(json).map_err(|e| bad(format!("malformed JSON request: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(bad("the request must be a JSON object".into()));
    };
    let mut req = InferRequest { id: opt_str(&obj, "id", "id")?, ..Default::default() };
    req.parameters = parameters(obj.get("parameters"), "parameters")?;
    let binary_output = matches!(req.parameters.get("binary_data_output"), Some(ParamValue::Bool(true)));
    let inputs = match obj.get("inputs") {
        Some(Value::Array(a)) => a,
        Some(_) => return Err(bad("`inputs` must be an array".into())),
        None => return Err(bad("the request has no `inputs`".into())),
    };
    for (i, input) in inputs.iter().enumerate() {
        let field = format!("inputs[{i}]");
        let Value::Object(t) = input else {
            return Err(bad(format!("`{field}` must be an object")));
        };
        let name = req_str(t, "name", &field)?;
        let field = format!("input `{name}`");
        let datatype = req_str(t, "datatype", &field)?;
        let shape = match t.get("shape") {
            Some(Value::Array(dims)) => dims
                .iter()
                .map(|d| d.as_i64().filter(|&v| v >= 0))
                .collect::<Option<Vec<i64>>>()
                .ok_or_else(|| bad(format!("{field}: `shape` must hold non-negative integers")))?,
            _ => return Err(bad(format!("{field}: missing `shape` (an array of integers)"))),
        };
        let params = parameters(t.get("parameters"), &format!("{field}.parameters"))?;
        let data = match params.get("binary_data_size") {
            Some(ParamValue::Int(size)) if *size >= 0 => {
                let size = *size as usize;
                if size > binary.len() {
                    return Err(bad(format!(
                        "{field}: binary_data_size is {size}, but only {} bytes of binary data remain",
                        binary.len()
                    )));
                }
                if t.contains_key("data") {
                    return Err(bad(format!("{field}: has both `data` and binary_data_size")));
                }
                let data = binary.split_to(size);
                if datatype == "BYTES" {
                    let parts = crate::protocol::prepare::split_length_prefixed(&data)
                        .map_err(|e| bad(format!("{field}: {e}")))?;
                    InputData::Bytes(parts.into_iter().map(<[u8]>::to_vec).collect())
                } else {
                    InputData::Raw(data)
                }
            }
            Some(other) => {
                return Err(bad(format!(
                    "{field}: binary_data_size must be a non-negative integer, got {other:?}"
                )));
            }
            None => match t.get("data") {
                Some(v) => json_data(v, &datatype, &field)?,
                None => return Err(bad(format!("{field}: no `data` and no binary_data_size"))),
            },
        };
        req.inputs.push(InferInput { name, datatype, shape, data });
    }
    if !binary.is_empty() {
        return Err(bad(format!(
            "{} bytes of binary data are not claimed by any input's binary_data_size",
            binary.len()
        )));
    }
    if let Some(outputs) = obj.get("outputs") {
        let Value::Array(outputs) = outputs else {
            return Err(bad("`outputs` must be an array".into()));
        };
        for (i, o) in outputs.iter().enumerate() {
            let Value::Object(o) = o else {
                return Err(bad(format!("`outputs[{i}]` must be an object")));
            };
            let name = req_str(o, "name", &format!("outputs[{i}]"))?;
            let params = parameters(o.get("parameters"), &format!("output `{name}`.parameters"))?;
            let binary = match params.get("binary_data") {
                Some(ParamValue::Bool(b)) => Some(*b),
                Some(other) => {
                    return Err(bad(format!(
                        "output `{name}`: binary_data must be a boolean, got {other:?}"
                    )));
                }
                None => binary_output.then_some(true),
            };
            let classification = match params.get("classification") {
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
    }
    Ok(req)
}

fn req_str(obj: &Map<String, Value>, key: &str, field: &str) -> Result<String, ApiError> {
    match obj.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(ApiError::BadRequest(format!("{field}: `{key}` must be a string"))),
        None => Err(ApiError::BadRequest(format!("{field}: missing `{key}`"))),
    }
}

fn opt_str(obj: &Map<String, Value>, key: &str, field: &str) -> Result<Option<String>, ApiError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ApiError::BadRequest(format!("`{field}` must be a string"))),
    }
}

fn parameters(v: Option<&Value>, field: &str) -> Result<Parameters, ApiError> {
    let mut out = Parameters::new();
    match v {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) => {
            for (k, v) in m {
                let p = match v {
                    Value::Bool(b) => ParamValue::Bool(*b),
                    Value::Number(n) if n.is_i64() => ParamValue::Int(n.as_i64().unwrap_or_default()),
                    Value::Number(n) => ParamValue::Double(n.as_f64().unwrap_or(f64::NAN)),
                    Value::String(s) => ParamValue::Str(s.clone()),
                    _ => {
                        return Err(ApiError::BadRequest(format!(
                            "{field}.{k}: must be a bool, number or string"
                        )));
                    }
                };
                out.insert(k.clone(), p);
            }
        }
        Some(_) => return Err(ApiError::BadRequest(format!("`{field}` must be an object"))),
    }
    Ok(out)
}

/// JSON tensor data, flat or nested, for a datatype.
fn json_data(v: &Value, datatype: &str, field: &str) -> Result<InputData, ApiError> {
    let mut flat = Vec::new();
    flatten(v, &mut flat);
    if datatype == "BYTES" {
        let bytes = flat
            .into_iter()
            .map(|e| e.as_str().map(|s| s.as_bytes().to_vec()))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| ApiError::BadRequest(format!("{field}: BYTES data must be strings")))?;
        return Ok(InputData::Bytes(bytes));
    }
    let numbers = flat
        .iter()
        .enumerate()
        .map(|(i, e)| match e {
            Value::Number(n) => n.as_f64().ok_or(i),
            Value::Bool(b) => Ok(f64::from(u8::from(*b))),
            _ => Err(i),
        })
        .collect::<Result<Vec<f64>, usize>>()
        .map_err(|i| ApiError::BadRequest(format!("{field}: element {i} of `data` is not a number")))?;
    Ok(InputData::Numbers(numbers))
}

fn flatten<'a>(v: &'a Value, out: &mut Vec<&'a Value>) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| flatten(i, out)),
        other => out.push(other),
    }
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
                    crate::protocol::OutputData::F32(v) => json!(v),
                    crate::protocol::OutputData::I64(v) => json!(v),
                    crate::protocol::OutputData::I32(v) => json!(v),
                    crate::protocol::OutputData::Bytes(v) => {
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
    use crate::protocol::{InferOutput, OutputData};

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
        }
    }

    #[test]
    fn json_binary_and_raw_bodies_decode() {
        let body = br#"{"inputs":[{"name":"input","datatype":"FP32","shape":[1,1,1,2],"data":[[1,2]]}]}"#;
        let (req, _) = decode_request(Bytes::from_static(body), None, &model()).unwrap();
        assert_eq!(req.inputs[0].data, InputData::Numbers(vec![1.0, 2.0]));

        let json = br#"{"inputs":[{"name":"input","datatype":"FP32","shape":[1,1,1,2],"parameters":{"binary_data_size":8}}],"outputs":[{"name":"logits","parameters":{"binary_data":true}}]}"#;
        let mut body = json.to_vec();
        body.extend(1f32.to_le_bytes());
        body.extend(2f32.to_le_bytes());
        let (req, raw) = decode_request(Bytes::from(body), Some(json.len()), &model()).unwrap();
        assert!(!raw);
        assert!(matches!(&req.inputs[0].data, InputData::Raw(b) if b.len() == 8));
        assert_eq!(req.outputs[0].binary, Some(true));

        let (req, raw) = decode_request(Bytes::from(vec![0u8; 8]), Some(0), &model()).unwrap();
        assert!(raw);
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
            err(br#"{"inputs":[{"name":"input","datatype":"FP32","shape":[2],"data":["x",1]}]}"#, None)
                .contains("element 0")
        );
        let json = br#"{"inputs":[{"name":"input","datatype":"FP32","shape":[1,1,1,2],"parameters":{"binary_data_size":8}}]}"#;
        let mut body = json.to_vec();
        body.extend([0u8; 4]);
        assert!(err(&body, Some(json.len())).contains("only 4 bytes"));
        assert!(err(b"{}", Some(10)).contains("only 2 bytes"));
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
