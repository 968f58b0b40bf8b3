//! The one place for configuration: typed sections, defaults, file + environment layering
//! and validation that reports every problem at once.
//!
//! Sources, later ones winning: built-in defaults → `config.toml` (or `--config FILE`) →
//! environment variables `MDBRIDGE_<SECTION>_<KEY>` (e.g. `MDBRIDGE_REDIS_URL`,
//! `MDBRIDGE_BOTS_LISTEN`, `MDBRIDGE_REDIS_KEY_PREFIX`). Layering is done by `figment`;
//! unknown keys are refused (`deny_unknown_fields`) so a typo never silently falls back to
//! a default. Every error names the file, the `section.key` and the reason.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::event::{valid_interval, valid_symbol, Exchange, Pattern};

mod durable;
pub use durable::{DurableConfig, StreamLimit, DEFAULT_STREAM_MAXLEN};

/// Every setting of an instance. Sections match `config.toml`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub instance: InstanceConfig,
    pub redis: RedisConfig,
    pub bots: BotsConfig,
    pub http: HttpConfig,
    pub feeds: Vec<FeedConfig>,
    pub durable: DurableConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InstanceConfig {
    /// Shown in logs and `/health`; the default consumer-group name for durable channels.
    pub name: String,
    /// How long shutdown may take before the rest is abandoned.
    pub shutdown_timeout_ms: u64,
}

