//! The Open Inference Protocol's data model, shared by both front doors: requests and
//! responses as plain data, the error type they map from, and the checks that turn a
//! request into an engine batch. `http` and `grpc` only translate wire formats.

pub mod error;
pub mod grpc;
pub mod http;
pub mod image;
pub mod prepare;
pub mod types;

pub use error::ApiError;
pub use types::{
    DataType, InferInput, InferOutput, InferRequest, InferResponse, InputData, OutputData, ParamValue,
    Parameters, RequestedOutput,
};
