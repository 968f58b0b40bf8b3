//! Every metric name and label mdbridge exports, in one place, with one function per fact.
//!
//! Other modules never spell a metric name: they call the function here, so a log line and
//! its counter come from one call site and the exported names stay consistent. All names
//! carry the `mdbridge_` prefix. The Prometheus recorder is installed by [`install`].

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{counter, gauge, histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::event::{EventType, Exchange};

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
pub const DELIVERY_LATENCY: &str = "mdbridge_delivery_latency_seconds";

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
        "1 while the exchange feed is connected and subscribed."
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
        "Envelopes missing from a (src, channel) sequence: lost by pub/sub."
    );
    describe_counter!(
        ENVELOPES_DUPLICATE,
        "Envelopes received twice (overlapping patterns) and dropped."
    );
    describe_counter!(
        ENVELOPES_INVALID,
        "Malformed envelopes received from Redis and skipped."
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
    describe_histogram!(
        DELIVERY_LATENCY,
        Unit::Seconds,
        "From ts_recv (frame read off the exchange) to the frame written to a bot socket."
    );
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
pub fn exchange_connected(exchange: Exchange, up: bool) {
    gauge!(EXCHANGE_CONNECTED, "exchange" => exchange.as_str()).set(if up { 1.0 } else { 0.0 });
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
pub fn envelope_invalid() {
    counter!(ENVELOPES_INVALID).increment(1);
}
/// `role` is `"publish"` or `"subscribe"`.
pub fn redis_reconnect(role: &'static str) {
    counter!(REDIS_RECONNECTS, "role" => role).increment(1);
}
/// A Sentinel-resolved connection of `role` landed on another master than before.
pub fn redis_failover(role: &'static str) {
    counter!(REDIS_FAILOVERS, "role" => role).increment(1);
}
/// Exports `redis_failovers{role}` at 0 from start (Sentinel mode), so alerts see it.
pub fn redis_failovers_register(role: &'static str) {
    counter!(REDIS_FAILOVERS, "role" => role).increment(0);
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
pub fn delivery_latency(elapsed: Duration) {
    histogram!(DELIVERY_LATENCY).record(elapsed.as_secs_f64());
}