impl Default for InstanceConfig {
    fn default() -> Self {
        InstanceConfig {
            name: "mdbridge".to_string(),
            shutdown_timeout_ms: 5_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    pub url: String,
    pub key_prefix: String,
    /// Envelopes waiting for the publishing connection; past this they are dropped and counted.
    pub publish_queue_size: usize,
    /// Most envelopes sent in one pipeline.
    pub publish_batch_max: usize,
    /// A probe goes through the subscription this often...
    pub probe_interval_ms: u64,
    /// ...and must come back within this, or the subscription is rebuilt.
    pub probe_timeout_ms: u64,
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
    /// How often the publisher refreshes `{p}snapshot:{channel}` from its books.
    pub snapshot_interval_ms: u64,
    /// `rediss://` only: PEM file of the CA(s) that signed the server's certificate; unset
    /// means the public web PKI roots.
    pub tls_ca_file: Option<PathBuf>,
    /// `rediss://` only: client certificate chain (PEM) for servers that require one
    /// (`tls-auth-clients yes`); set together with `tls_key_file`.
    pub tls_cert_file: Option<PathBuf>,
    /// `rediss://` only: private key (PEM) of `tls_cert_file`.
    pub tls_key_file: Option<PathBuf>,
    /// Most `PSUBSCRIBE` patterns one subscriber holds, whatever the bots ask: beyond it,
    /// wildcards are replaced by covering patterns (see bus::redis::interest). 0: always
    /// one cover per type (for ACLs that confine channels).
    pub max_patterns: usize,
    /// Expiry of the `last:`, `snapshot:` and `booklog:` keys, renewed by the publisher at
    /// every refresh while it runs: a dead publisher's values vanish instead of being served
    /// as current. 0: no expiry.
    pub latest_ttl_ms: u64,
    /// Most book messages kept per book in `{p}booklog:{channel}` (the catch-up log after
    /// the snapshot); the publisher writes a fresh snapshot when half of it is used.
    pub booklog_max: usize,
    /// Largest `last:` / `snapshot:` value (and `booklog:` entry) an executor reads; larger
    /// ones are refused unread and counted.
    pub max_snapshot_bytes: usize,
    /// Largest `booklog:` list (all entries, as `MEMORY USAGE` reports it) an executor
    /// reads; a larger log is refused unread and counted, and the book syncs without it.
    pub max_booklog_bytes: usize,
    /// Largest envelope accepted from Redis (pub/sub payload or latest-value key); larger
    /// ones are dropped and counted. Must hold the biggest book snapshot published.
    pub max_envelope_bytes: usize,
    /// `"kid=secret"` entries. Publishers sign every envelope with the first; executors
    /// accept any listed key and drop unsigned or badly signed envelopes. Empty: unsigned.
    pub signing_keys: Vec<SigningKey>,
    /// With signing keys: a pub/sub envelope published longer ago than this is a replay
    /// and dropped (latest-value keys are exempt). 0: no limit.
    pub max_envelope_age_ms: u64,
    /// Redis Sentinel: URLs of the sentinels (`redis://[user:pass@]host:26379`). With
    /// `master_name`, every connection goes to the master they name and `url` gives only
    /// the credentials, database and TLS (its host and port are not used).
    pub sentinels: Vec<String>,
    /// Redis Sentinel: the monitored master's name; set together with `sentinels`.
    pub master_name: String,
}

/// Default of `redis.max_envelope_bytes`: 1 MiB, three times a 5 000-level book snapshot.
pub const DEFAULT_MAX_ENVELOPE_BYTES: usize = 1 << 20;

/// Shortest signing secret accepted, in bytes.
pub const MIN_SECRET_LEN: usize = 16;

/// One entry of `redis.signing_keys`: `kid=secret`. The secret is the UTF-8 text after the
/// first `=`. `Debug` never shows the secret, so a logged config cannot leak it.
#[derive(Clone, PartialEq, Eq)]
pub struct SigningKey {
    kid: String,
    secret: String,
}

impl SigningKey {
    /// The key id written into signed envelopes (`"kid"`).
    pub fn kid(&self) -> &str {
        &self.kid
    }
    pub fn secret(&self) -> &str {
        &self.secret
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey({}=***)", self.kid)
    }
}

impl FromStr for SigningKey {
    type Err = String;
    // Messages name the key id at most, never the secret.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Some((kid, secret)) = s.split_once('=') else {
            return Err("expected `kid=secret` (e.g. \"k1=<32 random hex bytes>\")".into());
        };
        if kid.is_empty()
            || kid.len() > crate::bus::signing::MAX_KID_LEN
            || !kid.bytes().all(crate::bus::signing::kid_byte)
        {
            return Err(format!(
                "key id `{}` must be 1 to {} of A-Z a-z 0-9 _ - .",
                kid.escape_debug(),
                crate::bus::signing::MAX_KID_LEN
            ));
        }
        if secret.len() < MIN_SECRET_LEN {
            return Err(format!(
                "the secret of key `{kid}` is shorter than {MIN_SECRET_LEN} bytes (use e.g. `openssl rand -hex 32`)"
            ));
        }
        Ok(SigningKey {
            kid: kid.to_string(),
            secret: secret.to_string(),
        })
    }
}

impl Serialize for SigningKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{}={}", self.kid, self.secret))
    }
}

impl<'de> Deserialize<'de> for SigningKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:6379/0".to_string(),
            key_prefix: "md:".to_string(),
            publish_queue_size: 65_536,
            publish_batch_max: 512,
            probe_interval_ms: 1_000,
            probe_timeout_ms: 3_000,
            reconnect_min_ms: 100,
            reconnect_max_ms: 5_000,
            snapshot_interval_ms: 1_000,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            max_patterns: 64,
            latest_ttl_ms: 5_000,
            booklog_max: 1_000,
            max_snapshot_bytes: 4 * 1024 * 1024,
            max_booklog_bytes: 4 * 1024 * 1024,
            max_envelope_bytes: DEFAULT_MAX_ENVELOPE_BYTES,
            signing_keys: Vec::new(),
            max_envelope_age_ms: 300_000,
            sentinels: Vec::new(),
            master_name: String::new(),
        }
    }
}

/// What happens to a bot whose queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SlowClientPolicy {
    /// Drop the oldest queued frame to make room (counted); the bot stays connected.
    DropOldest,
    /// Close the bot's connection (counted).
    Disconnect,
}

