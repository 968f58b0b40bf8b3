//! The `/_sim/` control API every simulated venue serves, venue-neutral: the routes, their
//! query parameters and answers (`{"ok":true}`), and the pause rule. A venue implements
//! [`Control`] with what each switch means on its wire (Binance: a withheld depth diff;
//! Coinbase: a skipped `sequence_num`) and renders its own errors and book.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

/// What the control API asks of a simulated venue.
pub(crate) trait Control: Send + Sync + 'static {
    /// Drops every WebSocket connection now.
    fn drop_all(&self);
    /// One sequence gap (`symbol` from the query, for venues whose gaps are per book);
    /// the venue's error answer when it cannot.
    fn gap(&self, symbol: Option<&str>) -> Option<Response>;
    /// One malformed message to every connection.
    fn malformed(&self);
    /// Stops (or restarts) the market; when this returns with `true`, nothing moves.
    fn set_paused(&self, paused: bool);
    /// The full book of `symbol`, as the venue renders it.
    fn book(&self, symbol: Option<&str>) -> Response;
    /// Counters, as a JSON object.
    fn stats(&self) -> Value;
}

fn ok() -> Response {
    Json(json!({ "ok": true })).into_response()
}

type Q = Query<HashMap<String, String>>;

async fn drop_all<C: Control>(State(c): State<Arc<C>>) -> Response {
    c.drop_all();
    ok()
}

async fn gap<C: Control>(State(c): State<Arc<C>>, Query(q): Q) -> Response {
    c.gap(q.get("symbol").map(String::as_str))
        .unwrap_or_else(ok)
}

async fn malformed<C: Control>(State(c): State<Arc<C>>) -> Response {
    c.malformed();
    ok()
}

async fn pause<C: Control>(State(c): State<Arc<C>>) -> Response {
    c.set_paused(true);
    ok()
}

async fn resume<C: Control>(State(c): State<Arc<C>>) -> Response {
    c.set_paused(false);
    ok()
}

async fn book<C: Control>(State(c): State<Arc<C>>, Query(q): Q) -> Response {
    c.book(q.get("symbol").map(String::as_str))
}

async fn stats<C: Control>(State(c): State<Arc<C>>) -> Response {
    Json(c.stats()).into_response()
}

/// `POST /_sim/drop`, `/_sim/gap[?symbol=]`, `/_sim/malformed`, `/_sim/pause`,
/// `/_sim/resume`; `GET /_sim/book?symbol=`, `/_sim/stats`.
pub(crate) fn routes<C: Control>(venue: Arc<C>) -> Router {
    Router::new()
        .route("/_sim/drop", post(drop_all::<C>))
        .route("/_sim/gap", post(gap::<C>))
        .route("/_sim/malformed", post(malformed::<C>))
        .route("/_sim/pause", post(pause::<C>))
        .route("/_sim/resume", post(resume::<C>))
        .route("/_sim/book", get(book::<C>))
        .route("/_sim/stats", get(stats::<C>))
        .with_state(venue)
}
