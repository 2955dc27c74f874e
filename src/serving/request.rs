//! Requests and responses as plain data, independent of the wire format.

use std::collections::BTreeMap;
use std::time::Duration;

/// A KServe v2 tensor datatype.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataType {
    Bool,
    Uint8,
    Uint16,
    Uint32,
    Uint64,
    Int8,
    Int16,
    Int32,
    Int64,
    Fp16,
    Fp32,
    Fp64,
    Bf16,
    Bytes,
}

impl DataType {
    const ALL: [DataType; 14] = [
        DataType::Bool,
        DataType::Uint8,
        DataType::Uint16,
        DataType::Uint32,
        DataType::Uint64,
        DataType::Int8,
        DataType::Int16,
        DataType::Int32,
        DataType::Int64,
        DataType::Fp16,
        DataType::Fp32,
        DataType::Fp64,
        DataType::Bf16,
        DataType::Bytes,
    ];

    /// The protocol's name (`FP32`, `BYTES`, ...).
    pub fn name(self) -> &'static str {
        match self {
            DataType::Bool => "BOOL",
            DataType::Uint8 => "UINT8",
            DataType::Uint16 => "UINT16",
            DataType::Uint32 => "UINT32",
            DataType::Uint64 => "UINT64",
            DataType::Int8 => "INT8",
            DataType::Int16 => "INT16",
            DataType::Int32 => "INT32",
            DataType::Int64 => "INT64",
            DataType::Fp16 => "FP16",
            DataType::Fp32 => "FP32",
            DataType::Fp64 => "FP64",
            DataType::Bf16 => "BF16",
            DataType::Bytes => "BYTES",
        }
    }

    /// Parses a protocol name.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.name() == name)
    }

    /// Bytes per element (`None` for variable-length BYTES).
    pub fn size(self) -> Option<usize> {
        Some(match self {
            DataType::Bool | DataType::Uint8 | DataType::Int8 => 1,
            DataType::Uint16 | DataType::Int16 | DataType::Fp16 | DataType::Bf16 => 2,
            DataType::Uint32 | DataType::Int32 | DataType::Fp32 => 4,
            DataType::Uint64 | DataType::Int64 | DataType::Fp64 => 8,
            DataType::Bytes => return None,
        })
    }

    /// Triton's model-config name (`TYPE_FP32`, `TYPE_STRING` for BYTES).
    pub fn config_name(self) -> String {
        match self {
            DataType::Bytes => "TYPE_STRING".into(),
            other => format!("TYPE_{}", other.name()),
        }
    }
}

/// A request or response parameter value.
#[derive(Clone, Debug, PartialEq)]
pub enum ParamValue {
    Bool(bool),
    Int(i64),
    Double(f64),
    Str(String),
}

impl ParamValue {
    /// The value as a number, if it is one.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            ParamValue::Int(v) => Some(*v as f64),
            ParamValue::Double(v) => Some(*v),
            _ => None,
        }
    }
}

/// Named parameters.
pub type Parameters = BTreeMap<String, ParamValue>;

/// An input tensor's contents as they arrived. Front doors decode typed data straight into
/// its buffer, after checking the declared datatype and element count against the model.
#[derive(Clone, Debug, PartialEq)]
pub enum InputData {
    /// FP32 values (JSON numbers, typed gRPC contents).
    F32(Vec<f32>),
    /// Variable-length elements (BYTES), JSON strings or typed contents.
    Bytes(Vec<Vec<u8>>),
    /// Raw little-endian bytes (HTTP binary extension, gRPC `raw_input_contents`).
    Raw(bytes::Bytes),
}

/// One input tensor of a request.
#[derive(Clone, Debug, PartialEq)]
pub struct InferInput {
    pub name: String,
    pub datatype: String,
    pub shape: Vec<i64>,
    pub data: InputData,
}

/// An output the client asked for.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RequestedOutput {
    pub name: String,
    /// HTTP: send this output in the binary section.
    pub binary: Option<bool>,
    /// Triton's classification extension: return the top-k classes as BYTES.
    pub classification: Option<usize>,
}

/// An inference request, decoded from either front door.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct InferRequest {
    pub model: String,
    pub version: Option<String>,
    pub id: Option<String>,
    pub parameters: Parameters,
    pub inputs: Vec<InferInput>,
    /// Empty means every output.
    pub outputs: Vec<RequestedOutput>,
    /// How long the client will wait, from the wire (gRPC's `grpc-timeout`); the core also
    /// reads Triton's `timeout` parameter and the model's default.
    pub timeout: Option<Duration>,
}

/// An output tensor's contents.
#[derive(Clone, Debug, PartialEq)]
pub enum OutputData {
    F32(Vec<f32>),
    I64(Vec<i64>),
    I32(Vec<i32>),
    Bytes(Vec<Vec<u8>>),
}

impl OutputData {
    /// The protocol datatype.
    pub fn datatype(&self) -> DataType {
        match self {
            OutputData::F32(_) => DataType::Fp32,
            OutputData::I64(_) => DataType::Int64,
            OutputData::I32(_) => DataType::Int32,
            OutputData::Bytes(_) => DataType::Bytes,
        }
    }

    /// Little-endian raw bytes; BYTES elements each get a 4-byte length prefix (Triton's
    /// serialization).
    pub fn to_raw(&self) -> Vec<u8> {
        match self {
            OutputData::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            OutputData::I64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            OutputData::I32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            OutputData::Bytes(v) => v
                .iter()
                .flat_map(|b| (b.len() as u32).to_le_bytes().into_iter().chain(b.iter().copied()))
                .collect(),
        }
    }
}

/// One output tensor of a response.
#[derive(Clone, Debug, PartialEq)]
pub struct InferOutput {
    pub name: String,
    pub shape: Vec<i64>,
    pub data: OutputData,
    /// HTTP: whether to send it in the binary section.
    pub binary: bool,
}

/// An inference response.
#[derive(Clone, Debug, PartialEq)]
pub struct InferResponse {
    pub model_name: String,
    pub model_version: String,
    pub id: Option<String>,
    pub parameters: Parameters,
    pub outputs: Vec<InferOutput>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datatypes_round_trip_and_bytes_serialize_with_length_prefixes() {
        for d in DataType::ALL {
            assert_eq!(DataType::parse(d.name()), Some(d));
        }
        assert_eq!(DataType::Fp32.config_name(), "TYPE_FP32");
        assert_eq!(DataType::Bytes.config_name(), "TYPE_STRING");
        let raw = OutputData::Bytes(vec![b"ab".to_vec(), b"".to_vec()]).to_raw();
        assert_eq!(raw, vec![2, 0, 0, 0, b'a', b'b', 0, 0, 0, 0]);
        assert_eq!(OutputData::F32(vec![1.0]).to_raw(), 1.0f32.to_le_bytes().to_vec());
    }
}
