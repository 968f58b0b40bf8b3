//! Redis pub/sub transport (PROTOCOL §3): the publishing side, the subscribing side, the
//! latest-value store and the startup check.
//!
//! - [`RedisPublisher`] ([`publisher`]): a bounded queue in front of one multiplexed
//!   connection; batches whatever is queued into one pipeline of `PUBLISH {p}{channel}`,
//!   plus `SET {p}last:{channel}` (ticker, candle) and `SET {p}snapshot:{channel}` (book
//!   snapshots, and a periodic refresh from the books it keeps); for durable channels
//!   [`stream_writer`] appends with the [`append`] script instead of `PUBLISH` and keeps
//!   their envelopes in a bounded buffer ([`stream_buffer`]) while Redis is unreachable.
//! - [`RedisSubscriber`] ([`subscriber`]): its own pub/sub connection that follows the
//!   gateway's [`Interest`](super::Interest), self-filters, counts lost and duplicate
//!   envelopes, and proves the subscription alive with a probe.
//! - [`RedisStore`] ([`store`]): `GET` of the latest-value keys for late joiners.
//! - [`stream_store`]: the same store reading durable channels' streams (`since` replay).
//! - [`check_connection`]: one `PING` at start, so an unreachable Redis is a clear error.
//! - [`client`]: the one place a [`Client`] is built from the config (URL with optional
//!   ACL user and password, `rediss://` with `tls_ca_file` / `tls_cert_file` /
//!   `tls_key_file`), so every connection of every role authenticates the same way.
//! - [`target`]: where connections go ([`Target`]): the fixed `url`, or the master Redis
//!   Sentinel names, resolved afresh on every (re)connect so failovers are followed.
//! - [`error`]: what a Redis failure means ([`RedisFailure`]) and the policy for it.
//! - [`interest`]: the bots' interest as Redis subscriptions, bounded by `max_patterns`.
//! - [`StreamConsumer`] ([`streams`]): durable channels read from Redis Streams with a
//!   consumer group on a dedicated connection; acked after fan-out, retried,
//!   dead-lettered, claimed from idle peers, trim gaps announced.
//!
//! Every connection here reconnects by itself with exponential backoff and jitter between
//! `reconnect_min_ms` and `reconnect_max_ms`; the details are listed in each submodule.
//! This module never imports `gateway` or `exchange`.

use std::time::Duration;

use ::redis::aio::MultiplexedConnection;
use ::redis::{AsyncConnectionConfig, Client, ClientTlsConfig, TlsCertificates};
use backon::{BackoffBuilder, ExponentialBuilder};

use super::BusError;
use crate::config::RedisConfig;
use crate::event::Channel;

pub mod append;
pub mod dead_letters;
pub mod error;
pub mod interest;
pub mod publisher;
pub mod store;
pub mod stream_admin;
pub mod stream_buffer;
pub mod stream_monitor;
pub mod stream_store;
pub mod stream_writer;
pub mod streams;
pub mod subscriber;
pub mod target;

pub use error::{Recovery, RedisFailure};
pub use publisher::RedisPublisher;
pub use store::RedisStore;
pub use stream_writer::StreamSetup;
pub use streams::StreamConsumer;
pub use subscriber::RedisSubscriber;
pub use target::{MasterAddr, Target, TargetError};

#[cfg(test)]
mod live_tests;

/// Pub/sub channel name of `channel`: `{p}{channel}`.
pub fn channel_key(prefix: &str, channel: &Channel) -> String {
    format!("{prefix}{channel}")
}

/// Latest-value key of a ticker or candle channel: `{p}last:{channel}`.
pub fn last_key(prefix: &str, channel: &Channel) -> String {
    format!("{prefix}last:{channel}")
}

/// Book snapshot key: `{p}snapshot:{channel}`.
pub fn snapshot_key(prefix: &str, channel: &Channel) -> String {
    format!("{prefix}snapshot:{channel}")
}

/// The Redis client every connection of this process uses: publisher, subscriber, store,
/// startup check and `/health/redis`.
///
/// The URL carries the ACL user and password (`redis://user:pass@host:port/db`; redis-rs
/// sends `AUTH user pass` on every new connection). `rediss://` is TLS (rustls): with
/// `tls_ca_file` the server must chain to that CA (and only to it), else to the public web
/// PKI roots; `tls_cert_file` + `tls_key_file` add a client certificate. Files are read
/// here, once per client, so a missing or bad file is an error at start.
pub fn client(config: &RedisConfig) -> Result<Client, BusError> {
    client_for(config, &config.url)
}

