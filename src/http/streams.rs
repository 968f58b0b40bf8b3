//! The durable-stream endpoints of the admin listener (docs/protocol.md §6):
//!
//! - `GET /api/streams?cursor=&count=` — the streams of the registry `{p}streams`, a page
//!   at a time (length and dead letters of each);
//! - `GET /api/streams/{channel}` — length, first/last id, groups with their consumers,
//!   pending entries, lag, last-delivered id, dead-letter count;
//! - `GET /api/streams/{channel}/dlq?after=&count=` — dead letters with all their fields;
//! - `POST /api/streams/{channel}/dlq/requeue` with `{"id":"…"}` or `{"all":true}` — back
//!   into the stream with a new id (published too), then removed from the dead letters.
//!
//! Same token and limits as every admin endpoint (the guard in [`super`]). Errors are JSON
//! `{"error":"…"}`: 400 (bad channel, id, cursor or body), 404 (no such stream or dead
//! letter; or a role without Redis), 503 (Redis unreachable), 502 (Redis refused). Every
//! answer is bounded (pages, groups, consumers: see [`stream_admin`]). This module only
//! translates HTTP; the Redis work is [`stream_admin`]'s and [`dead_letters`]'. A
//! connection is made per request (as `/health/redis` does), so with Sentinel it always
//! goes to the current master.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::AdminState;
use crate::bus::redis::append::AppendScript;
use crate::bus::redis::dead_letters::{self, Which};
use crate::bus::redis::stream_admin::{self, AdminError};
use crate::bus::redis::Target;
use crate::config::Config;
use crate::durable::{DurablePolicy, StreamCap, StreamId};
use crate::event::Channel;

/// Page size when `count` is not given.
const DEFAULT_COUNT: usize = 20;

/// What the stream endpoints need: where Redis is, the key prefix, the caps.
pub struct StreamsAdmin {
    target: Target,
    prefix: String,
    policy: DurablePolicy,
    /// The cap of a requeue to a channel that is not durable in this instance's config.
    default_cap: StreamCap,
    script: AppendScript,
}

impl StreamsAdmin {
    /// `None` when the Redis settings do not make a client (the role starts anyway).
    pub fn new(config: &Config) -> Option<StreamsAdmin> {
        Some(StreamsAdmin {
            target: Target::new(&config.redis, "health").ok()?,
            prefix: config.redis.key_prefix.clone(),
            policy: DurablePolicy::from_config(&config.durable),
            default_cap: StreamCap {
                maxlen: config.durable.maxlen,
                approximate: config.durable.approximate,
            },
            script: AppendScript::new(),
        })
    }

    async fn conn(&self) -> Result<::redis::aio::MultiplexedConnection, AdminError> {
        let (conn, _) = self
            .target
            .connect()
            .await
            .map_err(|e| AdminError::Unavailable(e.to_string()))?;
        Ok(conn)
    }
}

pub fn routes() -> Router<AdminState> {
    Router::new()
        .route("/api/streams", get(list))
        .route("/api/streams/{channel}", get(info))
        .route("/api/streams/{channel}/dlq", get(dlq))
        .route("/api/streams/{channel}/dlq/requeue", post(requeue))
}

/// An error answer: `{"error":"…"}` with its status.
struct Failure(StatusCode, String);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.0, Json(json!({"error": self.1}))).into_response()
    }
}

