//! Checks that an event read from Redis is one PROTOCOL §2 allows on the channel it came
//! on, before any bot sees it: the event text is forwarded verbatim, so what passes here
//! is exactly what bots receive.
//!
//! - It must belong to the channel: `type`, `exchange`, `symbol` and (candles) `interval`
//!   equal the channel's segments. A trade for ETH-USDT on the BTC-USDT channel is refused.
//! - Field types: prices and sizes are strings of decimal digits (a JSON number's text:
//!   digits, an optional fraction, an optional exponent; no sign, at most
//!   [`MAX_DECIMAL_LEN`] bytes), times are unsigned integers, `side` is `buy`/`sell`/null,
//!   `action` and `state` are in their enums, `closed` is a bool. Required fields must be
//!   present (a nullable one may be absent: read as null); a field appearing twice is
//!   refused. Unknown extra fields are allowed, so a newer publisher can add fields
//!   without older executors dropping its events.
//! - Times (`ts_recv`, `ts`, a candle's `start`) at most [`MAX_FUTURE_MICROS`] ahead of
//!   this host's clock: a `ts_recv` of 2^64-1 is refused, honest clock skew is not.
//!
//! Non-book events are parsed into borrowed structs (no allocation); book events are
//! parsed into [`Book`] once, which the caller keeps for its book cache. The size bound
//! and the signature are checked by the caller before this runs. This module does not
//! count or log: it only says why.

use std::borrow::Cow;

use serde::Deserialize;

use crate::event::{Book, Channel, EventType, Exchange, Side, StatusState};

/// How far ahead of this host's clock an event time may be (1 hour, in µs).
pub const MAX_FUTURE_MICROS: u64 = 3_600_000_000;

/// Longest price or size text accepted.
pub const MAX_DECIMAL_LEN: usize = 64;

/// Why an event was refused; [`Invalid::reason`] is its metric label.
#[derive(Debug, thiserror::Error)]
pub enum Invalid {
    #[error("event does not belong on channel `{channel}`: its {what} differs")]
    WrongChannel { channel: String, what: &'static str },
    #[error("event fields: {0}")]
    Json(#[from] serde_json::Error),
    #[error("event field `{field}`: {why}")]
    Field {
        field: &'static str,
        why: &'static str,
    },
    #[error("`{field}` = {value} is more than an hour ahead of this host's clock")]
    Future { field: &'static str, value: u64 },
}

impl Invalid {
    pub fn reason(&self) -> &'static str {
        match self {
            Invalid::WrongChannel { .. } => "channel",
            Invalid::Json(_) | Invalid::Field { .. } => "field",
            Invalid::Future { .. } => "ts",
        }
    }
}

/// What a valid event gives the caller.
pub struct Checked {
    pub ts_recv: u64,
    /// The parsed event, for book channels only.
    pub book: Option<Book>,
}

/// Validates `raw`, the event object of an envelope received on `channel`, at `now` (µs).
pub fn event(channel: &Channel, raw: &str, now: u64) -> Result<Checked, Invalid> {
    let ts_limit = now.saturating_add(MAX_FUTURE_MICROS);
    let kind = channel.kind();
    let head = match kind {
        EventType::Trade => {
            let e: TradeRef<'_> = serde_json::from_str(raw)?;
            decimal("price", e.price)?;
            decimal("size", e.size)?;
            nonempty("trade_id", e.trade_id)?;
            Head::of(e.kind, e.exchange, Some(e.symbol), e.ts, e.ts_recv)
        }
        EventType::Ticker => {
            let e: TickerRef<'_> = serde_json::from_str(raw)?;
            for (field, v) in [
                ("bid", e.bid),
                ("bid_size", e.bid_size),
                ("ask", e.ask),
                ("ask_size", e.ask_size),
                ("last", e.last),
                ("volume_24h", e.volume_24h),
            ] {
                if let Some(v) = v {
                    decimal(field, v)?;
                }
            }
            Head::of(e.kind, e.exchange, Some(e.symbol), e.ts, e.ts_recv)
        }
        EventType::Candle => {
            let e: CandleRef<'_> = serde_json::from_str(raw)?;
            for (field, v) in [
                ("open", e.open),
                ("high", e.high),
                ("low", e.low),
                ("close", e.close),
                ("volume", e.volume),
            ] {
                decimal(field, v)?;
            }
            if segment(channel, 3) != Some(e.interval) {
                return Err(wrong(channel, "interval"));
            }
            not_future("start", e.start, ts_limit)?;
            let _ = e.closed;
            Head::of(e.kind, e.exchange, Some(e.symbol), e.ts, e.ts_recv)
        }
        EventType::Status => {
            let e: StatusRef<'_> = serde_json::from_str(raw)?;
            let _ = (e.state, e.detail);
            Head::of(e.kind, e.exchange, None, e.ts, e.ts_recv)
        }
        EventType::Book => {
            // The type is not a field of `Book`: read it alone (a scan, no allocation),
            // then parse the book once, directly.
            let tag: TypeRef = serde_json::from_str(raw)?;
            let b: Book = serde_json::from_str(raw)?;
            for level in b.bids.iter().chain(&b.asks) {
                decimal("bids/asks price", level.0.as_str())?;
                decimal("bids/asks size", level.1.as_str())?;
            }
            let head = Head::of(tag.kind, b.exchange, Some(&b.symbol), b.ts, b.ts_recv);
            head.check(channel, ts_limit)?;
            return Ok(Checked {
                ts_recv: b.ts_recv,
                book: Some(b),
            });
        }
    };
    head.check(channel, ts_limit)?;
    Ok(Checked {
        ts_recv: head.ts_recv,
        book: None,
    })
}

/// The fields every event shares.
struct Head<'a> {
    kind: EventType,
    exchange: Exchange,
    symbol: Option<&'a str>,
    ts: Option<u64>,
    ts_recv: u64,
}

impl<'a> Head<'a> {
    fn of(
        kind: EventType,
        exchange: Exchange,
        symbol: Option<&'a str>,
        ts: Option<u64>,
        ts_recv: u64,
    ) -> Head<'a> {
        Head {
            kind,
            exchange,
            symbol,
            ts,
            ts_recv,
        }
    }

