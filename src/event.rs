//! Normalized market events, channel names and subscription patterns (PROTOCOL §1–§2).
//!
//! This is the leaf module every other part uses: adapters produce [`Event`]s, the bus
//! wraps them in envelopes (see [`crate::envelope`]), the gateway routes them by
//! [`Channel`] and matches bot subscriptions with [`Pattern`]. It knows nothing about
//! sockets, Redis or any exchange's wire format.
//!
//! Prices and sizes are [`Decimal`]s: the exact text the exchange sent, never a float.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Microseconds since the Unix epoch, the unit of every timestamp in the protocol.
pub fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Exchanges known to the protocol (lower case on the wire and in channel names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Exchange {
    Binance,
    Coinbase,
    Kraken,
    Bybit,
    Okx,
    Sim,
}

impl Exchange {
    pub const ALL: [Exchange; 6] = [
        Exchange::Binance,
        Exchange::Coinbase,
        Exchange::Kraken,
        Exchange::Bybit,
        Exchange::Okx,
        Exchange::Sim,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Exchange::Binance => "binance",
            Exchange::Coinbase => "coinbase",
            Exchange::Kraken => "kraken",
            Exchange::Bybit => "bybit",
            Exchange::Okx => "okx",
            Exchange::Sim => "sim",
        }
    }
}

impl fmt::Display for Exchange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Exchange {
    type Err = ChannelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Exchange::ALL
            .into_iter()
            .find(|e| e.as_str() == s)
            .ok_or_else(|| ChannelError::UnknownExchange(s.to_string()))
    }
}

/// The five event types; also the first segment of every channel name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventType {
    Trade,
    Ticker,
    Book,
    Candle,
    Status,
}

impl EventType {
    pub const ALL: [EventType; 5] = [
        EventType::Trade,
        EventType::Ticker,
        EventType::Book,
        EventType::Candle,
        EventType::Status,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Trade => "trade",
            EventType::Ticker => "ticker",
            EventType::Book => "book",
            EventType::Candle => "candle",
            EventType::Status => "status",
        }
    }

    /// Number of `:`-separated segments in a channel of this type.
    fn segments(self) -> usize {
        match self {
            EventType::Status => 2,
            EventType::Candle => 4,
            _ => 3,
        }
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EventType {
    type Err = ChannelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EventType::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| ChannelError::UnknownType(s.to_string()))
    }
}

/// Why a channel name or pattern was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    #[error("empty channel name")]
    Empty,
    #[error("unknown event type `{0}` (expected trade, ticker, book, candle or status)")]
    UnknownType(String),
    #[error("unknown exchange `{0}`")]
    UnknownExchange(String),
    #[error("bad symbol `{0}` (expected BASE-QUOTE in upper case, e.g. BTC-USDT)")]
    BadSymbol(String),
    #[error("bad candle interval `{0}` (expected e.g. 1m, 5m, 1h, 1d)")]
    BadInterval(String),
    #[error("`{name}` has {got} segments, a `{kind}` channel has {want}")]
    SegmentCount {
        name: String,
        kind: &'static str,
        got: usize,
        want: usize,
    },
    #[error("`*` must stand for one whole segment in `{0}`")]
    BadWildcard(String),
}

/// Checks a normalized `BASE-QUOTE` symbol: upper-case letters and digits on both sides.
pub fn valid_symbol(s: &str) -> bool {
    let Some((base, quote)) = s.split_once('-') else {
        return false;
    };
    let part_ok = |p: &str| {
        !p.is_empty()
            && p.len() <= 20
            && p.bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
    };
    part_ok(base) && part_ok(quote)
}

/// Checks a candle interval: a positive number followed by s, m, h, d, w or M.
pub fn valid_interval(s: &str) -> bool {
    let Some(unit) = s.chars().last() else {
        return false;
    };
    let digits = &s[..s.len() - unit.len_utf8()];
    matches!(unit, 's' | 'm' | 'h' | 'd' | 'w' | 'M')
        && !digits.is_empty()
        && digits.len() <= 4
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !digits.starts_with('0')
}

/// Validates one segment at position `index` of a channel whose type is `kind`.
fn check_segment(kind: EventType, index: usize, seg: &str) -> Result<(), ChannelError> {
    match index {
        1 => seg.parse::<Exchange>().map(|_| ()),
        2 if valid_symbol(seg) => Ok(()),
        2 => Err(ChannelError::BadSymbol(seg.to_string())),
        3 if kind == EventType::Candle && valid_interval(seg) => Ok(()),
        _ => Err(ChannelError::BadInterval(seg.to_string())),
    }
}

