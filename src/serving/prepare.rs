//! From a decoded request to what the engine runs: checks every input, output and
//! parameter against the model's interface and names the field at fault.

use std::time::Duration;

use super::error::ApiError;
use super::image;
use super::limits::ModelLimits;
use super::request::{DataType, InferRequest, InputData, ParamValue};
use crate::control::PolicyRequest;
use crate::engine::ChannelMode;
use crate::repository::{ImageConfig, InputDatatype, ModelConfig};

/// Output with each input's executed FLOPs (`INT64 [N, 1]`).
pub const FLOPS_OUTPUT: &str = "sluice_flops";
/// Output with the exit each input took (`INT32 [N, 1]`, stage number, 0 = none).
pub const EXIT_OUTPUT: &str = "sluice_exit";

/// Request parameters that adjust gating for one request (docs/gating.md).
pub const PARAM_BUDGET: &str = "sluice_budget";
pub const PARAM_CHANNEL: &str = "sluice_channel_threshold";
pub const PARAM_BLOCK: &str = "sluice_block_threshold";
pub const PARAM_EXIT: &str = "sluice_exit_threshold";
pub const PARAM_MODE: &str = "sluice_channel_mode";
/// Triton's request timeout parameter, in microseconds (queue time included).
pub const PARAM_TIMEOUT: &str = "timeout";

/// What clients see of a model.
#[derive(Clone, Debug)]
pub struct ModelInterface {
    pub name: String,
    pub version: String,
    pub input_name: String,
    pub input_datatype: DataType,
    /// Per-item shape the network runs on `[C, H, W]`.
    pub dims: [i64; 3],
    pub image: Option<ImageConfig>,
    pub output_name: String,
    pub labels: Vec<String>,
    pub max_batch_size: usize,
    /// What one request may hold.
    pub limits: ModelLimits,
}

impl ModelInterface {
    pub fn from_config(config: &ModelConfig) -> Self {
        ModelInterface {
            name: config.name.clone(),
            version: config.version.clone(),
            input_name: config.input.name.clone(),
            input_datatype: match config.input.datatype {
                InputDatatype::Fp32 => DataType::Fp32,
                InputDatatype::Bytes => DataType::Bytes,
            },
            dims: config.input.dims,
            image: config.input.image.clone(),
            output_name: config.output.name.clone(),
            labels: config.output.labels.clone(),
            max_batch_size: config.max_batch_size,
            limits: ModelLimits::from_config(config),
        }
    }

    /// The per-item shape clients send: `[C, H, W]`, or `[1]` (one encoded image) for images.
    pub fn item_shape(&self) -> Vec<i64> {
        match self.input_datatype {
            DataType::Bytes => vec![1],
            _ => self.dims.to_vec(),
        }
    }

    /// Every output with its datatype and per-item shape.
    pub fn outputs(&self) -> Vec<(String, DataType, Vec<i64>)> {
        vec![
            (self.output_name.clone(), DataType::Fp32, vec![self.labels.len() as i64]),
            (FLOPS_OUTPUT.into(), DataType::Int64, vec![1]),
            (EXIT_OUTPUT.into(), DataType::Int32, vec![1]),
        ]
    }
}

/// Which output and how.
#[derive(Clone, Debug, PartialEq)]
pub enum OutputKind {
    /// Logits, or with `classification = k` the top-k classes as `"score:index:label"`.
    Logits {
        classification: Option<usize>,
    },
    Flops,
    Exit,
}

/// An output to produce.
#[derive(Clone, Debug, PartialEq)]
pub struct OutputPlan {
    pub name: String,
    pub kind: OutputKind,
    pub binary: Option<bool>,
}

/// A request checked against its model and turned into engine input.
#[derive(Clone, Debug)]
pub struct PreparedRequest {
    /// Row-major `[items, C, H, W]` values.
    pub values: Vec<f32>,
    pub items: usize,
    pub policy: PolicyRequest,
    pub outputs: Vec<OutputPlan>,
    /// Triton's `timeout` parameter.
    pub timeout: Option<Duration>,
}