    fn check(&self, channel: &Channel, ts_limit: u64) -> Result<(), Invalid> {
        if self.kind != channel.kind() {
            return Err(wrong(channel, "type"));
        }
        if self.exchange != channel.exchange() {
            return Err(wrong(channel, "exchange"));
        }
        if let Some(symbol) = self.symbol {
            if segment(channel, 2) != Some(symbol) {
                return Err(wrong(channel, "symbol"));
            }
        }
        not_future("ts_recv", self.ts_recv, ts_limit)?;
        if let Some(ts) = self.ts {
            not_future("ts", ts, ts_limit)?;
        }
        Ok(())
    }
}

fn wrong(channel: &Channel, what: &'static str) -> Invalid {
    Invalid::WrongChannel {
        channel: channel.to_string(),
        what,
    }
}

/// Segment `i` of the channel name (`type:exchange:symbol:interval`).
fn segment(channel: &Channel, i: usize) -> Option<&str> {
    channel.as_str().split(':').nth(i)
}

/// Refuses a time more than [`MAX_FUTURE_MICROS`] ahead (`limit` = now + that).
pub fn not_future(field: &'static str, value: u64, limit: u64) -> Result<(), Invalid> {
    if value > limit {
        return Err(Invalid::Future { field, value });
    }
    Ok(())
}

fn nonempty(field: &'static str, s: &str) -> Result<(), Invalid> {
    if s.is_empty() {
        return Err(Invalid::Field {
            field,
            why: "must not be empty",
        });
    }
    Ok(())
}

/// A price or size: the text of an unsigned JSON number (`100.10`, `0.00000000`, `1e-8`).
pub fn decimal(field: &'static str, s: &str) -> Result<(), Invalid> {
    if is_decimal(s) {
        Ok(())
    } else {
        Err(Invalid::Field {
            field,
            why: "expected a string of decimal digits",
        })
    }
}

fn is_decimal(s: &str) -> bool {
    let b = s.as_bytes();
    if b.is_empty() || b.len() > MAX_DECIMAL_LEN {
        return false;
    }
    let digits = |i: &mut usize| {
        let start = *i;
        while *i < b.len() && b[*i].is_ascii_digit() {
            *i += 1;
        }
        *i - start
    };
    let mut i = 0;
    let int = digits(&mut i);
    let mut frac = 0;
    if i < b.len() && b[i] == b'.' {
        i += 1;
        frac = digits(&mut i);
    }
    if int + frac == 0 {
        return false;
    }
    if i < b.len() && (b[i] == b'e' || b[i] == b'E') {
        i += 1;
        if i < b.len() && (b[i] == b'+' || b[i] == b'-') {
            i += 1;
        }
        if digits(&mut i) == 0 {
            return false;
        }
    }
    i == b.len()
}

#[derive(Deserialize)]
struct TypeRef {
    #[serde(rename = "type")]
    kind: EventType,
}

