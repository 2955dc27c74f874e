//! One error type for both front doors, mapped once to HTTP statuses and gRPC codes.
//! Client errors name the field and the problem; server errors are logged, not leaked.

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// Malformed or invalid request (400 / INVALID_ARGUMENT).
    #[error("{0}")]
    BadRequest(String),
    /// Unknown model, version or route (404 / NOT_FOUND).
    #[error("{0}")]
    NotFound(String),
    /// Body or message over the configured limit (413 / RESOURCE_EXHAUSTED).
    #[error("{0}")]
    PayloadTooLarge(String),
    /// Admission control: the model's queue is full (429 / RESOURCE_EXHAUSTED).
    #[error("{0}")]
    Busy(String),
    /// Not ready or shutting down (503 / UNAVAILABLE).
    #[error("{0}")]
    Unavailable(String),
    /// No or malformed credentials (401 / UNAUTHENTICATED).
    #[error("{0}")]
    Unauthenticated(String),
    /// Valid credentials that may not do this (403 / PERMISSION_DENIED).
    #[error("{0}")]
    PermissionDenied(String),
    /// A fault of the server; the message is logged and a generic one returned (500 / INTERNAL).
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    /// The HTTP status code.
    pub fn http_status(&self) -> u16 {
        match self {
            ApiError::BadRequest(_) => 400,
            ApiError::Unauthenticated(_) => 401,
            ApiError::PermissionDenied(_) => 403,
            ApiError::NotFound(_) => 404,
            ApiError::PayloadTooLarge(_) => 413,
            ApiError::Busy(_) => 429,
            ApiError::Internal(_) => 500,
            ApiError::Unavailable(_) => 503,
        }
    }

    /// The outcome label metrics record.
    pub fn outcome(&self) -> &'static str {
        match self {
            ApiError::Busy(_) => "rejected",
            ApiError::Internal(_) | ApiError::Unavailable(_) => "server_error",
            _ => "client_error",
        }
    }

    /// The message clients see (server faults stay generic; they are logged in full).
    pub fn public_message(&self) -> String {
        match self {
            ApiError::Internal(detail) => {
                tracing::error!(%detail, "internal error");
                "internal error".into()
            }
            other => other.to_string(),
        }
    }
}

impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> Self {
        let message = e.public_message();
        match e {
            ApiError::BadRequest(_) => tonic::Status::invalid_argument(message),
            ApiError::NotFound(_) => tonic::Status::not_found(message),
            ApiError::PayloadTooLarge(_) | ApiError::Busy(_) => tonic::Status::resource_exhausted(message),
            ApiError::Unavailable(_) => tonic::Status::unavailable(message),
            ApiError::Unauthenticated(_) => tonic::Status::unauthenticated(message),
            ApiError::PermissionDenied(_) => tonic::Status::permission_denied(message),
            ApiError::Internal(_) => tonic::Status::internal(message),
        }
    }
}