/// A concrete, validated channel name such as `trade:binance:BTC-USDT`.
///
/// Cheap to clone (shared string); compares and hashes by its text.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Channel {
    text: Arc<str>,
    kind: EventType,
    exchange: Exchange,
}

impl Channel {
    pub fn parse(name: &str) -> Result<Channel, ChannelError> {
        if name.is_empty() {
            return Err(ChannelError::Empty);
        }
        let segs: Vec<&str> = name.split(':').collect();
        let kind: EventType = segs[0].parse()?;
        if segs.len() != kind.segments() {
            return Err(ChannelError::SegmentCount {
                name: name.to_string(),
                kind: kind.as_str(),
                got: segs.len(),
                want: kind.segments(),
            });
        }
        for (i, seg) in segs.iter().enumerate().skip(1) {
            if *seg == "*" {
                return Err(ChannelError::BadWildcard(name.to_string()));
            }
            check_segment(kind, i, seg)?;
        }
        Ok(Channel {
            text: Arc::from(name),
            kind,
            exchange: segs[1].parse()?,
        })
    }

    /// The channel of `kind` for `exchange` and `symbol` (`interval` only for candles).
    pub fn build(
        kind: EventType,
        exchange: Exchange,
        symbol: &str,
        interval: Option<&str>,
    ) -> Channel {
        let text = match (kind, interval) {
            (EventType::Status, _) => format!("status:{exchange}"),
            (EventType::Candle, Some(i)) => format!("candle:{exchange}:{symbol}:{i}"),
            _ => format!("{kind}:{exchange}:{symbol}"),
        };
        Channel {
            text: Arc::from(text),
            kind,
            exchange,
        }
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
    pub fn kind(&self) -> EventType {
        self.kind
    }
    pub fn exchange(&self) -> Exchange {
        self.exchange
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Channel({})", self.text)
    }
}

/// A bot subscription: a channel name where any segment may be `*` (one whole segment).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pattern {
    text: Arc<str>,
    wildcard: bool,
}