/// One accepted bot token: a plain string may subscribe to everything; a table
/// `{ token = "…", allow = ["trade:*:*", "book:binance:*"] }` only to what `allow` covers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    untagged,
    expecting = "a token string, or a table { token = \"…\", allow = [\"<pattern>\", …] }"
)]
pub enum BotToken {
    Any(String),
    Scoped(ScopedToken),
}

/// A token limited to the channels its `allow` patterns cover.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScopedToken {
    pub token: String,
    pub allow: Vec<String>,
}

impl BotToken {
    pub fn token(&self) -> &str {
        match self {
            BotToken::Any(t) => t,
            BotToken::Scoped(s) => &s.token,
        }
    }

    /// The allow patterns; `None` means every channel.
    pub fn allow(&self) -> Option<&[String]> {
        match self {
            BotToken::Any(_) => None,
            BotToken::Scoped(s) => Some(&s.allow),
        }
    }
}

impl From<&str> for BotToken {
    fn from(t: &str) -> BotToken {
        BotToken::Any(t.to_string())
    }
}

impl From<String> for BotToken {
    fn from(t: String) -> BotToken {
        BotToken::Any(t)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BotsConfig {
    pub listen: String,
    /// Frames queued per bot before `slow_client` applies.
    pub queue_size: usize,
    pub slow_client: SlowClientPolicy,
    /// Accepted bearer tokens (plain or with an `allow` list); empty means no authentication.
    pub tokens: Vec<BotToken>,
    /// Most subscription patterns one bot may hold.
    pub max_subscriptions: usize,
    /// Largest message (and frame) accepted from a bot; larger ones close it with 1009.
    pub max_message_bytes: usize,
    /// The server pings each bot this often; a bot silent for 3 intervals is closed.
    pub ping_interval_ms: u64,
    /// Most bot connections at once; past it the upgrade is refused with HTTP 503.
    pub max_connections: usize,
    /// Most connections in the TLS/WebSocket handshake at once; more wait in the kernel's
    /// accept queue.
    pub max_handshakes: usize,
    /// Request tokens one bot gets per second, sustained (a subscribe/unsubscribe costs one
    /// per channel it names, any other text or binary message one)...
    pub max_requests_per_sec: f64,
    /// ...and in a burst; past it requests get `rate_limited`.
    pub request_burst: u32,
    /// A message whose first byte arrived this long ago and is still not complete closes
    /// the connection (1008).
    pub message_timeout_ms: u64,
    /// PEM certificate chain and private key: both set means the bot port speaks `wss://`.
    pub tls_cert_file: Option<String>,
    pub tls_key_file: Option<String>,
    /// Failed authentications from one address within `auth_window_ms` before that
    /// address's bad tokens get HTTP 429 for `auth_cooldown_ms` (valid ones still pass).
    pub auth_max_failures: u32,
    pub auth_window_ms: u64,
    pub auth_cooldown_ms: u64,
    /// SO_SNDBUF of each bot socket: bounds the kernel memory a bot that stops reading
    /// can hold; 0 leaves the kernel's autotuning (up to `net.ipv4.tcp_wmem` max).
    pub send_buffer_bytes: usize,
}

impl Default for BotsConfig {
    fn default() -> Self {
        BotsConfig {
            listen: "127.0.0.1:8765".to_string(),
            queue_size: 4_096,
            slow_client: SlowClientPolicy::DropOldest,
            tokens: Vec::new(),
            max_subscriptions: 1_000,
            max_message_bytes: 65_536,
            ping_interval_ms: 20_000,
            max_connections: 10_000,
            max_handshakes: 256,
            max_requests_per_sec: 50.0,
            // As many as `max_subscriptions`: a bot may subscribe its whole allowance in
            // one request; the rate then bounds churn (and the store reads it starts).
            request_burst: 1_000,
            message_timeout_ms: 10_000,
            tls_cert_file: None,
            tls_key_file: None,
            auth_max_failures: 5,
            auth_window_ms: 60_000,
            auth_cooldown_ms: 60_000,
            send_buffer_bytes: 131_072,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub listen: String,
    /// Admin connections served at once; one more is closed at accept.
    pub max_connections: usize,
    /// A request's head (request line and headers) must arrive within this after
    /// connect: half-sent requests cannot pile up.
    pub header_timeout_ms: u64,
    /// A request must be answered within this; a connection (one request) lives at most
    /// `header_timeout_ms + request_timeout_ms`.
    pub request_timeout_ms: u64,
    /// When set, every admin endpoint wants `Authorization: Bearer <token>` (else 401).
    pub token: Option<String>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: "127.0.0.1:9100".to_string(),
            max_connections: 64,
            header_timeout_ms: 5_000,
            request_timeout_ms: 10_000,
            token: None,
        }
    }
}

/// How the process logs (stderr).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter (`info`, `mdbridge=debug,warn`); `RUST_LOG` wins when set.
    pub level: String,
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".to_string(),
            format: LogFormat::Text,
        }
    }
}

