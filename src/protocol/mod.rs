//! The front doors: `http` (axum) and `grpc` (tonic) translate their wire formats to and from
//! the serving core's request model (`crate::serving`), and nothing else. Neither imports
//! the other; what both need to agree on lives here.

pub mod conn;
pub mod grpc;
pub mod http;

/// The protocol extensions this server really implements (server metadata lists exactly these).
pub const EXTENSIONS: [&str; 5] =
    ["binary_tensor_data", "classification", "model_configuration", "parameters", "statistics"];
