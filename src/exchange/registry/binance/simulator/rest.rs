//! The simulated Binance REST market data: `GET /api/v3/depth` (with its `limit` rules and
//! error codes), `/api/v3/ping`, `/api/v3/time`, and the `{"code":..,"msg":..}` errors.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::wire::render_book;
use super::{AppState, DEPTH_DEFAULT_LIMIT, DEPTH_MAX_LIMIT};
use crate::simulator::{lock, now_ms};

/// A Binance-style `{"code":..,"msg":..}` answered with HTTP 400.
pub(super) struct ApiError {
    code: i64,
    msg: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            StatusCode::BAD_REQUEST,
            Json(json!({ "code": self.code, "msg": self.msg })),
        )
            .into_response()
    }
}

pub(super) fn api_error(code: i64, msg: &str) -> ApiError {
    ApiError {
        code,
        msg: msg.to_string(),
    }
}

pub(super) fn bad_request(code: i64, msg: &str) -> Response {
    api_error(code, msg).into_response()
}

pub(super) fn json_text(body: String) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

pub(super) fn ok() -> Response {
    Json(json!({ "ok": true })).into_response()
}

pub(super) async fn rest_depth(
    State(shared): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let Some(symbol) = q.get("symbol").filter(|s| !s.is_empty()) else {
        return bad_request(
            -1102,
            "Mandatory parameter 'symbol' was not sent, was empty/null, or malformed.",
        );
    };
    let limit = match q.get("limit") {
        None => DEPTH_DEFAULT_LIMIT,
        Some(l) => match l.parse::<usize>() {
            // Binance truncates limits above 5000 to 5000.
            Ok(n) if n >= 1 => n.min(DEPTH_MAX_LIMIT),
            _ => {
                return bad_request(
                    -1100,
                    "Illegal characters found in parameter 'limit'; legal range is '1-5000'.",
                )
            }
        },
    };
    let Some(sym) = shared.find_wire(symbol) else {
        return bad_request(-1121, "Invalid symbol.");
    };
    let delay = shared.snapshot_delay_ms.load(Ordering::Relaxed);
    if delay > 0 {
        // The snapshot is taken after the delay, as a slow request would be.
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let body = render_book(&lock(&shared.symbols[sym].market), limit);
    json_text(body)
}

pub(super) async fn rest_ping() -> Response {
    json_text("{}".into())
}

pub(super) async fn rest_time() -> Response {
    Json(json!({ "serverTime": now_ms() })).into_response()
}