#[derive(Deserialize)]
struct TradeRef<'a> {
    #[serde(rename = "type")]
    kind: EventType,
    exchange: Exchange,
    symbol: &'a str,
    ts: Option<u64>,
    ts_recv: u64,
    trade_id: &'a str,
    price: &'a str,
    size: &'a str,
    // Present and null, or absent: the exchange did not say.
    #[allow(dead_code)]
    side: Option<Side>,
}

#[derive(Deserialize)]
struct TickerRef<'a> {
    #[serde(rename = "type")]
    kind: EventType,
    exchange: Exchange,
    symbol: &'a str,
    ts: Option<u64>,
    ts_recv: u64,
    #[serde(borrow)]
    bid: Option<&'a str>,
    #[serde(borrow)]
    bid_size: Option<&'a str>,
    #[serde(borrow)]
    ask: Option<&'a str>,
    #[serde(borrow)]
    ask_size: Option<&'a str>,
    #[serde(borrow)]
    last: Option<&'a str>,
    #[serde(borrow)]
    volume_24h: Option<&'a str>,
}

#[derive(Deserialize)]
struct CandleRef<'a> {
    #[serde(rename = "type")]
    kind: EventType,
    exchange: Exchange,
    symbol: &'a str,
    ts: Option<u64>,
    ts_recv: u64,
    interval: &'a str,
    start: u64,
    open: &'a str,
    high: &'a str,
    low: &'a str,
    close: &'a str,
    volume: &'a str,
    closed: bool,
}