/// [`client`] for another URL with the same TLS files: a Sentinel-named master (`url`'s
/// host and port replaced) or a sentinel itself (see [`target`]).
pub(crate) fn client_for(config: &RedisConfig, url: &str) -> Result<Client, BusError> {
    let fail = |reason: String| BusError::Unreachable {
        url: redact(url),
        reason,
    };
    let read = |key: &str, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| fail(format!("redis.{key} `{}`: {e}", path.display())))
    };
    let tls_files = config.tls_ca_file.is_some()
        || config.tls_cert_file.is_some()
        || config.tls_key_file.is_some();
    if !tls_files || !url.starts_with("rediss://") {
        return Client::open(url).map_err(|e| fail(e.to_string()));
    }
    let root_cert = match &config.tls_ca_file {
        Some(path) => Some(read("tls_ca_file", path)?),
        None => None,
    };
    let client_tls = match (&config.tls_cert_file, &config.tls_key_file) {
        (Some(cert), Some(key)) => Some(ClientTlsConfig {
            client_cert: read("tls_cert_file", cert)?,
            client_key: read("tls_key_file", key)?,
        }),
        (None, None) => None,
        _ => {
            return Err(fail(
                "redis.tls_cert_file and redis.tls_key_file go together".into(),
            ))
        }
    };
    Client::build_with_tls(
        url,
        TlsCertificates {
            client_tls,
            root_cert,
        },
    )
    .map_err(|e| fail(e.to_string()))
}

/// Checks once that Redis (with Sentinel: the master the sentinels name) answers `PING`
/// within `timeout`, with the credentials and TLS settings of `config`.
///
/// Used at start so an unreachable Redis becomes one clear line rather than a retry loop.
pub async fn check_connection(config: &RedisConfig, timeout: Duration) -> Result<(), BusError> {
    let target = Target::new(config, "check")?;
    let unreachable = |reason: String| BusError::Unreachable {
        url: target.describe(),
        reason,
    };
    // Sentinel: the sentinels are asked and the named master's role checked first.
    let attempt = async {
        let (mut conn, _) = target.connect().await?;
        ::redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map_err(TargetError::from)
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(unreachable(e.to_string())),
        Err(_) => Err(unreachable(format!(
            "no answer within {} ms",
            timeout.as_millis()
        ))),
    }
}

/// A multiplexed connection whose connect and every reply are bounded by `timeout`, so a
/// dead server turns into an error (and a reconnect) instead of a hang.
pub(crate) async fn connect(
    client: &Client,
    timeout: Duration,
) -> ::redis::RedisResult<MultiplexedConnection> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(timeout)
        .set_response_timeout(timeout);
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
}

/// Reconnect delays: exponential from `reconnect_min_ms` to `reconnect_max_ms`, with jitter
/// so many instances restarted together do not reconnect in lockstep. Never ends.
pub(crate) fn backoff(config: &RedisConfig) -> impl Iterator<Item = Duration> + Send {
    let min = Duration::from_millis(config.reconnect_min_ms);
    let max = Duration::from_millis(config.reconnect_max_ms.max(config.reconnect_min_ms));
    // backon's jitter turns a delay d into a random one in [d, 2d]: grow the base only to
    // max/2 so the jittered delay still spreads out (rather than pinning) at the ceiling.
    ExponentialBuilder::new()
        .with_min_delay(min)
        .with_max_delay((max / 2).max(min))
        .with_jitter()
        .without_max_times()
        .build()
        .map(move |d| d.clamp(min, max))
}

/// How long one connect or command may take before the connection counts as dead.
pub(crate) fn io_timeout(config: &RedisConfig) -> Duration {
    Duration::from_millis(config.probe_timeout_ms.max(100))
}

/// `url` without its password, for logs and error messages.
pub(crate) fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_stays_within_bounds() {
        let config = RedisConfig {
            reconnect_min_ms: 10,
            reconnect_max_ms: 200,
            ..RedisConfig::default()
        };
        let delays: Vec<Duration> = backoff(&config).take(20).collect();
        assert_eq!(delays.len(), 20, "the iterator never ends");
        assert!(delays
            .iter()
            .all(|d| *d >= Duration::from_millis(10) && *d <= Duration::from_millis(200)));
        assert!(
            delays[19] >= Duration::from_millis(100),
            "grows to the ceiling: {delays:?}"
        );
    }

    #[test]
    fn redact_hides_passwords_only() {
        assert_eq!(redact("redis://:secret@h:1/0"), "redis://:***@h:1/0");
        assert_eq!(
            redact("redis://127.0.0.1:6379/0"),
            "redis://127.0.0.1:6379/0"
        );
    }

    #[tokio::test]
    async fn check_connection_reports_an_unreachable_server_in_one_line() {
        // Bind then drop a listener: nothing listens on that port any more.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("redis://127.0.0.1:{port}/0");
        let config = RedisConfig {
            url: url.clone(),
            ..RedisConfig::default()
        };
        let err = check_connection(&config, Duration::from_millis(500))
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(text.contains(&url), "{text}");
        assert!(!text.contains('\n'), "{text}");
    }

    #[tokio::test]
    async fn check_connection_succeeds_against_a_server() {
        let server = crate::bus::redis_test_server::RedisTestServer::start();
        let config = RedisConfig {
            url: server.url(),
            ..RedisConfig::default()
        };
        check_connection(&config, Duration::from_secs(2))
            .await
            .unwrap();
    }
}
