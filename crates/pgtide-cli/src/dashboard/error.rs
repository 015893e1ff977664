//! Errors as JSON (`{"error": "..."}`) with a status that says whose fault it is: 4xx for what
//! the request got wrong, 5xx only for the database or this process.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::error::{self as cli_error, CliError};

/// A failed request.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) message: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    pub(crate) fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, message)
    }

    pub(crate) fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, message)
    }
}

/// The CLI's errors carry an exit code that already classifies them.
impl From<CliError> for ApiError {
    fn from(e: CliError) -> ApiError {
        let status = match e.code {
            cli_error::USAGE => StatusCode::BAD_REQUEST,
            cli_error::NOT_FOUND => StatusCode::NOT_FOUND,
            cli_error::EXISTS => StatusCode::CONFLICT,
            _ => StatusCode::BAD_GATEWAY,
        };
        ApiError::new(status, e.message)
    }
}

impl From<pgtide::Error> for ApiError {
    fn from(e: pgtide::Error) -> ApiError {
        CliError::from(e).into()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(status = %self.status, error = %self.message, "pgtide dashboard: request failed");
        }
        (self.status, Json(json!({ "error": self.message }))).into_response()
    }
}

/// An extractor's rejection (a malformed path, query or body) as a JSON 4xx.
pub(crate) fn rejection(r: impl IntoResponse + std::fmt::Display) -> ApiError {
    let message = r.to_string();
    let status = r.into_response().status();
    // Rejections are the client's fault; never let one read as a server error.
    let status = if status.is_client_error() {
        status
    } else {
        StatusCode::BAD_REQUEST
    };
    ApiError::new(status, message)
}