/// `text`: one human line per record (colours only on a terminal); `json`: one JSON
/// object per line, for log shippers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// One market-data stream a feed subscribes to, as written in `channels`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum FeedChannel {
    Trade,
    Ticker,
    Book,
    /// `candle:<interval>`, e.g. `candle:1m`.
    Candle(String),
}

impl FromStr for FeedChannel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "trade" => Ok(FeedChannel::Trade),
            "ticker" => Ok(FeedChannel::Ticker),
            "book" => Ok(FeedChannel::Book),
            _ => match s.strip_prefix("candle:") {
                Some(i) if valid_interval(i) => Ok(FeedChannel::Candle(i.to_string())),
                _ => Err(format!(
                    "unknown channel `{s}` (expected trade, ticker, book or candle:<interval> such as candle:1m)"
                )),
            },
        }
    }
}

impl fmt::Display for FeedChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FeedChannel::Trade => f.write_str("trade"),
            FeedChannel::Ticker => f.write_str("ticker"),
            FeedChannel::Book => f.write_str("book"),
            FeedChannel::Candle(i) => write!(f, "candle:{i}"),
        }
    }
}

impl Serialize for FeedChannel {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for FeedChannel {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedConfig {
    /// The venue whose protocol the feed speaks.
    pub exchange: Exchange,
    /// The exchange name written into the feed's events and channels; default: `exchange`.
    /// A feed pointed at a simulator says `sim`, so simulated data never passes for real.
    #[serde(default)]
    pub label: Option<Exchange>,
    /// WebSocket endpoint; default: the exchange's public endpoint.
    #[serde(default)]
    pub url: Option<String>,
    /// REST base for order-book snapshots; default: the exchange's public REST base.
    #[serde(default)]
    pub rest_url: Option<String>,
    pub symbols: Vec<String>,
    #[serde(default = "default_feed_channels")]
    pub channels: Vec<FeedChannel>,
    /// Levels requested in a REST order-book snapshot.
    #[serde(default = "default_depth_limit")]
    pub depth_limit: u32,
    #[serde(default = "default_reconnect_min_ms")]
    pub reconnect_min_ms: u64,
    #[serde(default = "default_reconnect_max_ms")]
    pub reconnect_max_ms: u64,
    /// Reconnect on our own terms before the exchange's forced cut (Binance: 24 h).
    #[serde(default = "default_rotate_after_secs")]
    pub rotate_after_secs: u64,
    /// No frame at all for this long means a dead connection.
    #[serde(default = "default_stale_after_ms")]
    pub stale_after_ms: u64,
    /// Largest WebSocket message (and frame) accepted from the exchange. Coinbase sends a
    /// whole `level2` book snapshot as one message, several MB for a busy product. Memory
    /// is only taken while such a message is read.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
}

/// Smallest `max_message_bytes` accepted.
const MIN_MESSAGE_BYTES: usize = 64 * 1024;

fn default_max_message_bytes() -> usize {
    16 * 1024 * 1024
}

fn default_feed_channels() -> Vec<FeedChannel> {
    vec![FeedChannel::Trade, FeedChannel::Ticker, FeedChannel::Book]
}
fn default_depth_limit() -> u32 {
    1000
}
fn default_reconnect_min_ms() -> u64 {
    500
}
fn default_reconnect_max_ms() -> u64 {
    30_000
}
fn default_rotate_after_secs() -> u64 {
    23 * 3600 + 30 * 60
}
fn default_stale_after_ms() -> u64 {
    60_000
}

impl FeedConfig {
    /// A feed for `exchange` with every optional setting at its default.
    pub fn new(exchange: Exchange, symbols: Vec<String>, channels: Vec<FeedChannel>) -> FeedConfig {
        FeedConfig {
            exchange,
            label: None,
            url: None,
            rest_url: None,
            symbols,
            channels,
            depth_limit: default_depth_limit(),
            reconnect_min_ms: default_reconnect_min_ms(),
            reconnect_max_ms: default_reconnect_max_ms(),
            rotate_after_secs: default_rotate_after_secs(),
            stale_after_ms: default_stale_after_ms(),
            max_message_bytes: default_max_message_bytes(),
        }
    }
}

/// A refused configuration: every problem found, each as `file: section.key: reason`.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration:")?;
        for p in &self.problems {
            write!(f, "\n  {p}")?;
        }
        Ok(())
    }
}