/// What an input's header (name, datatype, shape) says it holds, checked against the model
/// before any of its data is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InputShape {
    /// Batch rows.
    pub items: usize,
    /// Elements the data must hold: values (FP32) or encoded images (BYTES).
    pub elements: usize,
}

/// Checks an input's name, datatype and shape against `model`: front doors call it as soon
/// as they have read them, so no data is decoded for a request that cannot run.
pub fn check_input_header(
    model: &ModelInterface,
    name: &str,
    datatype: &str,
    shape: &[i64],
) -> Result<InputShape, ApiError> {
    let bad = |m: String| Err(ApiError::BadRequest(m));
    if name != model.input_name {
        return bad(format!(
            "unknown input `{name}`: model `{}` has input `{}`",
            model.name, model.input_name
        ));
    }
    let field = format!("input `{name}`");
    if datatype != model.input_datatype.name() {
        return bad(format!(
            "{field}: datatype {datatype} given, the model expects {}",
            model.input_datatype.name()
        ));
    }
    let item = model.item_shape();
    let shape_ok = shape.len() == item.len() + 1 && shape[1..] == item[..];
    let items = shape.first().copied().unwrap_or(0);
    if !shape_ok || items < 1 {
        let expected = std::iter::once("N".to_string())
            .chain(item.iter().map(|d| d.to_string()))
            .collect::<Vec<_>>()
            .join(", ");
        return bad(format!("{field}: shape {shape:?} given, the model expects [{expected}] with N ≥ 1"));
    }
    if items as u64 > model.max_batch_size as u64 {
        return bad(format!(
            "{field}: batch {items} exceeds the model's max_batch_size {}",
            model.max_batch_size
        ));
    }
    let items = items as usize;
    let elements = match model.input_datatype {
        DataType::Bytes => items,
        _ => items * model.limits.item_values,
    };
    Ok(InputShape { items, elements })
}

/// Checks `req` against `model` and decodes its input (taking the input's data out of `req`).
pub fn prepare(req: &mut InferRequest, model: &ModelInterface) -> Result<PreparedRequest, ApiError> {
    let bad = |m: String| Err(ApiError::BadRequest(m));
    let input = match req.inputs.as_slice() {
        [one] => one,
        [] => {
            return bad(format!(
                "model `{}` needs input `{}`; the request has none",
                model.name, model.input_name
            ));
        }
        many => {
            return bad(format!(
                "model `{}` takes one input (`{}`); the request has {}",
                model.name,
                model.input_name,
                many.len()
            ));
        }
    };
    let InputShape { items, elements } =
        check_input_header(model, &input.name, &input.datatype, &input.shape)?;
    let field = format!("input `{}`", input.name);
    let req = &mut *req;
    // Cheap checks first: a request with a bad parameter decodes no image.
    let policy = policy_request(req)?;
    let outputs = output_plans(req, model)?;
    let timeout = timeout(req)?;
    let data = std::mem::replace(&mut req.inputs[0].data, InputData::F32(Vec::new()));
    let values = match model.input_datatype {
        DataType::Bytes => decode_images(&data, items, model, &field)?,
        _ => decode_f32(data, elements, &field)?,
    };
    Ok(PreparedRequest { values, items, policy, outputs, timeout })
}

/// Triton's `timeout` parameter: microseconds, a non-negative integer (0: none).
fn timeout(req: &InferRequest) -> Result<Option<Duration>, ApiError> {
    match req.parameters.get(PARAM_TIMEOUT) {
        None | Some(ParamValue::Int(0)) => Ok(None),
        Some(ParamValue::Int(us)) if *us > 0 => Ok(Some(Duration::from_micros(*us as u64))),
        Some(v) => Err(ApiError::BadRequest(format!(
            "parameter `{PARAM_TIMEOUT}` must be a non-negative integer (microseconds), got {v:?}"
        ))),
    }
}

