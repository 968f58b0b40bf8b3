//! Every metric name and label mdbridge exports, in one place, with one function per fact.
//!
//! Other modules never spell a metric name: they call the function here, so a log line and
//! its counter come from one call site and the exported names stay consistent. All names
//! carry the `mdbridge_` prefix. The Prometheus recorder is installed by [`install`].
//!
//! Every series exists from start, at zero, with each label value known in advance
//! ([`init`]): alerts and dashboards can be written before the first failure, and a rate
//! over a counter that appears only at its first increment would miss that increment.
//! A new series is added in three places here: its name, `describe`, `init`.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{counter, gauge, histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::event::{EventType, Exchange};

pub mod streams;

pub const EXCHANGE_EVENTS: &str = "mdbridge_exchange_events_total";
pub const EXCHANGE_FRAMES_INVALID: &str = "mdbridge_exchange_frames_invalid_total";
pub const EXCHANGE_RECONNECTS: &str = "mdbridge_exchange_reconnects_total";
pub const EXCHANGE_CONNECTED: &str = "mdbridge_exchange_connected";
pub const BOOK_RESYNCS: &str = "mdbridge_book_resyncs_total";
pub const ENVELOPES_PUBLISHED: &str = "mdbridge_envelopes_published_total";
pub const ENVELOPES_PUBLISH_FAILED: &str = "mdbridge_envelopes_publish_failed_total";
pub const PUBLISH_BATCH: &str = "mdbridge_publish_batch_size";
pub const ENVELOPES_RECEIVED: &str = "mdbridge_envelopes_received_total";
pub const ENVELOPES_SELF_FILTERED: &str = "mdbridge_envelopes_self_filtered_total";
pub const ENVELOPES_LOST: &str = "mdbridge_envelopes_lost_total";
pub const ENVELOPES_DUPLICATE: &str = "mdbridge_envelopes_duplicate_total";
pub const ENVELOPES_INVALID: &str = "mdbridge_envelopes_invalid_total";
pub const ENVELOPES_OVERFLOW: &str = "mdbridge_envelopes_overflow_total";
pub const ENVELOPE_SEQ_ANOMALIES: &str = "mdbridge_envelope_seq_anomalies_total";

/// Every `reason` label of [`ENVELOPES_INVALID`] (`EnvelopeError::reason`, plus
/// `channel_name` from the subscriber).
pub const ENVELOPE_INVALID_REASONS: [&str; 10] = [
    "too_large",
    "id",
    "signature",
    "stale",
    "json",
    "src",
    "channel",
    "channel_name",
    "field",
    "ts",
];
/// Every `kind` label of [`ENVELOPE_SEQ_ANOMALIES`].
pub const ENVELOPE_SEQ_ANOMALY_KINDS: [&str; 2] = ["jump", "back"];
pub const REDIS_RECONNECTS: &str = "mdbridge_redis_reconnects_total";
pub const REDIS_FAILOVERS: &str = "mdbridge_redis_failovers_total";
pub const REDIS_CONNECTED: &str = "mdbridge_redis_connected";
pub const REDIS_PROBE_TIMEOUTS: &str = "mdbridge_redis_probe_timeouts_total";
pub const REDIS_ERROR_REPLIES: &str = "mdbridge_redis_error_replies_total";
pub const REDIS_SUBSCRIBED_PATTERNS: &str = "mdbridge_redis_subscribed_patterns";
pub const BOT_CLIENTS: &str = "mdbridge_bot_clients";
pub const BOT_CONNECTIONS: &str = "mdbridge_bot_connections_total";
pub const BOT_SUBSCRIPTIONS: &str = "mdbridge_bot_subscriptions";
pub const BOT_FRAMES_SENT: &str = "mdbridge_bot_frames_sent_total";
pub const BOT_FRAMES_DROPPED: &str = "mdbridge_bot_frames_dropped_total";
pub const BOT_DISCONNECTS: &str = "mdbridge_bot_disconnects_total";
pub const BOT_REQUESTS_REFUSED: &str = "mdbridge_bot_requests_refused_total";
pub const BOT_HANDSHAKES_REFUSED: &str = "mdbridge_bot_handshakes_refused_total";
pub const BOT_HANDSHAKES_FAILED: &str = "mdbridge_bot_handshakes_failed_total";
pub const BOT_AUTH_COOLDOWNS: &str = "mdbridge_bot_auth_cooldowns_total";
pub const DELIVERY_LATENCY: &str = "mdbridge_delivery_latency_seconds";
pub const EXCHANGE_SUBSCRIBE_REFUSED: &str = "mdbridge_exchange_subscribe_refused_total";
pub const ADMIN_CONNECTIONS: &str = "mdbridge_admin_connections";
pub const ADMIN_CONNECTIONS_REFUSED: &str = "mdbridge_admin_connections_refused_total";
pub const ADMIN_TIMEOUTS: &str = "mdbridge_admin_timeouts_total";
pub const ADMIN_UNAUTHORIZED: &str = "mdbridge_admin_requests_unauthorized_total";