/// Which parts of the config a role needs; validation checks only those.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Publisher,
    Executor,
    Hybrid,
}

/// Sections whose keys may be overridden from the environment.
const ENV_SECTIONS: [&str; 6] = ["instance", "redis", "bots", "http", "durable", "log"];

/// The environment variable that sets `section.key`.
fn env_var_for(key: &str) -> String {
    format!(
        "MDBRIDGE_{}",
        key.replacen('.', "_", 1).to_ascii_uppercase()
    )
}

/// A value that fails validation came from the environment when its variable is set
/// (the environment wins over the file): name the variable, not the file.
fn blame_environment(mut e: ConfigError, source: &str) -> ConfigError {
    let prefix = format!("{source}: ");
    for p in &mut e.problems {
        let Some(rest) = p.strip_prefix(&prefix) else {
            continue;
        };
        let Some((key, reason)) = rest.split_once(": ") else {
            continue;
        };
        let var = env_var_for(key);
        if std::env::var_os(&var).is_some() {
            *p = format!("environment {var}: {key}: {reason}");
        }
    }
    e
}

impl Config {
    /// Loads defaults, then `path` (when given; a missing file is an error), then the
    /// environment, then validates for `role`.
    pub fn load(path: Option<&Path>, role: Role) -> Result<Config, ConfigError> {
        let source = path.map_or_else(|| "defaults".to_string(), |p| p.display().to_string());
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(p) = path {
            if !p.exists() {
                return Err(ConfigError {
                    problems: vec![format!("{source}: file not found")],
                });
            }
            figment = figment.merge(Toml::file_exact(p));
        }
        // MDBRIDGE_REDIS_KEY_PREFIX -> redis.key_prefix: the section is the first word and
        // the rest is the key, so keys that contain underscores keep them.
        let env = Env::prefixed("MDBRIDGE_").filter_map(|k| {
            let k = k.as_str().to_ascii_lowercase();
            let (section, key) = k.split_once('_')?;
            ENV_SECTIONS
                .contains(&section)
                .then(|| format!("{section}.{key}").into())
        });
        figment = figment.merge(env);
        let config: Config = figment.extract().map_err(|errors| ConfigError {
            problems: errors
                .into_iter()
                .map(|e| {
                    let key = if e.path.is_empty() {
                        "(top level)".to_string()
                    } else {
                        e.path.join(".")
                    };
                    let origin = match e.metadata.as_ref() {
                        Some(m) => match &m.source {
                            Some(figment::Source::File(f)) => f.display().to_string(),
                            _ if m.name.contains("environment") => {
                                format!("environment {}", env_var_for(&key))
                            }
                            _ => source.clone(),
                        },
                        None => source.clone(),
                    };
                    format!("{origin}: {key}: {}", e.kind)
                })
                .collect(),
        })?;
        config
            .validate(&source, role)
            .map_err(|e| blame_environment(e, &source))?;
        Ok(config)
    }

