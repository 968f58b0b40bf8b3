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
    /// Redis Sentinel: URLs of the sentinels (`redis://[user:pass@]host:26379`). With
    /// `master_name`, every connection goes to the master they name and `url` gives only
    /// the credentials, database and TLS (its host and port are not used).
    pub sentinels: Vec<String>,
    /// Redis Sentinel: the monitored master's name; set together with `sentinels`.
    pub master_name: String,
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BotsConfig {
    pub listen: String,
    /// Frames queued per bot before `slow_client` applies.
    pub queue_size: usize,
    pub slow_client: SlowClientPolicy,
    /// Accepted bearer tokens; empty means no authentication.
    pub tokens: Vec<String>,
    /// Most subscription patterns one bot may hold.
    pub max_subscriptions: usize,
    /// Largest text frame accepted from a bot.
    pub max_message_bytes: usize,
    /// The server pings each bot this often; a bot silent for 3 intervals is closed.
    pub ping_interval_ms: u64,
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
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub listen: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: "127.0.0.1:9100".to_string(),
        }
    }
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
    pub exchange: Exchange,
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
            url: None,
            rest_url: None,
            symbols,
            channels,
            depth_limit: default_depth_limit(),
            reconnect_min_ms: default_reconnect_min_ms(),
            reconnect_max_ms: default_reconnect_max_ms(),
            rotate_after_secs: default_rotate_after_secs(),
            stale_after_ms: default_stale_after_ms(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DurableConfig {
    /// Channel patterns kept in capped Redis Streams. Not available in this version: a
    /// non-empty list is refused at start.
    pub channels: Vec<String>,
    pub maxlen: u64,
    pub group: Option<String>,
    pub max_deliveries: u32,
    pub retry_backoff_ms: u64,
}

impl Default for DurableConfig {
    fn default() -> Self {
        DurableConfig {
            channels: Vec::new(),
            maxlen: 100_000,
            group: None,
            max_deliveries: 5,
            retry_backoff_ms: 1_000,
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

/// Kline intervals Binance serves (spot WebSocket streams documentation).
const BINANCE_KLINE_INTERVALS: [&str; 16] = [
    "1s", "1m", "3m", "5m", "15m", "30m", "1h", "2h", "4h", "6h", "8h", "12h", "1d", "3d", "1w",
    "1M",
];

/// Sections whose keys may be overridden from the environment.
const ENV_SECTIONS: [&str; 5] = ["instance", "redis", "bots", "http", "durable"];

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
                            _ if m.name.contains("environment") => format!(
                                "environment MDBRIDGE_{}",
                                key.replacen('.', "_", 1).to_ascii_uppercase()
                            ),
                            _ => source.clone(),
                        },
                        None => source.clone(),
                    };
                    format!("{origin}: {key}: {}", e.kind)
                })
                .collect(),
        })?;
        config.validate(&source, role)?;
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
            ("bots.queue_size", self.bots.queue_size),
            ("bots.max_subscriptions", self.bots.max_subscriptions),
            ("bots.max_message_bytes", self.bots.max_message_bytes),
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
        ] {
            if v == 0 {
                bad(key, "must be greater than 0".into());
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
        if self.bots.tokens.iter().any(|t| t.is_empty()) {
            bad("bots.tokens", "tokens must not be empty strings".into());
        }
        for (i, pat) in self.durable.channels.iter().enumerate() {
            if let Err(e) = Pattern::parse(pat) {
                bad(&format!("durable.channels[{i}]"), e.to_string());
            }
        }
        // Refused rather than ignored: an operator who asks for guaranteed delivery must not
        // believe they have it.
        if !self.durable.channels.is_empty() {
            bad(
                "durable.channels",
                "durable channels (Redis Streams, `since` replay) are not available in this version; \
                 leave the list empty"
                    .into(),
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
            if feed.exchange != Exchange::Binance && feed.exchange != Exchange::Sim {
                bad(
                    &at("exchange"),
                    format!(
                        "`{}` is not supported yet (supported: binance)",
                        feed.exchange
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
            if matches!(feed.exchange, Exchange::Binance | Exchange::Sim) {
                for c in &feed.channels {
                    if let FeedChannel::Candle(i) = c {
                        if !BINANCE_KLINE_INTERVALS.contains(&i.as_str()) {
                            bad(
                                &at("channels"),
                                format!(
                                    "`candle:{i}`: Binance klines come in {}",
                                    BINANCE_KLINE_INTERVALS.join(", ")
                                ),
                            );
                        }
                    }
                }
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

    /// The default config file next to the working directory, when present.
    pub fn default_path() -> Option<PathBuf> {
        let p = PathBuf::from("config.toml");
        p.exists().then_some(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    #[test]
    fn shipped_config_is_the_documented_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml");
        let shipped = Config::load(Some(&path), Role::Hybrid).unwrap();
        let expected = Config {
            feeds: vec![FeedConfig::new(
                Exchange::Binance,
                vec!["BTC-USDT".into(), "ETH-USDT".into()],
                vec![
                    FeedChannel::Trade,
                    FeedChannel::Ticker,
                    FeedChannel::Book,
                    FeedChannel::Candle("1m".into()),
                ],
            )],
            ..Config::default()
        };
        assert_eq!(shipped, expected);
    }

    #[test]
    fn every_problem_is_reported_with_file_key_and_reason() {
        let f = write(
            r#"
[redis]
url = "http://nope"
publish_queue_size = 0
[bots]
listen = "not-an-address"
[[feeds]]
exchange = "binance"
symbols = ["btcusdt"]
channels = ["trade"]
depth_limit = 0
"#,
        );
        let err = Config::load(Some(f.path()), Role::Hybrid).unwrap_err();
        let file = f.path().display().to_string();
        let text = err.to_string();
        for key in [
            "redis.url",
            "redis.publish_queue_size",
            "bots.listen",
            "feeds[0].symbols",
            "feeds[0].depth_limit",
        ] {
            assert!(
                err.problems
                    .iter()
                    .any(|p| p.starts_with(&format!("{file}: {key}: "))),
                "{key} missing in:\n{text}"
            );
        }
        assert_eq!(err.problems.len(), 5, "{text}");
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_refused() {
        let f = write("[redis]\nurll = \"redis://x\"\n");
        let err = Config::load(Some(f.path()), Role::Executor).unwrap_err();
        assert!(err.problems[0].contains("redis"), "{err}");
        assert!(err.problems[0].contains("urll"), "{err}");

        let f = write("[bots]\nqueue_size = \"big\"\n");
        let err = Config::load(Some(f.path()), Role::Executor).unwrap_err();
        assert!(err.problems[0].contains("bots.queue_size"), "{err}");

        let f = write("[bots]\nslow_client = \"ignore\"\n");
        assert!(Config::load(Some(f.path()), Role::Executor).is_err());

        let f = write("[[feeds]]\nexchange = \"binance\"\nsymbols = [\"BTC-USDT\"]\nchannels = [\"candle:7m\"]\n");
        let err = Config::load(Some(f.path()), Role::Publisher).unwrap_err();
        assert!(
            err.to_string().contains("candle:7m`: Binance klines"),
            "{err}"
        );

        let f = write("[[feeds]]\nexchange = \"binance\"\nsymbols = [\"BTC-USDT\"]\nchannels = [\"candle:7q\"]\n");
        let err = Config::load(Some(f.path()), Role::Publisher).unwrap_err();
        assert!(err.to_string().contains("candle:7q"), "{err}");
    }

    #[test]
    fn redis_tls_files_need_rediss_and_go_in_pairs() {
        let f = write("[redis]\nurl = \"redis://h:6379/0\"\ntls_ca_file = \"/ca.pem\"\n");
        let err = Config::load(Some(f.path()), Role::Executor).unwrap_err();
        assert!(
            err.to_string()
                .contains("redis.tls_ca_file: needs a rediss:// url"),
            "{err}"
        );
        let f = write("[redis]\nurl = \"rediss://h:6380/0\"\ntls_cert_file = \"/c.pem\"\n");
        let err = Config::load(Some(f.path()), Role::Executor).unwrap_err();
        assert!(err.to_string().contains("go together"), "{err}");
        let f = write(
            "[redis]\nurl = \"rediss://u:p@h:6380/0\"\ntls_ca_file = \"/ca.pem\"\ntls_cert_file = \"/c.pem\"\ntls_key_file = \"/k.pem\"\nmax_patterns = 0\n",
        );
        let config = Config::load(Some(f.path()), Role::Executor).unwrap();
        assert_eq!(config.redis.max_patterns, 0);
        assert_eq!(
            config.redis.tls_key_file.as_deref(),
            Some(Path::new("/k.pem"))
        );
    }

    #[test]
    fn redis_sentinels_and_master_name_go_together_and_must_be_urls() {
        let f = write("[redis]\nsentinels = [\"redis://h:26379\"]\n");
        let err = Config::load(Some(f.path()), Role::Executor).unwrap_err();
        assert!(err.to_string().contains("go together"), "{err}");
        let f = write("[redis]\nmaster_name = \"m\"\n");
        let err = Config::load(Some(f.path()), Role::Executor).unwrap_err();
        assert!(err.to_string().contains("go together"), "{err}");
        let f = write(
            "[redis]\nmaster_name = \"m\"\nsentinels = [\"redis://h:26379\", \"http://:secret@h\"]\n",
        );
        let err = Config::load(Some(f.path()), Role::Executor).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("entry 1 is not a Redis URL"), "{text}");
        assert!(!text.contains("secret"), "{text}");
        let f = write(
            "[redis]\nmaster_name = \"m\"\nsentinels = [\"redis://u:p@h1:26379\", \"redis://h2:26379\"]\n",
        );
        let config = Config::load(Some(f.path()), Role::Executor).unwrap();
        assert_eq!(config.redis.master_name, "m");
        assert_eq!(config.redis.sentinels.len(), 2);
    }

    #[test]
    fn durable_channels_are_refused_not_ignored() {
        let f = write("[durable]\nchannels = [\"trade:*:*\"]\n");
        let err = Config::load(Some(f.path()), Role::Executor).unwrap_err();
        assert!(
            err.to_string()
                .contains("durable.channels: durable channels"),
            "{err}"
        );
        let f = write("[durable]\nchannels = [\"trade:*\"]\n");
        let err = Config::load(Some(f.path()), Role::Executor).unwrap_err();
        assert!(err.to_string().contains("durable.channels[0]"), "{err}");
    }

    #[test]
    fn missing_file_and_missing_feeds() {
        let err = Config::load(
            Some(Path::new("/nonexistent/mdbridge.toml")),
            Role::Executor,
        )
        .unwrap_err();
        assert!(err.to_string().contains("file not found"));
        let f = write("");
        let err = Config::load(Some(f.path()), Role::Publisher).unwrap_err();
        assert!(err.to_string().contains("feeds"), "{err}");
        assert!(Config::load(Some(f.path()), Role::Executor).is_ok());
    }
}