#[derive(Deserialize)]
struct StatusRef<'a> {
    #[serde(rename = "type")]
    kind: EventType,
    exchange: Exchange,
    ts: Option<u64>,
    ts_recv: u64,
    state: StatusState,
    // Free text may hold escapes (quotes, newlines): borrowed when it can be.
    #[serde(borrow)]
    detail: Option<Cow<'a, str>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_700_000_000_000_000;

    fn check(channel: &str, raw: &str) -> Result<Checked, Invalid> {
        event(&Channel::parse(channel).unwrap(), raw, NOW)
    }

    fn reason(channel: &str, raw: &str) -> &'static str {
        match check(channel, raw) {
            Ok(_) => "ok",
            Err(e) => e.reason(),
        }
    }

    const TRADE: &str = r#"{"type":"trade","exchange":"binance","symbol":"BTC-USDT","ts":1,"ts_recv":2,"trade_id":"7","price":"100.10","size":"0.50000000","side":"buy"}"#;

    #[test]
    fn events_the_bridge_produces_pass() {
        let ok = [
            ("trade:binance:BTC-USDT", TRADE.to_string()),
            (
                "trade:binance:BTC-USDT",
                TRADE.replace(r#""side":"buy""#, r#""side":null"#),
            ),
            (
                "ticker:binance:BTC-USDT",
                r#"{"type":"ticker","exchange":"binance","symbol":"BTC-USDT","ts":null,"ts_recv":2,"bid":"1.0","bid_size":"2","ask":null,"ask_size":null,"last":"1e-8","volume_24h":"10"}"#.into(),
            ),
            (
                "candle:binance:BTC-USDT:1m",
                r#"{"type":"candle","exchange":"binance","symbol":"BTC-USDT","ts":1,"ts_recv":2,"interval":"1m","start":0,"open":"1","high":"2","low":"0.5","close":"1.5","volume":"3","closed":false}"#.into(),
            ),
            (
                "status:binance",
                r#"{"type":"status","exchange":"binance","ts":null,"ts_recv":2,"state":"resync","detail":"gap \"x\"\n"}"#.into(),
            ),
            (
                "book:binance:BTC-USDT",
                r#"{"type":"book","exchange":"binance","symbol":"BTC-USDT","ts":null,"ts_recv":2,"action":"snapshot","bids":[["1.0","2"]],"asks":[],"seq":5,"prev_seq":null}"#.into(),
            ),
            (
                "trade:binance:BTC-USDT",
                TRADE.replace(r#""side":"buy""#, r#""side":"buy","extra":{"future":1}"#),
            ),
        ];
        for (c, raw) in ok {
            assert!(check(c, &raw).is_ok(), "{raw}: {:?}", check(c, &raw).err());
        }
        let book = check("book:binance:BTC-USDT", &ok_book()).unwrap();
        assert_eq!(book.book.unwrap().seq, Some(5));
        assert_eq!(check("trade:binance:BTC-USDT", TRADE).unwrap().ts_recv, 2);
    }

    fn ok_book() -> String {
        r#"{"type":"book","exchange":"binance","symbol":"BTC-USDT","ts":null,"ts_recv":2,"action":"delta","bids":[],"asks":[["3","0"]],"seq":5,"prev_seq":4}"#.into()
    }

    #[test]
    fn events_that_do_not_belong_to_the_channel_are_refused() {
        assert_eq!(reason("trade:binance:ETH-USDT", TRADE), "channel");
        assert_eq!(reason("trade:kraken:BTC-USDT", TRADE), "channel");
        assert_eq!(reason("ticker:binance:BTC-USDT", TRADE), "channel", "type");
        assert_eq!(
            reason("book:binance:ETH-USDT", &ok_book()),
            "channel",
            "books too"
        );
        let candle = r#"{"type":"candle","exchange":"binance","symbol":"BTC-USDT","ts":1,"ts_recv":2,"interval":"5m","start":0,"open":"1","high":"2","low":"0.5","close":"1.5","volume":"3","closed":true}"#;
        assert_eq!(reason("candle:binance:BTC-USDT:1m", candle), "channel");
        assert_eq!(
            reason("status:binance", &TRADE.replace("\"trade\"", "\"status\"")),
            "field",
            "a status needs a state"
        );
    }

    #[test]
    fn wrong_field_types_are_refused() {
        for (from, to) in [
            (r#""price":"100.10""#, r#""price":100.10"#),
            (r#""price":"100.10""#, r#""price":"-1""#),
            (r#""price":"100.10""#, r#""price":"1,5""#),
            (r#""price":"100.10""#, r#""price":"""#),
            (r#""price":"100.10""#, r#""price":".""#),
            (r#""price":"100.10""#, r#""price":"NaN""#),
            (r#""size":"0.50000000""#, r#""size":"1e""#),
            (r#""ts":1"#, r#""ts":"1""#),
            (r#""ts":1"#, r#""ts":-1"#),
            (r#""ts_recv":2"#, r#""ts_recv":2.5"#),
            (r#","ts_recv":2"#, ""),
            (r#""side":"buy""#, r#""side":"long""#),
            (r#""trade_id":"7""#, r#""trade_id":7"#),
            (r#""trade_id":"7""#, r#""trade_id":"""#),
            (r#""price":"100.10""#, r#""price":"100.10","price":"1""#),
        ] {
            let raw = TRADE.replace(from, to);
            assert_ne!(raw, TRADE);
            assert_eq!(reason("trade:binance:BTC-USDT", &raw), "field", "{raw}");
        }
        let long = format!(r#""price":"{}""#, "1".repeat(MAX_DECIMAL_LEN + 1));
        assert_eq!(
            reason(
                "trade:binance:BTC-USDT",
                &TRADE.replace(r#""price":"100.10""#, &long)
            ),
            "field"
        );
        assert_eq!(
            reason(
                "status:binance",
                r#"{"type":"status","exchange":"binance","ts":null,"ts_recv":2,"state":"close all positions","detail":null}"#
            ),
            "field"
        );
        assert_eq!(
            reason(
                "book:binance:BTC-USDT",
                &ok_book().replace(r#"["3","0"]"#, r#"["3","zero"]"#)
            ),
            "field"
        );
        assert_eq!(
            reason(
                "book:binance:BTC-USDT",
                &ok_book().replace(r#""delta""#, r#""replace""#)
            ),
            "field"
        );
    }

    #[test]
    fn times_far_in_the_future_are_refused_skew_is_not() {
        let at = |field: &str, v: u64| {
            let raw = TRADE.replace(&format!(r#""{field}":"#), &format!(r#""{field}":{v},"x":"#));
            reason("trade:binance:BTC-USDT", &raw)
        };
        assert_eq!(at("ts_recv", u64::MAX), "ts");
        assert_eq!(at("ts", NOW + MAX_FUTURE_MICROS + 1), "ts");
        assert_eq!(
            at("ts_recv", NOW + 60_000_000),
            "ok",
            "a minute of skew is fine"
        );
    }

    #[test]
    fn decimals() {
        for ok in [
            "0",
            "100.10",
            "0.00000000",
            "1e-8",
            "1E+3",
            "5.",
            ".5",
            "007",
        ] {
            assert!(is_decimal(ok), "{ok}");
        }
        for bad in [
            "", ".", "-1", "+1", "1.2.3", "1e", "e5", " 1", "1 ", "0x10", "∞",
        ] {
            assert!(!is_decimal(bad), "{bad}");
        }
    }
}
