//! The upgrade of one accepted socket: TLS (for `wss://`), then the WebSocket handshake
//! with the admission decision — a valid token is admitted whatever its address; no valid
//! token → 401, or 429 from an auth-throttled address (counted against the address either
//! way); no place under `max_connections` → 503.
//!
//! Runs under the caller's handshake timeout and handshake permit (`connection.rs`,
//! `listener.rs`); owns nothing once the connection is up except its [`Slot`].

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{header, HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::WebSocketStream;

use super::auth::Permissions;
use super::connection::Shared;
use super::stream::{BotStream, FrameWatch};

/// A bot's WebSocket, over the watched plain or TLS stream.
pub type Ws = WebSocketStream<FrameWatch<BotStream>>;

/// One held place under `max_connections`; given back on drop.
pub struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(counter: &Arc<AtomicUsize>, max: usize) -> Option<Slot> {
        counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(counter.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A successful upgrade: what the token may do, and its place under the cap.
pub struct Admitted {
    pub perms: Permissions,
    pub slot: Slot,
}

/// Why a handshake did not produce a connection (the `reason` label of its metric).
pub enum HandshakeFailure {
    Tls(std::io::Error),
    /// Already answered with an HTTP error and counted by [`admit`].
    Refused,
    WebSocket(WsError),
}

pub async fn handshake(
    shared: &Shared,
    tcp: TcpStream,
    peer: SocketAddr,
) -> Result<(Ws, Admitted), HandshakeFailure> {
    let stream = match &shared.tls {
        Some(acceptor) => BotStream::Tls(Box::new(
            acceptor.accept(tcp).await.map_err(HandshakeFailure::Tls)?,
        )),
        None => BotStream::Plain(tcp),
    };
    let timeout = Duration::from_millis(shared.config.message_timeout_ms.max(1));
    let watched = FrameWatch::new(stream, timeout);
    let mut admitted = None;
    // The callback's signature is tungstenite's; its large `Err` is built only on refusal.
    #[allow(clippy::result_large_err)]
    let callback = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        admitted = Some(admit(shared, peer.ip(), req)?);
        Ok(resp)
    };
    let accepted =
        tokio_tungstenite::accept_hdr_async_with_config(watched, callback, Some(shared.ws_config))
            .await;
    match (accepted, admitted) {
        (Ok(ws), Some(a)) => Ok((ws, a)),
        (Err(WsError::Http(_)), _) => Err(HandshakeFailure::Refused),
        (Err(e), _) => Err(HandshakeFailure::WebSocket(e)),
        // Unreachable: tungstenite upgrades only after the callback said yes.
        (Ok(_), None) => Err(HandshakeFailure::Refused),
    }
}

/// Decides on an upgrade request: a valid token is always admitted (even from an address
/// in cooldown: behind a NAT, others' bad tokens must not lock a legitimate bot out); a bad
/// token gets 429 from an address in cooldown, else 401, and counts against the address
/// either way; no slot left → 503.
#[allow(clippy::result_large_err)]
fn admit(shared: &Shared, ip: IpAddr, req: &Request) -> Result<Admitted, ErrorResponse> {
    let now = Instant::now();
    // The token is looked at first (a constant-time comparison, no I/O): the throttle only
    // decides how a refusal is answered.
    let Some(perms) = shared.tokens.check(req) else {
        let blocked = shared.throttle.blocked(ip, now);
        if shared.throttle.failed(ip, now) {
            crate::metrics::bot_auth_cooldown();
            tracing::warn!(peer = %ip, "bot authentication failed repeatedly; address in cooldown");
        }
        if let Some(left) = blocked {
            crate::metrics::bot_handshake_refused("auth_throttled");
            return Err(refusal(
                StatusCode::TOO_MANY_REQUESTS,
                "too many failed authentications; retry later",
                Some((header::RETRY_AFTER, left.as_secs().max(1).to_string())),
            ));
        }
        crate::metrics::bot_request_refused("unauthorized");
        crate::metrics::bot_handshake_refused("unauthorized");
        return Err(refusal(
            StatusCode::UNAUTHORIZED,
            "missing or invalid token",
            Some((header::WWW_AUTHENTICATE, "Bearer".into())),
        ));
    };
    let Some(slot) = Slot::take(&shared.connections, shared.max_connections) else {
        crate::metrics::bot_handshake_refused("max_connections");
        return Err(refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many bot connections; retry later",
            None,
        ));
    };
    Ok(Admitted { perms, slot })
}

/// An HTTP error answer to an upgrade request.
fn refusal(
    status: StatusCode,
    body: &str,
    extra: Option<(header::HeaderName, String)>,
) -> ErrorResponse {
    let mut resp = ErrorResponse::new(Some(body.to_string()));
    *resp.status_mut() = status;
    if let Some((name, value)) = extra {
        if let Ok(v) = HeaderValue::from_str(&value) {
            resp.headers_mut().insert(name, v);
        }
    }
    resp
}
