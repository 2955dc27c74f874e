//! One error type for the serving core. Each front door maps it once (HTTP statuses in
//! `protocol::http`, gRPC codes in `protocol::grpc`). Client errors name the field and the
//! problem; server errors are logged, not leaked.

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// Malformed or invalid request (400 / INVALID_ARGUMENT).
    #[error("{0}")]
    BadRequest(String),
    /// Unknown model, version or route (404 / NOT_FOUND).
    #[error("{0}")]
    NotFound(String),
    /// Body, message, tensor or image over a configured limit (413 / RESOURCE_EXHAUSTED).
    #[error("{0}")]
    PayloadTooLarge(String),
    /// Admission control: the model's queue or the server's in-flight limit is full
    /// (429 / RESOURCE_EXHAUSTED).
    #[error("{0}")]
    Busy(String),
    /// The client did not send its request in time (408 / DEADLINE_EXCEEDED).
    #[error("{0}")]
    RequestTimeout(String),
    /// The request's deadline passed before it was answered (504 / DEADLINE_EXCEEDED).
    #[error("{0}")]
    DeadlineExceeded(String),
    /// Not ready, still loading or shutting down (503 / UNAVAILABLE).
    #[error("{0}")]
    Unavailable(String),
    /// No or malformed credentials (401 / UNAUTHENTICATED).
    #[error("{0}")]
    Unauthenticated(String),
    /// Valid credentials that may not do this (403 / PERMISSION_DENIED).
    #[error("{0}")]
    PermissionDenied(String),
    /// The request conflicts with how the server is set up, e.g. a policy change while the
    /// policies follow a file (409 / FAILED_PRECONDITION).
    #[error("{0}")]
    Conflict(String),
    /// A fault of the server; the message is logged and a generic one returned (500 / INTERNAL).
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    /// The outcome label metrics record (`sluice_requests_total{outcome}`).
    pub fn outcome(&self) -> &'static str {
        match self {
            ApiError::Busy(_) => "rejected",
            ApiError::PayloadTooLarge(_) => "too_large",
            ApiError::RequestTimeout(_) | ApiError::DeadlineExceeded(_) => "timeout",
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

impl From<crate::control::controller::ControllerError> for ApiError {
    /// Invalid controller settings (or a model without a calibration table) are the caller's.
    fn from(e: crate::control::controller::ControllerError) -> Self {
        ApiError::BadRequest(e.to_string())
    }
}

impl From<crate::control::ChangeError> for ApiError {
    /// An invalid change is the caller's fault (400); one that could not be persisted is the
    /// server's (500), and the live policy is unchanged either way.
    fn from(e: crate::control::ChangeError) -> Self {
        match e {
            crate::control::ChangeError::Invalid(e) => ApiError::BadRequest(e.to_string()),
            crate::control::ChangeError::NotPersisted(why) => ApiError::Internal(why),
            crate::control::ChangeError::Managed(why) => ApiError::Conflict(why),
        }
    }
}
