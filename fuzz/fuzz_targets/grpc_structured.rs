//! Structure-aware companion of `grpc_convert`: the fuzz input is read (with `arbitrary`)
//! as a description of a `ModelInferRequest` close to a valid one — the model's own input
//! name, datatype and shape or arbitrary ones; contents as raw bytes, raw FP32 rows, typed
//! FP32, typed or length-prefixed BYTES made from real PNG/JPEG samples (whole, cut or with
//! a byte changed); gating, timeout and classification parameters with odd values — so
//! `convert::request` and `prepare` run deep more often than from raw protobuf bytes.
#![no_main]

use std::collections::HashMap;
use std::sync::OnceLock;

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use sluice::protocol::grpc::convert;
use sluice::protocol::grpc::pb::infer_parameter::ParameterChoice;
use sluice::protocol::grpc::pb::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use sluice::protocol::grpc::pb::{InferParameter, InferTensorContents, ModelInferRequest};
use sluice::serving::DataType;
use sluice::serving::prepare::{ModelInterface, prepare};
use sluice_fuzz::models;

#[derive(Arbitrary, Debug)]
enum Name {
    Model,
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum Dtype {
    Model,
    Fp32,
    Bytes,
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum Shape {
    /// `[n, …the model's item shape]`.
    Batch(i8),
    Any(Vec<i64>),
}

#[derive(Arbitrary, Debug)]
enum Image {
    Sample(u8),
    Cut { sample: u8, at: u16 },
    Flip { sample: u8, at: u16, xor: u8 },
    Bytes(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
enum Contents {
    None,
    Raw(Vec<u8>),
    /// `items` × 784 FP32 values, little-endian, plus or minus `extra` bytes.
    RawF32 { items: u8, value: f32, extra: i8 },
    /// Triton's length-prefixed BYTES, optionally with trailing garbage.
    RawImages { images: Vec<Image>, tail: Vec<u8> },
    Fp32 { items: u8, value: f32, extra: i8 },
    Bytes(Vec<Image>),
    /// Raw and typed contents at once.
    Both,
    /// A typed field other than the model's.
    OtherTyped { field: u8, n: u8 },
}

#[derive(Arbitrary, Debug)]
enum Key {
    Budget,
    Channel,
    Block,
    Exit,
    Mode,
    Timeout,
    Classification,
    BinaryDataOutput,
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum Value {
    Unset,
    Bool(bool),
    Int(i64),
    Uint(u64),
    Double(f64),
    Str(String),
    Slice,
    Select,
    Half,
}

#[derive(Arbitrary, Debug)]
enum OutName {
    Logits,
    Flops,
    Exit,
    Other(String),
}

#[derive(Arbitrary, Debug)]
struct Input {
    name: Name,
    datatype: Dtype,
    shape: Shape,
    contents: Contents,
    parameters: Vec<(Key, Value)>,
}

#[derive(Arbitrary, Debug)]
struct Request {
    image_model: bool,
    inputs: Vec<Input>,
    /// Drop or duplicate a raw_input_contents entry.
    raw_mismatch: Option<bool>,
    parameters: Vec<(Key, Value)>,
    outputs: Vec<(OutName, Vec<(Key, Value)>)>,
    id: String,
}

/// Small valid images: PNG (gray, RGB, 16-bit, alpha, sizes 1×1 … 64×48) and JPEG.
fn samples() -> &'static [Vec<u8>] {
    static SAMPLES: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    SAMPLES.get_or_init(|| {
        use image::{DynamicImage, ImageFormat};
        let encode = |img: DynamicImage, format: ImageFormat| {
            let mut out = std::io::Cursor::new(Vec::new());
            img.write_to(&mut out, format).unwrap();
            out.into_inner()
        };
        let gray = |w, h| DynamicImage::ImageLuma8(image::GrayImage::from_fn(w, h, |x, y| image::Luma([(x * 7 + y * 3) as u8])));
        let rgb = |w, h| DynamicImage::ImageRgb8(image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 128])));
        vec![
            encode(gray(28, 28), ImageFormat::Png),
            encode(gray(1, 1), ImageFormat::Png),
            encode(rgb(64, 48), ImageFormat::Png),
            encode(DynamicImage::ImageLuma16(image::ImageBuffer::from_pixel(30, 20, image::Luma([40000u16]))), ImageFormat::Png),
            encode(DynamicImage::ImageRgba8(image::RgbaImage::from_pixel(28, 28, image::Rgba([1, 2, 3, 4]))), ImageFormat::Png),
            encode(gray(28, 28), ImageFormat::Jpeg),
            encode(rgb(40, 33), ImageFormat::Jpeg),
        ]
    })
}

fn image(i: &Image) -> Vec<u8> {
    let s = samples();
    let pick = |n: u8| s[n as usize % s.len()].clone();
    match i {
        Image::Sample(n) => pick(*n),
        Image::Cut { sample, at } => {
            let mut b = pick(*sample);
            b.truncate(*at as usize % (b.len() + 1));
            b
        }
        Image::Flip { sample, at, xor } => {
            let mut b = pick(*sample);
            let n = b.len();
            b[*at as usize % n] ^= xor;
            b
        }
        Image::Bytes(b) => b.clone(),
    }
}

fn param(v: &Value) -> InferParameter {
    let choice = match v {
        Value::Unset => None,
        Value::Bool(b) => Some(ParameterChoice::BoolParam(*b)),
        Value::Int(i) => Some(ParameterChoice::Int64Param(*i)),
        Value::Uint(u) => Some(ParameterChoice::Uint64Param(*u)),
        Value::Double(d) => Some(ParameterChoice::DoubleParam(*d)),
        Value::Str(s) => Some(ParameterChoice::StringParam(s.clone())),
        Value::Slice => Some(ParameterChoice::StringParam("slice".into())),
        Value::Select => Some(ParameterChoice::StringParam("select".into())),
        Value::Half => Some(ParameterChoice::DoubleParam(0.5)),
    };
    InferParameter { parameter_choice: choice }
}

fn params(list: &[(Key, Value)]) -> HashMap<String, InferParameter> {
    list.iter()
        .map(|(k, v)| {
            let key = match k {
                Key::Budget => "sluice_budget".to_string(),
                Key::Channel => "sluice_channel_threshold".into(),
                Key::Block => "sluice_block_threshold".into(),
                Key::Exit => "sluice_exit_threshold".into(),
                Key::Mode => "sluice_channel_mode".into(),
                Key::Timeout => "timeout".into(),
                Key::Classification => "classification".into(),
                Key::BinaryDataOutput => "binary_data_output".into(),
                Key::Other(s) => s.clone(),
            };
            (key, param(v))
        })
        .collect()
}

fn f32_rows(items: u8, value: f32, extra: i8) -> Vec<f32> {
    let n = (items as usize % 40) * 784;
    vec![value; n.saturating_add_signed(extra as isize)]
}

/// The input tensor and its raw_input_contents entry, if any.
fn tensor(input: &Input, model: &ModelInterface) -> (InferInputTensor, Option<Vec<u8>>) {
    let name = match &input.name {
        Name::Model => model.input_name.clone(),
        Name::Other(s) => s.clone(),
    };
    let datatype = match &input.datatype {
        Dtype::Model => model.input_datatype.name().to_string(),
        Dtype::Fp32 => "FP32".into(),
        Dtype::Bytes => "BYTES".into(),
        Dtype::Other(s) => s.clone(),
    };
    let shape = match &input.shape {
        Shape::Batch(n) => std::iter::once(*n as i64).chain(model.item_shape()).collect(),
        Shape::Any(v) => v.clone(),
    };
    let typed = |c: InferTensorContents| Some(c);
    let (contents, raw) = match &input.contents {
        Contents::None => (None, None),
        Contents::Raw(b) => (None, Some(b.clone())),
        Contents::RawF32 { items, value, extra } => {
            (None, Some(f32_rows(*items, *value, *extra).iter().flat_map(|v| v.to_le_bytes()).collect()))
        }
        Contents::RawImages { images, tail } => {
            let mut raw = Vec::new();
            for i in images {
                let b = image(i);
                raw.extend((b.len() as u32).to_le_bytes());
                raw.extend(b);
            }
            raw.extend(tail);
            (None, Some(raw))
        }
        Contents::Fp32 { items, value, extra } => (
            typed(InferTensorContents { fp32_contents: f32_rows(*items, *value, *extra), ..Default::default() }),
            None,
        ),
        Contents::Bytes(images) => (
            typed(InferTensorContents { bytes_contents: images.iter().map(image).collect(), ..Default::default() }),
            None,
        ),
        Contents::Both => (
            typed(InferTensorContents { fp32_contents: vec![0.0; 784], ..Default::default() }),
            Some(vec![0u8; 784 * 4]),
        ),
        Contents::OtherTyped { field, n } => {
            let n = *n as usize;
            let mut c = InferTensorContents::default();
            match field % 7 {
                0 => c.bool_contents = vec![true; n],
                1 => c.int_contents = vec![1; n],
                2 => c.int64_contents = vec![1; n],
                3 => c.uint_contents = vec![1; n],
                4 => c.uint64_contents = vec![1; n],
                5 => c.fp64_contents = vec![1.0; n],
                _ => c.bytes_contents = vec![vec![1]; n],
            }
            (typed(c), None)
        }
    };
    (InferInputTensor { name, datatype, shape, parameters: params(&input.parameters), contents }, raw)
}

fuzz_target!(|data: &[u8]| {
    sluice_fuzz::leave_decoder_panics_to_sluice();
    let Ok(r) = Request::arbitrary_take_rest(Unstructured::new(data)) else { return };
    let model = &models()[r.image_model as usize];
    let mut inputs = Vec::new();
    let mut raw = Vec::new();
    for input in r.inputs.iter().take(3) {
        let (t, contents) = tensor(input, model);
        inputs.push(t);
        raw.extend(contents);
    }
    match r.raw_mismatch {
        Some(true) => raw.push(Vec::new()),
        Some(false) => {
            raw.pop();
        }
        None => {}
    }
    let msg = ModelInferRequest {
        model_name: model.name.clone(),
        model_version: String::new(),
        id: r.id,
        parameters: params(&r.parameters),
        inputs,
        outputs: r
            .outputs
            .iter()
            .take(4)
            .map(|(name, p)| InferRequestedOutputTensor {
                name: match name {
                    OutName::Logits => "logits".into(),
                    OutName::Flops => "sluice_flops".into(),
                    OutName::Exit => "sluice_exit".into(),
                    OutName::Other(s) => s.clone(),
                },
                parameters: params(p),
            })
            .collect(),
        raw_input_contents: raw,
    };
    let Ok(mut req) = convert::request(msg, model) else { return };
    assert!(req.inputs.len() <= 1);
    if let Ok(prepared) = prepare(&mut req, model) {
        let [c, h, w] = model.dims;
        assert!(prepared.items >= 1 && prepared.items <= model.max_batch_size);
        assert_eq!(prepared.values.len(), prepared.items * (c * h * w) as usize);
        if model.input_datatype == DataType::Bytes {
            // Decoded images are normalised pixels: always finite.
            assert!(prepared.values.iter().all(|v| v.is_finite()));
        }
    }
});
