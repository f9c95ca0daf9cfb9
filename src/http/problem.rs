//! RFC 7807 `application/problem+json` answers, shaped as T8 `ProblemDetails`, for every
//! refusal on either listener.

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::t8::ProblemDetails;

/// An RFC 7807 answer with a machine-readable `cause`.
pub(crate) fn problem_response(status: StatusCode, cause: &str, detail: String) -> Response {
    let body = ProblemDetails {
        problem_type: Some("about:blank".into()),
        title: status.canonical_reason().map(str::to_string),
        status: Some(status.as_u16()),
        detail: Some(detail),
        cause: Some(cause.to_string()),
        ..Default::default()
    };
    let json = serde_json::to_vec(&body).unwrap_or_default();
    (
        status,
        [(header::CONTENT_TYPE, "application/problem+json")],
        json,
    )
        .into_response()
}

/// 405 for a method a path does not serve (axum adds the `Allow` header).
pub(crate) async fn method_not_allowed() -> Response {
    problem_response(
        StatusCode::METHOD_NOT_ALLOWED,
        "METHOD_NOT_ALLOWED",
        "this path does not serve this method (see Allow)".into(),
    )
}