/// Label values known in advance, for [`init`]. Call sites pass these same strings.
pub const EXCHANGE_RECONNECT_REASONS: &[&str] = &[
    "bad_url",
    "connect_failed",
    "socket_error",
    "closed",
    "stale",
    "rotate",
    "rotate_fallback",
    "server_shutdown",
    "sequence_gap",
    "book_resync",
];
pub const BOOK_RESYNC_SIDES: &[&str] = &["exchange", "bus", "bot_queue"];
pub const PUBLISH_FAILED_REASONS: &[&str] = &[
    "queue_full",
    "redis_down",
    "shutdown",
    "redis_oom",
    "redis_readonly",
    "redis_loading",
    "redis_noperm",
    "redis_noscript",
    "redis_error",
];
/// `RedisFailure::reason()` of every error-reply class (`bus::redis::error`).
pub const REDIS_FAILURE_REASONS: &[&str] = &[
    "redis_oom",
    "redis_readonly",
    "redis_loading",
    "redis_noscript",
    "redis_noperm",
    "redis_down",
    "redis_error",
];
pub const REDIS_ROLES: &[&str] = &["publish", "subscribe", "consume"];
/// Connections that follow a Sentinel failover (`bus::redis::target`).
pub const REDIS_FAILOVER_ROLES: [&str; 5] = ["publish", "subscribe", "store", "health", "consume"];
pub const ADMIN_TIMEOUT_KINDS: &[&str] = &["header", "lifetime"];
pub const BOT_FRAMES_DROPPED_REASONS: &[&str] = &["queue_full"];
pub const BOT_DISCONNECT_REASONS: &[&str] = &[
    "closed",
    "timeout",
    "slow",
    "shutdown",
    "error",
    "too_big",
    "bad_utf8",
    "message_timeout",
    "flood",
    "protocol",
];
pub const BOT_HANDSHAKE_REFUSED_REASONS: &[&str] =
    &["unauthorized", "auth_throttled", "max_connections"];
pub const BOT_HANDSHAKE_FAILED_REASONS: &[&str] = &["timeout", "tls", "websocket"];
pub const BOT_REFUSED_CODES: &[&str] = &[
    "bad_json",
    "bad_request",
    "unknown_op",
    "bad_channel",
    "not_subscribed",
    "too_many_subscriptions",
    "not_supported",
    "unauthorized",
    "rate_limited",
    "forbidden",
];
pub const ROUTER_CHANNELS: &str = "mdbridge_router_channels";
pub const STORE_VALUES_REFUSED: &str = "mdbridge_store_values_refused_total";
pub const STORE_FETCHES: &str = "mdbridge_store_fetches_total";
pub const BUS_DOWN_NOTICES: &str = "mdbridge_bus_down_total";
pub const ROUTER_WILDCARD_OVERFLOW: &str = "mdbridge_router_wildcard_overflow_total";
pub const STREAM_GROUPS_REMOVED: &str = "mdbridge_stream_groups_removed_total";
pub const STREAM_REPLAYED: &str = "mdbridge_stream_replayed_total";
pub const STREAM_REPLAYS: &str = "mdbridge_stream_replays_total";
/// Every `outcome` label of [`STREAM_REPLAYS`].
pub const STREAM_REPLAY_OUTCOMES: [&str; 3] = ["recovered", "truncated", "failed"];
pub const STREAM_DELIVERED: &str = "mdbridge_stream_delivered_total";
pub const STREAM_ACKED: &str = "mdbridge_stream_acked_total";
pub const STREAM_RETRIES: &str = "mdbridge_stream_retries_total";
pub const STREAM_CLAIMED: &str = "mdbridge_stream_claimed_total";
pub const STREAM_DEAD_LETTERS: &str = "mdbridge_stream_dead_letters_total";
pub const STREAM_TRIMMED: &str = "mdbridge_stream_trimmed_total";
pub const STREAM_REDELIVERIES_DROPPED: &str = "mdbridge_stream_redeliveries_dropped_total";
pub const STREAM_APPENDED: &str = "mdbridge_stream_appended_total";
pub const STREAM_BUFFERED_BYTES: &str = "mdbridge_stream_buffered_bytes";
pub const STREAM_BUFFER_DROPPED: &str = "mdbridge_stream_buffer_dropped_total";
pub const STREAM_PUBLISH_WAITS: &str = "mdbridge_stream_publish_waits_total";