fn decode_f32(data: InputData, count: usize, field: &str) -> Result<Vec<f32>, ApiError> {
    let bad = |m: String| ApiError::BadRequest(format!("{field}: {m}"));
    match data {
        InputData::F32(v) if v.len() == count => Ok(v),
        InputData::F32(v) => Err(bad(format!("{} values given, the shape needs {count}", v.len()))),
        InputData::Raw(bytes) if bytes.len() as u64 == count as u64 * 4 => {
            Ok(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
        }
        InputData::Raw(bytes) => {
            Err(bad(format!("{} bytes of data, the shape needs {} (FP32)", bytes.len(), count as u64 * 4)))
        }
        InputData::Bytes(_) => Err(bad("string data given for an FP32 tensor".into())),
    }
}

fn decode_images(
    data: &InputData,
    items: usize,
    model: &ModelInterface,
    field: &str,
) -> Result<Vec<f32>, ApiError> {
    let bad = |m: String| ApiError::BadRequest(format!("{field}: {m}"));
    let elements: Vec<&[u8]> = match data {
        InputData::Bytes(v) => v.iter().map(|b| b.as_slice()).collect(),
        InputData::Raw(raw) => split_length_prefixed(raw, items).map_err(bad)?,
        _ => return Err(bad("numbers given for a BYTES (encoded image) tensor".into())),
    };
    if elements.len() != items {
        return Err(bad(format!("{} images given, the shape says {items}", elements.len())));
    }
    let config =
        model.image.as_ref().ok_or_else(|| ApiError::Internal("image input without image config".into()))?;
    let [c, h, w] = model.dims;
    let mut values = Vec::with_capacity(items * (c * h * w) as usize);
    for (i, bytes) in elements.iter().enumerate() {
        let decoded = image::decode(bytes, c as usize, h as u32, w as u32, config).map_err(|e| match e {
            image::ImageRefusal::TooLarge(m) => {
                ApiError::PayloadTooLarge(format!("{field}: element {i}: {m}"))
            }
            image::ImageRefusal::Invalid(m) => bad(format!("element {i}: {m}")),
        })?;
        values.extend(decoded);
    }
    Ok(values)
}

/// Triton's BYTES serialization: each element is a 4-byte little-endian length and its bytes.
/// More than `max_elements` elements is an error (found before they are collected).
pub fn split_length_prefixed(raw: &[u8], max_elements: usize) -> Result<Vec<&[u8]>, String> {
    let mut out = Vec::new();
    let mut rest = raw;
    while !rest.is_empty() {
        if out.len() == max_elements {
            return Err(format!("more than the {max_elements} BYTES elements the shape declares"));
        }
        if rest.len() < 4 {
            return Err("truncated BYTES element length".into());
        }
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        rest = &rest[4..];
        if rest.len() < len {
            return Err(format!("BYTES element {} claims {len} bytes, {} remain", out.len(), rest.len()));
        }
        out.push(&rest[..len]);
        rest = &rest[len..];
    }
    Ok(out)
}

fn number(req: &InferRequest, key: &str) -> Result<Option<f64>, ApiError> {
    match req.parameters.get(key) {
        None => Ok(None),
        Some(v) => match v.as_f64() {
            Some(x) if x.is_finite() => Ok(Some(x)),
            _ => Err(ApiError::BadRequest(format!("parameter `{key}` must be a number, got {v:?}"))),
        },
    }
}

fn policy_request(req: &InferRequest) -> Result<PolicyRequest, ApiError> {
    let threshold = |key: &str| -> Result<Option<f32>, ApiError> {
        match number(req, key)? {
            Some(t) if !(0.0..=1.0).contains(&t) => {
                Err(ApiError::BadRequest(format!("parameter `{key}`: {t} is outside [0, 1]")))
            }
            t => Ok(t.map(|t| t as f32)),
        }
    };
    let budget = match number(req, PARAM_BUDGET)? {
        Some(b) if !(b > 0.0 && b <= 1.0) => {
            return Err(ApiError::BadRequest(format!("parameter `{PARAM_BUDGET}`: {b} is outside (0, 1]")));
        }
        b => b,
    };
    let channel_mode = match req.parameters.get(PARAM_MODE) {
        None => None,
        Some(ParamValue::Str(s)) if s == "slice" => Some(ChannelMode::Slice),
        Some(ParamValue::Str(s)) if s == "select" => Some(ChannelMode::Select),
        Some(v) => {
            return Err(ApiError::BadRequest(format!(
                "parameter `{PARAM_MODE}` must be \"slice\" or \"select\", got {v:?}"
            )));
        }
    };
    let p = PolicyRequest {
        budget,
        channel_threshold: threshold(PARAM_CHANNEL)?,
        block_threshold: threshold(PARAM_BLOCK)?,
        exit_threshold: threshold(PARAM_EXIT)?,
        channel_mode,
    };
    if p.budget.is_some()
        && (p.channel_threshold.is_some() || p.block_threshold.is_some() || p.exit_threshold.is_some())
    {
        return Err(ApiError::BadRequest(format!(
            "parameter `{PARAM_BUDGET}` cannot be combined with thresholds"
        )));
    }
    Ok(p)
}

fn output_plans(req: &InferRequest, model: &ModelInterface) -> Result<Vec<OutputPlan>, ApiError> {
    let known = model.outputs();
    if req.outputs.is_empty() {
        return Ok(known
            .into_iter()
            .map(|(name, _, _)| OutputPlan { kind: kind_of(&name, model, None), name, binary: None })
            .collect());
    }
    let mut plans = Vec::new();
    for out in &req.outputs {
        if !known.iter().any(|(n, _, _)| *n == out.name) {
            let names: Vec<&str> = known.iter().map(|(n, _, _)| n.as_str()).collect();
            return Err(ApiError::BadRequest(format!(
                "unknown output `{}`: model `{}` has outputs {}",
                out.name,
                model.name,
                names.join(", ")
            )));
        }
        if let Some(k) = out.classification {
            if out.name != model.output_name {
                return Err(ApiError::BadRequest(format!(
                    "output `{}`: classification applies to `{}` only",
                    out.name, model.output_name
                )));
            }
            if k == 0 || k > model.labels.len() {
                return Err(ApiError::BadRequest(format!(
                    "output `{}`: classification count {k} is outside 1..={}",
                    out.name,
                    model.labels.len()
                )));
            }
        }
        if plans.iter().any(|p: &OutputPlan| p.name == out.name) {
            return Err(ApiError::BadRequest(format!("output `{}` is requested twice", out.name)));
        }
        plans.push(OutputPlan {
            name: out.name.clone(),
            kind: kind_of(&out.name, model, out.classification),
            binary: out.binary,
        });
    }
    Ok(plans)
}

fn kind_of(name: &str, model: &ModelInterface, classification: Option<usize>) -> OutputKind {
    if name == FLOPS_OUTPUT {
        OutputKind::Flops
    } else if name == EXIT_OUTPUT {
        OutputKind::Exit
    } else {
        debug_assert_eq!(name, model.output_name);
        OutputKind::Logits { classification }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serving::request::{InferInput, RequestedOutput};

    fn model() -> ModelInterface {
        ModelInterface {
            name: "m".into(),
            version: "1".into(),
            input_name: "input".into(),
            input_datatype: DataType::Fp32,
            dims: [1, 2, 2],
            image: None,
            output_name: "logits".into(),
            labels: vec!["a".into(), "b".into(), "c".into()],
            max_batch_size: 4,
            limits: ModelLimits {
                max_items: 4,
                item_values: 4,
                max_image_bytes: 0,
                max_image_pixels: 0,
                max_body_bytes: 1 << 20,
            },
        }
    }

    fn request(datatype: &str, shape: Vec<i64>, data: InputData) -> InferRequest {
        InferRequest {
            model: "m".into(),
            inputs: vec![InferInput { name: "input".into(), datatype: datatype.into(), shape, data }],
            ..Default::default()
        }
    }

    fn err(req: &InferRequest) -> String {
        prepare(&mut req.clone(), &model()).unwrap_err().to_string()
    }

    #[test]
    fn accepts_json_numbers_and_raw_bytes() {
        let ok =
            prepare(&mut request("FP32", vec![2, 1, 2, 2], InputData::F32(vec![0.5; 8])), &model()).unwrap();
        assert_eq!((ok.items, ok.values.len(), ok.outputs.len()), (2, 8, 3));
        let raw: Vec<u8> = (0..4).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let ok =
            prepare(&mut request("FP32", vec![1, 1, 2, 2], InputData::Raw(raw.into())), &model()).unwrap();
        assert_eq!(ok.values, vec![0.0, 1.0, 2.0, 3.0]);
    }

    #[test]
    fn errors_name_the_field_and_the_problem() {
        assert!(
            err(&request("FP64", vec![1, 1, 2, 2], InputData::F32(vec![0.0; 4])))
                .contains("datatype FP64 given")
        );
        assert!(
            err(&request("FP32", vec![1, 2, 2], InputData::F32(vec![0.0; 4])))
                .contains("shape [1, 2, 2] given")
        );
        assert!(
            err(&request("FP32", vec![5, 1, 2, 2], InputData::F32(vec![0.0; 20])))
                .contains("max_batch_size 4")
        );
        assert!(
            err(&request("FP32", vec![1, 1, 2, 2], InputData::F32(vec![0.0; 3]))).contains("3 values given")
        );
        assert!(
            err(&request("FP32", vec![1, 1, 2, 2], InputData::Raw(vec![0u8; 15].into())))
                .contains("15 bytes")
        );
        let mut r = request("FP32", vec![1, 1, 2, 2], InputData::F32(vec![0.0; 4]));
        r.inputs[0].name = "x".into();
        assert!(err(&r).contains("unknown input `x`"));
        let mut r = request("FP32", vec![1, 1, 2, 2], InputData::F32(vec![0.0; 4]));
        r.outputs = vec![RequestedOutput { name: "probs".into(), ..Default::default() }];
        assert!(err(&r).contains("unknown output `probs`"));
        r.outputs =
            vec![RequestedOutput { name: "logits".into(), classification: Some(9), ..Default::default() }];
        assert!(err(&r).contains("classification count 9"));
        let mut r = request("FP32", vec![1, 1, 2, 2], InputData::F32(vec![0.0; 4]));
        r.parameters.insert(PARAM_BUDGET.into(), ParamValue::Double(1.5));
        assert!(err(&r).contains("sluice_budget"));
        r.parameters.insert(PARAM_BUDGET.into(), ParamValue::Str("x".into()));
        assert!(err(&r).contains("must be a number"));
        let mut r = request("FP32", vec![1, 1, 2, 2], InputData::F32(vec![0.0; 4]));
        r.parameters.insert(PARAM_TIMEOUT.into(), ParamValue::Int(-5));
        assert!(err(&r).contains("parameter `timeout`"));
        r.parameters.insert(PARAM_TIMEOUT.into(), ParamValue::Int(2500));
        assert_eq!(prepare(&mut r, &model()).unwrap().timeout, Some(Duration::from_micros(2500)));
    }

    #[test]
    fn length_prefixed_bytes_split_and_reject_truncation() {
        let raw = [2u8, 0, 0, 0, b'h', b'i', 0, 0, 0, 0];
        assert_eq!(split_length_prefixed(&raw, 2).unwrap(), vec![b"hi".as_slice(), b"".as_slice()]);
        assert!(split_length_prefixed(&raw, 1).unwrap_err().contains("more than the 1"));
        assert!(split_length_prefixed(&raw[..5], 2).is_err());
        assert!(split_length_prefixed(&raw[..3], 2).is_err());
    }
}
