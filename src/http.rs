//! The admin HTTP listener: `/metrics`, `/health`, `/health/redis` (PROTOCOL §6), and the
//! live status page (`/`, [`crate::status`]), and the durable-stream admin endpoints
//! (`/api/streams…`, [`streams`]).
//!
//! It only reads what `app` hands it: the health registry, the Prometheus render handle and,
//! for roles that use Redis, a Redis [`Target`] to measure a round trip. It never reaches into
//! the roles themselves.
//!
//! It cannot be exhausted by clients that connect and never finish (slowloris): our own
//! accept loop (not `axum::serve`, which has no header timeout) serves each connection with
//! hyper's HTTP/1 server, whose `header_read_timeout` closes a connection whose request
//! head has not arrived within `[http] header_timeout_ms`. A connection serves one request
//! (no keep-alive) and lives at most `header_timeout_ms + request_timeout_ms`, so a client
//! that never reads the answer lets go too; each handler answers within
//! `request_timeout_ms` (503 otherwise). At most `[http] max_connections` are served at
//! once; one more is closed at accept (counted), so the admin port can never take more
//! than that many file descriptors from the bot listener. With `[http] token` set, every
//! endpoint wants `Authorization: Bearer <token>` (401 otherwise).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::bus::redis::{Target, TargetError};
use crate::config::HttpConfig;
use crate::health::Health;
use crate::metrics;

pub mod streams;

/// How long a connection may take to finish its response once shutdown began.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);
/// Pause after a failed accept (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The admin listener's limits, from `[http]`.
#[derive(Clone, Debug)]
pub struct AdminLimits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub request_timeout: Duration,
    /// `Authorization: Bearer <token>` wanted on every endpoint when set.
    pub token: Option<Arc<str>>,
}

impl AdminLimits {
    pub fn from_config(http: &HttpConfig) -> AdminLimits {
        AdminLimits {
            max_connections: http.max_connections.max(1),
            header_timeout: Duration::from_millis(http.header_timeout_ms.max(1)),
            request_timeout: Duration::from_millis(http.request_timeout_ms.max(1)),
            token: http.token.as_deref().map(Arc::from),
        }
    }
}

impl Default for AdminLimits {
    fn default() -> Self {
        AdminLimits::from_config(&HttpConfig::default())
    }
}

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
    pub limits: AdminLimits,
    /// `/api/streams…`; `None` for roles without Redis (they answer 404).
    pub streams: Option<Arc<streams::StreamsAdmin>>,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(render_metrics))
        .route("/health", get(health))
        .route("/health/redis", get(health_redis))
        .merge(crate::status::routes())
        .merge(streams::routes())
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

/// Serves the admin endpoints on `listener` until `shutdown` (limits: see the module doc).
pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let limits = state.limits.clone();
    let app = router(state);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut conns = JoinSet::new();
    let mut accept_errors = 0u64;
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            r = listener.accept() => match r {
                Ok((stream, _peer)) => stream,
                Err(e) => {
                    // EMFILE/ENFILE and friends: the listener itself is fine, wait and retry.
                    accept_errors += 1;
                    if accept_errors == 1 || accept_errors % 1000 == 0 {
                        warn!(cause = %e, count = accept_errors, "admin HTTP: accept failed");
                    }
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Closed at once: a connection over the cap costs nothing beyond this accept.
            metrics::admin_connection_refused();
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let stop = shutdown.clone();
        let header_timeout = limits.header_timeout;
        let lifetime = limits.header_timeout + limits.request_timeout;
        conns.spawn(async move {
            let _slot = slot;
            metrics::admin_connections(1.0);
            let mut builder = hyper::server::conn::http1::Builder::new();
            // One request per connection: nothing waits between requests, and a request
            // body nobody reads is never drained.
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .keep_alive(false);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                // A client that reads the answer slowly, or never, lets go at the latest here.
                _ = tokio::time::sleep(lifetime) => {
                    metrics::admin_timeout("lifetime");
                    Ok(())
                }
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    tokio::time::timeout(SHUTDOWN_GRACE, conn.as_mut()).await.unwrap_or(Ok(()))
                }
            };
            if let Err(e) = result {
                if e.is_timeout() {
                    metrics::admin_timeout("header");
                }
                debug!(cause = %e, "admin HTTP connection ended with an error");
            }
            metrics::admin_connections(-1.0);
        });
    }
    drop(listener);
    // Let open connections finish what they are answering (each bounded by the grace).
    while conns.join_next().await.is_some() {}
    Ok(())
}

/// Bearer token check (when configured) and the per-request time bound.
async fn guard(State(state): State<AdminState>, req: Request, next: Next) -> Response {
    if let Some(token) = &state.limits.token {
        // A browser cannot add a header to a page it opens or to an EventSource: the
        // status page (`/`, `/api/status/stream`) may pass the token as `?token=` instead.
        let from_query = req.uri().query().and_then(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == "token")
                .map(|(_, v)| v.into_owned())
        });
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|v| v.trim().to_string())
            .or(from_query);
        if !given.is_some_and(|g| same_secret(g.as_bytes(), token.as_bytes())) {
            metrics::admin_unauthorized();
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                Json(json!({"error": "missing or wrong bearer token"})),
            )
                .into_response();
        }
    }
    match tokio::time::timeout(state.limits.request_timeout, next.run(req)).await {
        Ok(response) => response,
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": "the request was not answered in time"})),
        )
            .into_response(),
    }
}

/// Compares without an early exit, so the time taken does not tell how much matched.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn render_metrics(State(state): State<AdminState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics::render(&state.metrics),
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
    // Degraded (e.g. a consumer group behind its stream) still does its job: 200.
    let status = match (healthy, components.values().any(|c| c.degraded)) {
        (false, _) => "unhealthy",
        (true, true) => "degraded",
        (true, false) => "ok",
    };
    let body = json!({
        "status": status,
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