/// Installs the process-wide Prometheus recorder once and returns its render handle.
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(DELIVERY_LATENCY.to_string()),
                    &[
                        0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
                        0.05, 0.1, 0.25, 1.0,
                    ],
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(PUBLISH_BATCH.to_string()),
                        &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0],
                    )
                });
            let recorder = match builder {
                Ok(b) => b.build_recorder(),
                Err(_) => PrometheusBuilder::new().build_recorder(),
            };
            let handle = recorder.handle();
            // A second recorder (e.g. tests embedding the library) keeps the first one.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            init();
            spawn_upkeep(handle.clone());
            handle
        })
        .clone()
}

/// Histograms keep every raw sample until they are folded into buckets, which happens on
/// a scrape or on upkeep. Without a scraper, the per-frame latency samples would grow
/// without bound (megabytes per second under load), so a thread folds them every 5 s.
fn spawn_upkeep(handle: PrometheusHandle) {
    let spawned = std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || loop {
            std::thread::sleep(UPKEEP_EVERY);
            handle.run_upkeep();
        });
    if let Err(e) = spawned {
        tracing::warn!(cause = %e, "cannot start the metrics upkeep thread; histograms grow until scraped");
    }
}

const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// The router's and the store's series exist from start (zero), so alerts can be written
/// before the first event.
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        EXCHANGE_EVENTS,
        "Normalized events produced from exchange frames, by exchange and type."
    );
    describe_counter!(
        EXCHANGE_FRAMES_INVALID,
        "Exchange frames that could not be parsed (skipped)."
    );
    describe_counter!(
        EXCHANGE_RECONNECTS,
        "Exchange WebSocket reconnects, by exchange and reason."
    );
    describe_gauge!(
        EXCHANGE_CONNECTED,
        "Exchange sockets connected and subscribed (one per feed, or per shard of a large feed)."
    );
    describe_counter!(
        BOOK_RESYNCS,
        "Order book resynchronisations, by exchange and where the gap was seen."
    );
    describe_counter!(ENVELOPES_PUBLISHED, "Envelopes published to Redis.");
    describe_counter!(
        ENVELOPES_PUBLISH_FAILED,
        "Envelopes that could not be published (Redis down or queue full)."
    );
    describe_histogram!(
        PUBLISH_BATCH,
        "Envelopes per Redis pipeline sent by the publisher."
    );
    describe_counter!(ENVELOPES_RECEIVED, "Envelopes received from Redis pub/sub.");
    describe_counter!(
        ENVELOPES_SELF_FILTERED,
        "Envelopes from Redis dropped because this instance published them."
    );
    describe_counter!(
        ENVELOPES_LOST,
        "Envelopes missing from a (src, channel) sequence: lost by pub/sub (gaps up to 100 000, counted once confirmed)."
    );
    describe_counter!(
        ENVELOPES_DUPLICATE,
        "Envelopes received twice (overlapping patterns) and dropped."
    );
    describe_counter!(
        ENVELOPES_INVALID,
        "Envelopes from Redis (pub/sub or latest-value keys) refused, by reason: too_large, signature, stale, json, src, channel, channel_name, field, ts."
    );
    describe_counter!(
        ENVELOPE_SEQ_ANOMALIES,
        "Envelopes whose seq does not fit their (src, channel) stream, by kind: jump (far ahead) or back (a step back; dropped when signed)."
    );
    describe_counter!(REDIS_RECONNECTS, "Redis reconnects, by connection role.");
    describe_counter!(
        REDIS_FAILOVERS,
        "Sentinel failovers followed (reconnected to a newly named master), by connection role."
    );
    describe_gauge!(
        REDIS_CONNECTED,
        "1 while the Redis connection of this role is up."
    );
    describe_counter!(
        REDIS_PROBE_TIMEOUTS,
        "Liveness probes that did not come back through the subscription."
    );
    describe_counter!(
        REDIS_ERROR_REPLIES,
        "Redis error replies that did not end the connection (OOM, LOADING, NOPERM...), by role and reason."
    );
    describe_gauge!(
        REDIS_SUBSCRIBED_PATTERNS,
        "PSUBSCRIBE patterns the subscriber holds (bounded by redis.max_patterns)."
    );
    describe_gauge!(BOT_CLIENTS, "Connected bot clients.");
    describe_counter!(BOT_CONNECTIONS, "Bot connections accepted since start.");
    describe_gauge!(
        BOT_SUBSCRIPTIONS,
        "Active bot subscriptions (patterns), over all clients."
    );
    describe_counter!(BOT_FRAMES_SENT, "Frames written to bot sockets.");
    describe_counter!(
        BOT_FRAMES_DROPPED,
        "Frames dropped for slow bots, by reason."
    );
    describe_counter!(BOT_DISCONNECTS, "Bot disconnects, by reason.");
    describe_counter!(
        BOT_REQUESTS_REFUSED,
        "Bot requests answered with an error, by code."
    );
    describe_counter!(
        BOT_HANDSHAKES_REFUSED,
        "Bot upgrades refused, by reason (unauthorized 401, auth_throttled 429, max_connections 503)."
    );
    describe_counter!(
        BOT_HANDSHAKES_FAILED,
        "Bot handshakes that did not complete, by reason (timeout, tls, websocket)."
    );
    describe_counter!(
        BOT_AUTH_COOLDOWNS,
        "Addresses put in cooldown after repeated failed bot authentication."
    );
    describe_counter!(
        EXCHANGE_SUBSCRIBE_REFUSED,
        "SUBSCRIBE requests the exchange refused (the feed is unhealthy until it reconnects)."
    );
    describe_gauge!(ADMIN_CONNECTIONS, "Open admin HTTP connections.");
    describe_counter!(
        ADMIN_CONNECTIONS_REFUSED,
        "Admin HTTP connections closed at accept: http.max_connections were open."
    );
    describe_counter!(
        ADMIN_TIMEOUTS,
        "Admin HTTP connections closed for taking too long, by what: `header` (request head not in time) or `lifetime`."
    );
    describe_counter!(
        ADMIN_UNAUTHORIZED,
        "Admin HTTP requests refused with 401 (missing or wrong bearer token)."
    );
    describe_gauge!(
        ROUTER_CHANNELS,
        "Channels the bot router holds state for (subscribed ones; plus, without a store or for a hybrid's own feeds, every channel seen)."
    );
    describe_counter!(
        STORE_VALUES_REFUSED,
        "last:/snapshot:/booklog: values refused by the executor, by reason (oversize: not transferred; invalid: not an envelope of that channel)."
    );
    describe_counter!(
        STORE_FETCHES,
        "Latest-value / book snapshot lookups by the router, by result (found, missing, error)."
    );
    describe_counter!(
        BUS_DOWN_NOTICES,
        "Times the router saw the Redis bus go down and told the bots of affected channels."
    );
    describe_counter!(
        ROUTER_WILDCARD_OVERFLOW,
        "Messages on channels only wildcards matched, passed on without router state because the cap on such channels was reached (books: dropped)."
    );
    describe_counter!(
        STREAM_GROUPS_REMOVED,
        "Consumer groups of durable streams destroyed because none of their consumers was seen for durable.group_idle_gc_ms."
    );
    describe_counter!(
        STREAM_REPLAYED,
        "Stream entries replayed to bots that subscribed with `since`."
    );
    describe_counter!(
        STREAM_REPLAYS,
        "`since` replays finished, by outcome: recovered, truncated (history_truncated, then what the stream held), failed (replay_failed)."
    );
    describe_counter!(
        STREAM_DELIVERED,
        "Durable stream entries handed to the bot router (read, pending after a restart, claimed or retried)."
    );
    describe_counter!(
        STREAM_ACKED,
        "Durable stream entries acknowledged (XACK) after the router fanned them out."
    );
    describe_counter!(
        STREAM_RETRIES,
        "Durable stream entries that could not be handled, scheduled for another delivery."
    );
    describe_counter!(
        STREAM_CLAIMED,
        "Durable stream entries taken over from other consumers of the group (idle over claim_idle_ms)."
    );
    describe_counter!(
        STREAM_DEAD_LETTERS,
        "Durable stream entries moved to the dead-letter stream after max_deliveries."
    );
    describe_counter!(
        STREAM_TRIMMED,
        "Durable stream entries lost to trimming before this group read or acked them (detected)."
    );
    describe_counter!(
        STREAM_REDELIVERIES_DROPPED,
        "Durable stream entries the router had already delivered, dropped (and acked)."
    );
    describe_counter!(
        STREAM_APPENDED,
        "Durable envelopes appended to their Redis stream (and published) by this publisher."
    );
    describe_gauge!(
        STREAM_BUFFERED_BYTES,
        "Bytes of durable envelopes the publisher holds while Redis is unreachable (bounded by durable.buffer_bytes)."
    );
    describe_counter!(
        STREAM_BUFFER_DROPPED,
        "Durable envelopes dropped because the publisher's buffer was full (oldest first); announced as an error status."
    );
    describe_counter!(
        STREAM_PUBLISH_WAITS,
        "Durable envelopes that waited for room in the publish queue (Redis appending slower than the feeds deliver) instead of being dropped."
    );
    describe_histogram!(
        DELIVERY_LATENCY,
        Unit::Seconds,
        "From ts_recv (frame read off the exchange) to the frame written to a bot socket."
    );
}