impl From<AdminError> for Failure {
    fn from(e: AdminError) -> Failure {
        let code = match &e {
            AdminError::NotFound(_) | AdminError::NoDeadLetter(_) => StatusCode::NOT_FOUND,
            AdminError::WrongType(..) | AdminError::Redis(_) => StatusCode::BAD_GATEWAY,
            AdminError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        Failure(code, e.to_string())
    }
}

fn bad(message: impl Into<String>) -> Failure {
    Failure(StatusCode::BAD_REQUEST, message.into())
}

type Params = Result<Query<HashMap<String, String>>, QueryRejection>;
type Answer = Result<Json<serde_json::Value>, Failure>;

/// The admin of this role, or the 404 of a role without Redis.
fn admin(state: &AdminState) -> Result<&StreamsAdmin, Failure> {
    state
        .streams
        .as_deref()
        .ok_or_else(|| Failure(StatusCode::NOT_FOUND, "this role does not use Redis".into()))
}

fn channel(name: &str) -> Result<Channel, Failure> {
    Channel::parse(name).map_err(|e| bad(e.to_string()))
}

/// `count` of a page: 1 ..= `stream_admin::MAX_PAGE`, [`DEFAULT_COUNT`] when absent.
fn count(params: &HashMap<String, String>) -> Result<usize, Failure> {
    match params.get("count") {
        None => Ok(DEFAULT_COUNT),
        Some(c) => match c.parse::<usize>() {
            Ok(n) if (1..=stream_admin::MAX_PAGE).contains(&n) => Ok(n),
            _ => Err(bad(format!(
                "count must be 1 to {}",
                stream_admin::MAX_PAGE
            ))),
        },
    }
}

fn params(params: Params) -> Result<HashMap<String, String>, Failure> {
    params.map(|Query(p)| p).map_err(|e| bad(e.body_text()))
}

fn to_json(v: impl serde::Serialize) -> Answer {
    serde_json::to_value(v)
        .map(Json)
        .map_err(|e| Failure(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

async fn list(State(state): State<AdminState>, query: Params) -> Answer {
    let admin = admin(&state)?;
    let query = params(query)?;
    let count = count(&query)?;
    let cursor = match query.get("cursor") {
        None => 0,
        Some(c) => c
            .parse::<u64>()
            .map_err(|_| bad("cursor must be a number"))?,
    };
    let mut conn = admin.conn().await?;
    to_json(stream_admin::list(&mut conn, &admin.prefix, cursor, count).await?)
}

async fn info(State(state): State<AdminState>, Path(name): Path<String>) -> Answer {
    let admin = admin(&state)?;
    let channel = channel(&name)?;
    let mut conn = admin.conn().await?;
    to_json(stream_admin::info(&mut conn, &admin.prefix, &channel).await?)
}

async fn dlq(State(state): State<AdminState>, Path(name): Path<String>, query: Params) -> Answer {
    let admin = admin(&state)?;
    let channel = channel(&name)?;
    let query = params(query)?;
    let count = count(&query)?;
    let after = match query.get("after") {
        None => None,
        Some(a) => Some(a.parse::<StreamId>().map_err(|e| bad(e.to_string()))?),
    };
    let mut conn = admin.conn().await?;
    let page = dead_letters::dead_letters(&mut conn, &admin.prefix, &channel, after, count).await?;
    Ok(Json(json!({
        "channel": channel.as_str(),
        "dead_letters": page.dead_letters,
        "next": page.next,
        "total": page.total,
    })))
}

/// `{"id":"<dead-letter id>"}` or `{"all":true}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RequeueBody {
    id: Option<String>,
    all: Option<bool>,
}

const REQUEUE_BODY: &str = "the body must be {\"id\":\"<id>\"} or {\"all\":true}";

async fn requeue(State(state): State<AdminState>, Path(name): Path<String>, body: Bytes) -> Answer {
    let admin = admin(&state)?;
    let channel = channel(&name)?;
    let body: RequeueBody =
        serde_json::from_slice(&body).map_err(|e| bad(format!("{REQUEUE_BODY}: {e}")))?;
    let which = match (body.id, body.all) {
        (Some(id), None | Some(false)) => {
            Which::One(id.parse::<StreamId>().map_err(|e| bad(e.to_string()))?)
        }
        (None, Some(true)) => Which::All,
        _ => return Err(bad(REQUEUE_BODY)),
    };
    let cap = admin.policy.cap(&channel).unwrap_or(admin.default_cap);
    let mut conn = admin.conn().await?;
    let report = dead_letters::requeue(
        &mut conn,
        &admin.script,
        &admin.prefix,
        &channel,
        cap,
        which,
    )
    .await?;
    Ok(Json(json!({
        "channel": channel.as_str(),
        "count": report.requeued.len(),
        "requeued": report.requeued,
        "failed": report.failed,
        "remaining": report.remaining,
    })))
}