    /// Checks every value a role depends on; returns all problems at once.
    pub fn validate(&self, source: &str, role: Role) -> Result<(), ConfigError> {
        let mut p = Vec::new();
        let mut bad = |key: &str, reason: String| p.push(format!("{source}: {key}: {reason}"));
        if self.instance.name.trim().is_empty() {
            bad("instance.name", "must not be empty".into());
        }
        match redis::parse_redis_url(&self.redis.url) {
            Some(_) => {}
            None => bad(
                "redis.url",
                format!(
                    "`{}` is not a Redis URL (expected redis://host:port/db)",
                    self.redis.url
                ),
            ),
        }
        // Sentinel: both keys or neither; each sentinel a redis:// or rediss:// URL (not
        // echoed: it may carry a password).
        if self.redis.sentinels.is_empty() != self.redis.master_name.trim().is_empty() {
            bad(
                "redis.sentinels",
                "redis.sentinels and redis.master_name go together (both set or both empty)".into(),
            );
        }
        for (i, url) in self.redis.sentinels.iter().enumerate() {
            if redis::parse_redis_url(url).is_none() {
                bad(
                    "redis.sentinels",
                    format!(
                        "entry {i} is not a Redis URL (expected redis://[user:pass@]host:port)"
                    ),
                );
            }
        }
        let tls_url = self.redis.url.starts_with("rediss://");
        for (key, set) in [
            ("redis.tls_ca_file", self.redis.tls_ca_file.is_some()),
            ("redis.tls_cert_file", self.redis.tls_cert_file.is_some()),
            ("redis.tls_key_file", self.redis.tls_key_file.is_some()),
        ] {
            if set && !tls_url {
                bad(key, "needs a rediss:// url".into());
            }
        }
        if self.redis.tls_cert_file.is_some() != self.redis.tls_key_file.is_some() {
            bad(
                "redis.tls_cert_file",
                "tls_cert_file and tls_key_file go together".into(),
            );
        }
        if self.redis.key_prefix.contains(['*', '?', '[', ']', ' ']) {
            bad(
                "redis.key_prefix",
                "must not contain glob characters or spaces".into(),
            );
        }
        for (key, v) in [
            ("redis.publish_queue_size", self.redis.publish_queue_size),
            ("redis.publish_batch_max", self.redis.publish_batch_max),
            ("redis.booklog_max", self.redis.booklog_max),
            ("redis.max_snapshot_bytes", self.redis.max_snapshot_bytes),
            ("redis.max_booklog_bytes", self.redis.max_booklog_bytes),
            ("bots.queue_size", self.bots.queue_size),
            ("bots.max_subscriptions", self.bots.max_subscriptions),
            ("bots.max_message_bytes", self.bots.max_message_bytes),
            ("bots.max_connections", self.bots.max_connections),
            ("bots.max_handshakes", self.bots.max_handshakes),
            ("bots.request_burst", self.bots.request_burst as usize),
            (
                "bots.auth_max_failures",
                self.bots.auth_max_failures as usize,
            ),
            ("http.max_connections", self.http.max_connections),
        ] {
            if v == 0 {
                bad(key, "must be at least 1".into());
            }
        }
        for (key, v) in [
            ("redis.probe_interval_ms", self.redis.probe_interval_ms),
            ("redis.probe_timeout_ms", self.redis.probe_timeout_ms),
            ("redis.reconnect_min_ms", self.redis.reconnect_min_ms),
            (
                "redis.snapshot_interval_ms",
                self.redis.snapshot_interval_ms,
            ),
            ("bots.ping_interval_ms", self.bots.ping_interval_ms),
            ("bots.message_timeout_ms", self.bots.message_timeout_ms),
            ("bots.auth_window_ms", self.bots.auth_window_ms),
            ("bots.auth_cooldown_ms", self.bots.auth_cooldown_ms),
            ("http.header_timeout_ms", self.http.header_timeout_ms),
            ("http.request_timeout_ms", self.http.request_timeout_ms),
        ] {
            if v == 0 {
                bad(key, "must be greater than 0".into());
            }
        }
        if self.redis.latest_ttl_ms != 0
            && self.redis.latest_ttl_ms < self.redis.snapshot_interval_ms.saturating_mul(2)
        {
            bad(
                "redis.latest_ttl_ms",
                format!(
                    "must be 0 (no expiry) or at least twice snapshot_interval_ms ({} ms): the publisher renews the keys once per interval",
                    self.redis.snapshot_interval_ms
                ),
            );
        }
        if self.redis.max_envelope_bytes < 1024 {
            bad("redis.max_envelope_bytes", "must be at least 1024".into());
        }
        for (i, key) in self.redis.signing_keys.iter().enumerate() {
            if self.redis.signing_keys[..i]
                .iter()
                .any(|k| k.kid() == key.kid())
            {
                bad(
                    "redis.signing_keys",
                    format!("key id `{}` is listed twice", key.kid()),
                );
            }
        }
        if self.redis.reconnect_max_ms < self.redis.reconnect_min_ms {
            bad(
                "redis.reconnect_max_ms",
                "must not be below reconnect_min_ms".into(),
            );
        }
        if role != Role::Publisher && self.bots.listen.parse::<SocketAddr>().is_err() {
            bad(
                "bots.listen",
                format!(
                    "`{}` is not host:port (e.g. 127.0.0.1:8765)",
                    self.bots.listen
                ),
            );
        }
        if self.http.listen.parse::<SocketAddr>().is_err() {
            bad(
                "http.listen",
                format!(
                    "`{}` is not host:port (e.g. 127.0.0.1:9100)",
                    self.http.listen
                ),
            );
        }
        self.validate_bots(role, &mut bad);
        self.validate_durable(&mut bad);
        if self
            .http
            .token
            .as_ref()
            .is_some_and(|t| t.trim().is_empty())
        {
            bad(
                "http.token",
                "must not be empty (leave it out for no token)".into(),
            );
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            bad(
                "log.level",
                format!("`{}` is not a log filter: {e}", self.log.level),
            );
        }
        if role != Role::Executor && self.feeds.is_empty() {
            bad(
                "feeds",
                "at least one [[feeds]] entry is needed to publish".into(),
            );
        }
        for (i, feed) in self.feeds.iter().enumerate() {
            let at = |k: &str| format!("feeds[{i}].{k}");
            let venue = crate::exchange::registry::venue(feed.exchange);
            if venue.is_none() {
                bad(
                    &at("exchange"),
                    format!(
                        "`{}` is not supported yet (supported: {})",
                        feed.exchange,
                        crate::exchange::registry::names().join(", ")
                    ),
                );
            }
            if feed.symbols.is_empty() {
                bad(&at("symbols"), "list at least one symbol".into());
            }
            for s in &feed.symbols {
                if !valid_symbol(s) {
                    bad(
                        &at("symbols"),
                        format!("`{s}` is not BASE-QUOTE in upper case (e.g. BTC-USDT)"),
                    );
                }
            }
            if feed.channels.is_empty() {
                bad(&at("channels"), "list at least one channel".into());
            }
            if let Some(venue) = venue {
                for why in feed.channels.iter().filter_map(|c| venue.refuse_channel(c)) {
                    bad(&at("channels"), why);
                }
            }
            if feed.max_message_bytes < MIN_MESSAGE_BYTES {
                bad(
                    &at("max_message_bytes"),
                    format!(
                        "must be at least {MIN_MESSAGE_BYTES} (one order-book snapshot must fit)"
                    ),
                );
            }
            for (k, u) in [("url", &feed.url), ("rest_url", &feed.rest_url)] {
                if let Some(u) = u {
                    match url::Url::parse(u) {
                        Ok(parsed) => {
                            let ok = if k == "url" {
                                matches!(parsed.scheme(), "ws" | "wss")
                            } else {
                                matches!(parsed.scheme(), "http" | "https")
                            };
                            if !ok {
                                bad(&at(k), format!("`{u}` has the wrong scheme"));
                            }
                        }
                        Err(e) => bad(&at(k), format!("`{u}`: {e}")),
                    }
                }
            }
            if !(1..=5000).contains(&feed.depth_limit) {
                bad(&at("depth_limit"), "must be between 1 and 5000".into());
            }
            if feed.reconnect_min_ms == 0 || feed.reconnect_max_ms < feed.reconnect_min_ms {
                bad(
                    &at("reconnect_min_ms"),
                    "must be > 0 and not above reconnect_max_ms".into(),
                );
            }
            if feed.rotate_after_secs == 0 || feed.stale_after_ms == 0 {
                bad(
                    &at("rotate_after_secs"),
                    "rotate_after_secs and stale_after_ms must be > 0".into(),
                );
            }
        }
        if p.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { problems: p })
        }
    }

    /// The `[bots]` keys that need more than a range check: tokens, allow lists, TLS files.
    fn validate_bots(&self, role: Role, bad: &mut impl FnMut(&str, String)) {
        let b = &self.bots;
        if !(b.max_requests_per_sec.is_finite() && b.max_requests_per_sec > 0.0) {
            bad(
                "bots.max_requests_per_sec",
                "must be a number greater than 0".into(),
            );
        }
        let mut seen = std::collections::HashSet::new();
        for (i, t) in b.tokens.iter().enumerate() {
            let at = format!("bots.tokens[{i}]");
            if t.token().is_empty() {
                bad(&at, "tokens must not be empty strings".into());
            } else if !seen.insert(t.token()) {
                bad(&at, "the same token is listed twice".into());
            }
            if let Some(allow) = t.allow() {
                if allow.is_empty() {
                    bad(
                        &format!("{at}.allow"),
                        "an empty allow list permits nothing; list patterns or remove the token"
                            .into(),
                    );
                }
                for (j, pat) in allow.iter().enumerate() {
                    if let Err(e) = Pattern::parse(pat) {
                        bad(&format!("{at}.allow[{j}]"), format!("`{pat}`: {e}"));
                    }
                }
            }
        }
        match (&b.tls_cert_file, &b.tls_key_file) {
            _ if role == Role::Publisher => {}
            (None, None) => {}
            (Some(cert), Some(key)) => {
                for (k, f) in [("bots.tls_cert_file", cert), ("bots.tls_key_file", key)] {
                    if !Path::new(f).is_file() {
                        bad(k, format!("`{f}`: file not found"));
                    }
                }
            }
            _ => bad(
                "bots.tls_cert_file",
                "tls_cert_file and tls_key_file must be set together".into(),
            ),
        }
    }

    /// The default config file next to the working directory, when present.
    pub fn default_path() -> Option<PathBuf> {
        let p = PathBuf::from("config.toml");
        p.exists().then_some(p)
    }
}

#[cfg(test)]
mod tests;
