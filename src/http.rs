//! The admin HTTP listener: `/metrics`, `/health`, `/health/redis` (PROTOCOL §6).
//!
//! It only reads what `app` hands it: the health registry, the Prometheus render handle and,
//! for roles that use Redis, a Redis [`Target`] to measure a round trip. It never reaches into
//! the roles themselves.

use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::bus::redis::{Target, TargetError};
use crate::health::Health;

/// What the admin endpoints read.
#[derive(Clone)]
pub struct AdminState {
    pub instance: String,
    pub role: &'static str,
    pub health: Health,
    pub metrics: PrometheusHandle,
    /// Present when this role talks to Redis: resolved per request, so with Sentinel the
    /// round trip is measured against the current master.
    pub redis: Option<Target>,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .route("/health/redis", get(health_redis))
        .with_state(state)
}

/// Serves the admin endpoints on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

async fn metrics(State(state): State<AdminState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

async fn health(State(state): State<AdminState>) -> Response {
    let components = state.health.report();
    let healthy = components.values().all(|c| c.healthy);
    let code = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": if healthy { "ok" } else { "unhealthy" },
        "instance": state.instance,
        "role": state.role,
        "components": components,
    });
    (code, Json(body)).into_response()
}

async fn health_redis(State(state): State<AdminState>) -> Response {
    let Some(target) = state.redis.clone() else {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({"error": "this role does not use Redis"})),
        )
            .into_response();
    };
    let components: serde_json::Map<String, serde_json::Value> = state
        .health
        .report()
        .into_iter()
        .filter(|(name, _)| name.starts_with("redis"))
        .map(|(name, c)| (name, json!(c)))
        .collect();
    // Connect, then time one PING on its own: the round trip, not the handshake.
    let ping = tokio::time::timeout(Duration::from_secs(2), async {
        let (mut conn, _) = target.connect().await?;
        let started = Instant::now();
        redis::cmd("PING").query_async::<String>(&mut conn).await?;
        Ok::<_, TargetError>(started.elapsed())
    })
    .await;
    let (ok, rtt_us, error) = match ping {
        Ok(Ok(rtt)) => (true, Some(rtt.as_micros() as u64), None),
        Ok(Err(e)) => (false, None, Some(e.to_string())),
        Err(_) => (
            false,
            None,
            Some("no answer to PING within 2 s".to_string()),
        ),
    };
    let healthy = ok && components.values().all(|c| c["healthy"] == true);
    let code = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "connected": ok,
        "rtt_us": rtt_us,
        "error": error,
        "connections": components,
    });
    (code, Json(body)).into_response()
}