/// Registers every series with each known label value, at zero (see the module doc).
/// Registering is what makes a series exist: a counter or gauge handle starts at 0 and a
/// histogram with no samples renders its buckets at 0.
pub fn init() {
    for exchange in Exchange::ALL {
        let ex = exchange.as_str();
        for kind in EventType::ALL {
            counter!(EXCHANGE_EVENTS, "exchange" => ex, "type" => kind.as_str()).increment(0);
        }
        counter!(EXCHANGE_FRAMES_INVALID, "exchange" => ex).increment(0);
        for &reason in EXCHANGE_RECONNECT_REASONS {
            counter!(EXCHANGE_RECONNECTS, "exchange" => ex, "reason" => reason).increment(0);
        }
        gauge!(EXCHANGE_CONNECTED, "exchange" => ex).increment(0.0);
        counter!(EXCHANGE_SUBSCRIBE_REFUSED, "exchange" => ex).increment(0);
        for &side in BOOK_RESYNC_SIDES {
            counter!(BOOK_RESYNCS, "exchange" => ex, "side" => side).increment(0);
        }
    }
    counter!(ENVELOPES_PUBLISHED).increment(0);
    for &reason in PUBLISH_FAILED_REASONS {
        counter!(ENVELOPES_PUBLISH_FAILED, "reason" => reason).increment(0);
    }
    let _ = histogram!(PUBLISH_BATCH);
    for name in [
        ENVELOPES_RECEIVED,
        ENVELOPES_SELF_FILTERED,
        ENVELOPES_LOST,
        ENVELOPES_DUPLICATE,
        ENVELOPES_OVERFLOW,
        REDIS_PROBE_TIMEOUTS,
        BOT_CONNECTIONS,
        BOT_FRAMES_SENT,
        ADMIN_CONNECTIONS_REFUSED,
        ADMIN_UNAUTHORIZED,
    ] {
        counter!(name).increment(0);
    }
    for &what in ADMIN_TIMEOUT_KINDS {
        counter!(ADMIN_TIMEOUTS, "what" => what).increment(0);
    }
    for &role in REDIS_ROLES {
        counter!(REDIS_RECONNECTS, "role" => role).increment(0);
        gauge!(REDIS_CONNECTED, "role" => role).increment(0.0);
    }
    for name in [BOT_CLIENTS, BOT_SUBSCRIPTIONS, ADMIN_CONNECTIONS] {
        gauge!(name).increment(0.0);
    }
    for &reason in BOT_FRAMES_DROPPED_REASONS {
        counter!(BOT_FRAMES_DROPPED, "reason" => reason).increment(0);
    }
    for &reason in BOT_DISCONNECT_REASONS {
        counter!(BOT_DISCONNECTS, "reason" => reason).increment(0);
    }
    for &code in BOT_REFUSED_CODES {
        counter!(BOT_REQUESTS_REFUSED, "code" => code).increment(0);
    }
    for &reason in BOT_HANDSHAKE_REFUSED_REASONS {
        counter!(BOT_HANDSHAKES_REFUSED, "reason" => reason).increment(0);
    }
    for &reason in BOT_HANDSHAKE_FAILED_REASONS {
        counter!(BOT_HANDSHAKES_FAILED, "reason" => reason).increment(0);
    }
    counter!(BOT_AUTH_COOLDOWNS).increment(0);
    for &role in REDIS_ROLES {
        for &reason in REDIS_FAILURE_REASONS {
            counter!(REDIS_ERROR_REPLIES, "role" => role, "reason" => reason).increment(0);
        }
    }
    gauge!(REDIS_SUBSCRIBED_PATTERNS).increment(0.0);
    for role in REDIS_FAILOVER_ROLES {
        counter!(REDIS_FAILOVERS, "role" => role).increment(0);
    }
    let _ = histogram!(DELIVERY_LATENCY);
    for reason in ENVELOPE_INVALID_REASONS {
        counter!(ENVELOPES_INVALID, "reason" => reason).increment(0);
    }
    for kind in ENVELOPE_SEQ_ANOMALY_KINDS {
        counter!(ENVELOPE_SEQ_ANOMALIES, "kind" => kind).increment(0);
    }

    gauge!(ROUTER_CHANNELS).increment(0.0);
    for reason in ["oversize", "invalid", "unchecked"] {
        counter!(STORE_VALUES_REFUSED, "reason" => reason).increment(0);
    }
    for result in ["found", "missing", "error"] {
        counter!(STORE_FETCHES, "result" => result).increment(0);
    }
    counter!(BUS_DOWN_NOTICES).increment(0);
    counter!(ROUTER_WILDCARD_OVERFLOW).increment(0);
    counter!(STREAM_GROUPS_REMOVED).increment(0);
    counter!(STREAM_REPLAYED).increment(0);
    for outcome in STREAM_REPLAY_OUTCOMES {
        counter!(STREAM_REPLAYS, "outcome" => outcome).increment(0);
    }
    for name in [
        STREAM_DELIVERED,
        STREAM_ACKED,
        STREAM_RETRIES,
        STREAM_CLAIMED,
        STREAM_DEAD_LETTERS,
        STREAM_TRIMMED,
        STREAM_REDELIVERIES_DROPPED,
    ] {
        counter!(name).increment(0);
    }
    counter!(STREAM_APPENDED).increment(0);
    gauge!(STREAM_BUFFERED_BYTES).set(0.0);
    counter!(STREAM_BUFFER_DROPPED).increment(0);
    counter!(STREAM_PUBLISH_WAITS).increment(0);
}

