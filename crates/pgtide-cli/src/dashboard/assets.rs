//! The page and its files, compiled into the binary: nothing is fetched from elsewhere and
//! nothing is built at run time. uPlot is vendored unchanged (see `assets/uplot/README.md`).

use axum::extract::rejection::PathRejection;
use axum::extract::Path;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;

const INDEX: &str = include_str!("assets/index.html");

/// (name, content type, content) of every file under `/assets/`.
const FILES: &[(&str, &str, &str)] = &[
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("assets/app.js"),
    ),
    (
        "app.css",
        "text/css; charset=utf-8",
        include_str!("assets/app.css"),
    ),
    (
        "uPlot.iife.min.js",
        "text/javascript; charset=utf-8",
        include_str!("assets/uplot/uPlot.iife.min.js"),
    ),
    (
        "uPlot.min.css",
        "text/css; charset=utf-8",
        include_str!("assets/uplot/uPlot.min.css"),
    ),
];

/// `GET /`.
pub(crate) async fn index() -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], INDEX).into_response()
}

/// `GET /assets/{file}`: only the names above; anything else is 404.
pub(crate) async fn file(name: Result<Path<String>, PathRejection>) -> Response {
    let Ok(Path(name)) = name else {
        return ApiError::not_found("no such file").into_response();
    };
    match FILES.iter().find(|(n, _, _)| *n == name) {
        Some((_, content_type, body)) => {
            ([(header::CONTENT_TYPE, *content_type)], *body).into_response()
        }
        None => ApiError::not_found("no such file").into_response(),
    }
}