impl Pattern {
    pub fn parse(text: &str) -> Result<Pattern, ChannelError> {
        if text.is_empty() {
            return Err(ChannelError::Empty);
        }
        let segs: Vec<&str> = text.split(':').collect();
        for seg in &segs {
            if seg.contains('*') && *seg != "*" {
                return Err(ChannelError::BadWildcard(text.to_string()));
            }
        }
        if segs[0] == "*" {
            // Without a type the shape is unknown: accept 2..=4 segments of valid parts.
            if !(2..=4).contains(&segs.len()) {
                return Err(ChannelError::BadWildcard(text.to_string()));
            }
            if segs[1] != "*" {
                segs[1].parse::<Exchange>()?;
            }
            if segs.len() > 2 && segs[2] != "*" && !valid_symbol(segs[2]) {
                return Err(ChannelError::BadSymbol(segs[2].to_string()));
            }
            if segs.len() > 3 && segs[3] != "*" && !valid_interval(segs[3]) {
                return Err(ChannelError::BadInterval(segs[3].to_string()));
            }
        } else {
            let kind: EventType = segs[0].parse()?;
            if segs.len() != kind.segments() {
                return Err(ChannelError::SegmentCount {
                    name: text.to_string(),
                    kind: kind.as_str(),
                    got: segs.len(),
                    want: kind.segments(),
                });
            }
            for (i, seg) in segs.iter().enumerate().skip(1) {
                if *seg != "*" {
                    check_segment(kind, i, seg)?;
                }
            }
        }
        Ok(Pattern {
            text: Arc::from(text),
            wildcard: segs.contains(&"*"),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// True when the pattern contains a `*` segment.
    pub fn is_wildcard(&self) -> bool {
        self.wildcard
    }

    pub fn matches(&self, channel: &Channel) -> bool {
        if !self.wildcard {
            return *self.text == *channel.text;
        }
        let mut pat = self.text.split(':');
        let mut chan = channel.text.split(':');
        loop {
            match (pat.next(), chan.next()) {
                (None, None) => return true,
                (Some(p), Some(c)) if p == "*" || p == c => {}
                _ => return false,
            }
        }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pattern({})", self.text)
    }
}

/// A price or size exactly as the exchange wrote it (`"0.00100000"` stays `"0.00100000"`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Decimal(pub String);

impl Decimal {
    pub fn new(text: impl Into<String>) -> Decimal {
        Decimal(text.into())
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// True for `"0"`, `"0.0"`, `"0.00000000"`, `"-0"` and the like: a level removal.
    pub fn is_zero(&self) -> bool {
        let digits = self.0.trim_start_matches(['-', '+']);
        !digits.is_empty()
            && digits.bytes().all(|b| b == b'0' || b == b'.')
            && digits.bytes().any(|b| b == b'0')
    }
}

impl From<&str> for Decimal {
    fn from(s: &str) -> Self {
        Decimal(s.to_string())
    }
}

/// Taker side of a trade.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    Buy,
    Sell,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trade {
    pub exchange: Exchange,
    pub symbol: String,
    pub ts: Option<u64>,
    pub ts_recv: u64,
    pub trade_id: String,
    pub price: Decimal,
    pub size: Decimal,
    pub side: Option<Side>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ticker {
    pub exchange: Exchange,
    pub symbol: String,
    pub ts: Option<u64>,
    pub ts_recv: u64,
    pub bid: Option<Decimal>,
    pub bid_size: Option<Decimal>,
    pub ask: Option<Decimal>,
    pub ask_size: Option<Decimal>,
    pub last: Option<Decimal>,
    pub volume_24h: Option<Decimal>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BookAction {
    Snapshot,
    Delta,
}

/// One price level: `[price, size]` on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Level(pub Decimal, pub Decimal);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Book {
    pub exchange: Exchange,
    pub symbol: String,
    pub ts: Option<u64>,
    pub ts_recv: u64,
    pub action: BookAction,
    pub bids: Vec<Level>,
    pub asks: Vec<Level>,
    pub seq: Option<u64>,
    pub prev_seq: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candle {
    pub exchange: Exchange,
    pub symbol: String,
    pub ts: Option<u64>,
    pub ts_recv: u64,
    pub interval: String,
    pub start: u64,
    pub open: Decimal,
    pub high: Decimal,
    pub low: Decimal,
    pub close: Decimal,
    pub volume: Decimal,
    pub closed: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StatusState {
    Connected,
    Disconnected,
    Reconnecting,
    Resync,
    Error,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub exchange: Exchange,
    pub ts: Option<u64>,
    pub ts_recv: u64,
    pub state: StatusState,
    pub detail: Option<String>,
}

/// One normalized event: a flat JSON object tagged by `type`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Event {
    Trade(Trade),
    Ticker(Ticker),
    Book(Book),
    Candle(Candle),
    Status(Status),
}

impl Event {
    pub fn kind(&self) -> EventType {
        match self {
            Event::Trade(_) => EventType::Trade,
            Event::Ticker(_) => EventType::Ticker,
            Event::Book(_) => EventType::Book,
            Event::Candle(_) => EventType::Candle,
            Event::Status(_) => EventType::Status,
        }
    }

    pub fn exchange(&self) -> Exchange {
        match self {
            Event::Trade(e) => e.exchange,
            Event::Ticker(e) => e.exchange,
            Event::Book(e) => e.exchange,
            Event::Candle(e) => e.exchange,
            Event::Status(e) => e.exchange,
        }
    }

    pub fn ts_recv(&self) -> u64 {
        match self {
            Event::Trade(e) => e.ts_recv,
            Event::Ticker(e) => e.ts_recv,
            Event::Book(e) => e.ts_recv,
            Event::Candle(e) => e.ts_recv,
            Event::Status(e) => e.ts_recv,
        }
    }

    /// The channel this event is published on.
    pub fn channel(&self) -> Channel {
        let kind = self.kind();
        let exchange = self.exchange();
        match self {
            Event::Trade(e) => Channel::build(kind, exchange, &e.symbol, None),
            Event::Ticker(e) => Channel::build(kind, exchange, &e.symbol, None),
            Event::Book(e) => Channel::build(kind, exchange, &e.symbol, None),
            Event::Candle(e) => Channel::build(kind, exchange, &e.symbol, Some(&e.interval)),
            Event::Status(_) => Channel::build(kind, exchange, "", None),
        }
    }

    /// Serializes the event once; the bytes are shared from here on.
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing plain structs of strings and integers cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn status(exchange: Exchange, state: StatusState, detail: Option<String>) -> Event {
        Event::Status(Status {
            exchange,
            ts: None,
            ts_recv: now_micros(),
            state,
            detail,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_parse_and_reject() {
        let c = Channel::parse("trade:binance:BTC-USDT").unwrap();
        assert_eq!(c.kind(), EventType::Trade);
        assert_eq!(c.exchange(), Exchange::Binance);
        assert!(Channel::parse("candle:binance:BTC-USDT:1m").is_ok());
        assert!(Channel::parse("status:kraken").is_ok());
        for bad in [
            "",
            "trade",
            "trade:binance",
            "trade:Binance:BTC-USDT",
            "trade:binance:btc-usdt",
            "trade:binance:BTCUSDT",
            "trade:binance:BTC-USDT:1m",
            "candle:binance:BTC-USDT",
            "candle:binance:BTC-USDT:0m",
            "candle:binance:BTC-USDT:1x",
            "quote:binance:BTC-USDT",
            "trade:*:BTC-USDT",
            "status:kraken:BTC-USD",
        ] {
            assert!(Channel::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn patterns_match_whole_segments_only() {
        let chan = |s| Channel::parse(s).unwrap();
        let p = Pattern::parse("trade:*:BTC-USDT").unwrap();
        assert!(p.is_wildcard());
        assert!(p.matches(&chan("trade:binance:BTC-USDT")));
        assert!(p.matches(&chan("trade:kraken:BTC-USDT")));
        assert!(!p.matches(&chan("trade:binance:ETH-USDT")));
        assert!(!p.matches(&chan("ticker:binance:BTC-USDT")));
        let all = Pattern::parse("candle:binance:*:*").unwrap();
        assert!(all.matches(&chan("candle:binance:ETH-USDT:1m")));
        assert!(!all.matches(&chan("trade:binance:ETH-USDT")));
        let any_type = Pattern::parse("*:binance:BTC-USDT").unwrap();
        assert!(any_type.matches(&chan("book:binance:BTC-USDT")));
        assert!(!any_type.matches(&chan("candle:binance:BTC-USDT:1m")));
        let exact = Pattern::parse("book:binance:BTC-USDT").unwrap();
        assert!(!exact.is_wildcard());
        assert!(exact.matches(&chan("book:binance:BTC-USDT")));
        for bad in [
            "trade:bin*:BTC-USDT",
            "trade:**:BTC-USDT",
            "trade:*",
            "*",
            "trade:*:btc",
        ] {
            assert!(Pattern::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn decimal_zero() {
        for z in ["0", "0.0", "0.00000000", "-0", "00.000"] {
            assert!(Decimal::from(z).is_zero(), "{z}");
        }
        for nz in ["0.00000001", "1", "10.0", "", "."] {
            assert!(!Decimal::from(nz).is_zero(), "{nz}");
        }
    }

    #[test]
    fn event_json_is_flat_and_keeps_decimal_text() {
        let e = Event::Trade(Trade {
            exchange: Exchange::Binance,
            symbol: "BTC-USDT".into(),
            ts: Some(1_672_515_782_136_000),
            ts_recv: 1_672_515_782_140_000,
            trade_id: "12345".into(),
            price: "0.00100000".into(),
            size: "100".into(),
            side: Some(Side::Sell),
        });
        let json = String::from_utf8(e.to_json()).unwrap();
        assert_eq!(
            json,
            r#"{"type":"trade","exchange":"binance","symbol":"BTC-USDT","ts":1672515782136000,"ts_recv":1672515782140000,"trade_id":"12345","price":"0.00100000","size":"100","side":"sell"}"#
        );
        let back: Event = serde_json::from_str(&json).unwrap();
        assert_eq!(back, e);
        assert_eq!(e.channel().as_str(), "trade:binance:BTC-USDT");
    }

    #[test]
    fn status_has_no_symbol() {
        let e = Event::status(Exchange::Kraken, StatusState::Resync, None);
        let v: serde_json::Value = serde_json::from_slice(&e.to_json()).unwrap();
        assert!(v.get("symbol").is_none());
        assert_eq!(v["state"], "resync");
        assert_eq!(e.channel().as_str(), "status:kraken");
    }
}