/// What `/metrics` serves: the recorder's series, then the per-stream gauges
/// ([`streams`]), which the recorder cannot remove when a stream disappears.
pub fn render(handle: &PrometheusHandle) -> String {
    let mut text = handle.render();
    streams::render_into(&mut text);
    text
}

pub fn exchange_event(exchange: Exchange, kind: EventType) {
    counter!(EXCHANGE_EVENTS, "exchange" => exchange.as_str(), "type" => kind.as_str())
        .increment(1);
}
pub fn exchange_frame_invalid(exchange: Exchange) {
    counter!(EXCHANGE_FRAMES_INVALID, "exchange" => exchange.as_str()).increment(1);
}
pub fn exchange_reconnect(exchange: Exchange, reason: &'static str) {
    counter!(EXCHANGE_RECONNECTS, "exchange" => exchange.as_str(), "reason" => reason).increment(1);
}
/// One exchange socket subscribed (`up`) or lost: the gauge counts subscribed sockets, so
/// several feeds or shards of one exchange add up. Callers pair every `true` with a `false`.
pub fn exchange_connected(exchange: Exchange, up: bool) {
    gauge!(EXCHANGE_CONNECTED, "exchange" => exchange.as_str()).increment(if up {
        1.0
    } else {
        -1.0
    });
}
/// `side` is `"exchange"` (the host saw an update-id gap) or `"bus"` (an executor saw a chain break).
pub fn book_resync(exchange: Exchange, side: &'static str) {
    counter!(BOOK_RESYNCS, "exchange" => exchange.as_str(), "side" => side).increment(1);
}
pub fn envelopes_published(n: u64) {
    counter!(ENVELOPES_PUBLISHED).increment(n);
}
pub fn publish_batch(n: usize) {
    histogram!(PUBLISH_BATCH).record(n as f64);
}
pub fn envelopes_publish_failed(n: u64, reason: &'static str) {
    counter!(ENVELOPES_PUBLISH_FAILED, "reason" => reason).increment(n);
}
pub fn envelope_received() {
    counter!(ENVELOPES_RECEIVED).increment(1);
}
pub fn envelope_self_filtered() {
    counter!(ENVELOPES_SELF_FILTERED).increment(1);
}
pub fn envelopes_lost(n: u64) {
    counter!(ENVELOPES_LOST).increment(n);
}
pub fn envelope_duplicate() {
    counter!(ENVELOPES_DUPLICATE).increment(1);
}
pub fn envelope_overflow() {
    counter!(ENVELOPES_OVERFLOW).increment(1);
}
/// `reason` is one of the labels listed in the description of [`ENVELOPES_INVALID`].
pub fn envelope_invalid(reason: &'static str) {
    counter!(ENVELOPES_INVALID, "reason" => reason).increment(1);
}
/// `kind` is `"jump"` or `"back"`.
pub fn envelope_seq_anomaly(kind: &'static str) {
    counter!(ENVELOPE_SEQ_ANOMALIES, "kind" => kind).increment(1);
}
/// `role` is `"publish"` or `"subscribe"`.
pub fn redis_reconnect(role: &'static str) {
    counter!(REDIS_RECONNECTS, "role" => role).increment(1);
}
/// A Sentinel-resolved connection of `role` landed on another master than before.
pub fn redis_failover(role: &'static str) {
    counter!(REDIS_FAILOVERS, "role" => role).increment(1);
}
pub fn redis_connected(role: &'static str, up: bool) {
    gauge!(REDIS_CONNECTED, "role" => role).set(if up { 1.0 } else { 0.0 });
}
pub fn redis_probe_timeout() {
    counter!(REDIS_PROBE_TIMEOUTS).increment(1);
}
/// An error reply handled without a reconnect; `reason` is `RedisFailure::reason`.
pub fn redis_error_reply(role: &'static str, reason: &'static str) {
    counter!(REDIS_ERROR_REPLIES, "role" => role, "reason" => reason).increment(1);
}
pub fn redis_subscribed_patterns(n: usize) {
    gauge!(REDIS_SUBSCRIBED_PATTERNS).set(n as f64);
}
pub fn bot_connected() {
    counter!(BOT_CONNECTIONS).increment(1);
    gauge!(BOT_CLIENTS).increment(1.0);
}
pub fn bot_disconnected(reason: &'static str) {
    gauge!(BOT_CLIENTS).decrement(1.0);
    counter!(BOT_DISCONNECTS, "reason" => reason).increment(1);
}
pub fn bot_subscriptions(delta: f64) {
    gauge!(BOT_SUBSCRIPTIONS).increment(delta);
}
pub fn bot_frames_sent(n: u64) {
    counter!(BOT_FRAMES_SENT).increment(n);
}
pub fn bot_frames_dropped(n: u64, reason: &'static str) {
    counter!(BOT_FRAMES_DROPPED, "reason" => reason).increment(n);
}
pub fn bot_request_refused(code: &'static str) {
    counter!(BOT_REQUESTS_REFUSED, "code" => code).increment(1);
}
/// `reason`: `unauthorized`, `auth_throttled` or `max_connections`.
pub fn bot_handshake_refused(reason: &'static str) {
    counter!(BOT_HANDSHAKES_REFUSED, "reason" => reason).increment(1);
}
/// `reason`: `timeout`, `tls` or `websocket`.
pub fn bot_handshake_failed(reason: &'static str) {
    counter!(BOT_HANDSHAKES_FAILED, "reason" => reason).increment(1);
}
pub fn bot_auth_cooldown() {
    counter!(BOT_AUTH_COOLDOWNS).increment(1);
}
pub fn exchange_subscribe_refused(exchange: Exchange) {
    counter!(EXCHANGE_SUBSCRIBE_REFUSED, "exchange" => exchange.as_str()).increment(1);
}
pub fn admin_connections(delta: f64) {
    gauge!(ADMIN_CONNECTIONS).increment(delta);
}
pub fn admin_connection_refused() {
    counter!(ADMIN_CONNECTIONS_REFUSED).increment(1);
}
/// `what` is `"header"` or `"lifetime"` ([`ADMIN_TIMEOUT_KINDS`]).
pub fn admin_timeout(what: &'static str) {
    counter!(ADMIN_TIMEOUTS, "what" => what).increment(1);
}
pub fn admin_unauthorized() {
    counter!(ADMIN_UNAUTHORIZED).increment(1);
}
pub fn delivery_latency(elapsed: Duration) {
    histogram!(DELIVERY_LATENCY).record(elapsed.as_secs_f64());
}
pub fn router_channels(n: usize) {
    gauge!(ROUTER_CHANNELS).set(n as f64);
}
/// `reason` is `"oversize"`, `"invalid"` or `"unchecked"` (a booklog whose size `MEMORY USAGE` would not tell).
pub fn store_value_refused(reason: &'static str) {
    counter!(STORE_VALUES_REFUSED, "reason" => reason).increment(1);
}
/// `result` is `"found"`, `"missing"` or `"error"`.
pub fn store_fetch(result: &'static str) {
    counter!(STORE_FETCHES, "result" => result).increment(1);
}
pub fn router_wildcard_overflow() {
    counter!(ROUTER_WILDCARD_OVERFLOW).increment(1);
}
pub fn bus_down_notice() {
    counter!(BUS_DOWN_NOTICES).increment(1);
}
pub fn stream_group_removed() {
    counter!(STREAM_GROUPS_REMOVED).increment(1);
}
pub fn stream_replayed(n: u64) {
    counter!(STREAM_REPLAYED).increment(n);
}
/// `outcome` is one of [`STREAM_REPLAY_OUTCOMES`].
pub fn stream_replay(outcome: &'static str) {
    counter!(STREAM_REPLAYS, "outcome" => outcome).increment(1);
}
pub fn stream_delivered(n: u64) {
    counter!(STREAM_DELIVERED).increment(n);
}
pub fn stream_acked(n: u64) {
    counter!(STREAM_ACKED).increment(n);
}
pub fn stream_retry() {
    counter!(STREAM_RETRIES).increment(1);
}
pub fn stream_claimed(n: u64) {
    counter!(STREAM_CLAIMED).increment(n);
}
pub fn stream_dead_letter() {
    counter!(STREAM_DEAD_LETTERS).increment(1);
}
pub fn stream_trimmed(n: u64) {
    counter!(STREAM_TRIMMED).increment(n);
}
pub fn stream_redelivery_dropped() {
    counter!(STREAM_REDELIVERIES_DROPPED).increment(1);
}
pub fn stream_appended(n: u64) {
    counter!(STREAM_APPENDED).increment(n);
}
pub fn stream_buffered_bytes(bytes: u64) {
    gauge!(STREAM_BUFFERED_BYTES).set(bytes as f64);
}
pub fn stream_buffer_dropped(n: u64) {
    counter!(STREAM_BUFFER_DROPPED).increment(n);
}
pub fn stream_publish_wait() {
    counter!(STREAM_PUBLISH_WAITS).increment(1);
}
