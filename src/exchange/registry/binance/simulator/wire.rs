//! Binance's wire format of the simulated market: numbers as strings with 8 decimals,
//! the stream payloads (trade, aggTrade, depthUpdate, bookTicker, 24hrTicker, kline) and
//! the REST depth body, and the shared frames they are published in.

use std::fmt::Write as _;

use axum::extract::ws::Utf8Bytes;

use super::{FrameInner, Kind, SymbolEntry, Topic};
use crate::simulator::{
    Bbo, BookDiff, Candle, Market, Price, Qty, Stats, Trade, KLINE_INTERVALS, PRICE_DECIMALS,
};

pub(super) fn push_price(s: &mut String, p: Price) {
    let scale = 10i64.pow(PRICE_DECIMALS);
    let sign = if p < 0 { "-" } else { "" };
    let a = p.unsigned_abs();
    let _ = write!(
        s,
        "{sign}{}.{:02}000000",
        a / scale as u64,
        a % scale as u64
    );
}

/// Quantity in 1e-8 units.
pub(super) fn push_qty(s: &mut String, q: u128) {
    let _ = write!(s, "{}.{:08}", q / 100_000_000, q % 100_000_000);
}

/// Quote amount in 1e-10 units (price ticks * qty units), rendered with 8
/// decimals (truncated).
pub(super) fn push_quote(s: &mut String, v: u128) {
    push_qty(s, v / 100);
}

#[cfg(test)]
pub(super) fn price_str(p: Price) -> String {
    let mut s = String::with_capacity(24);
    push_price(&mut s, p);
    s
}

#[cfg(test)]
pub(super) fn qty_str(q: Qty) -> String {
    let mut s = String::with_capacity(24);
    push_qty(&mut s, q as u128);
    s
}

pub(super) fn push_levels<'a>(s: &mut String, levels: impl Iterator<Item = (&'a Price, &'a Qty)>) {
    s.push('[');
    for (i, (p, q)) in levels.enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str("[\"");
        push_price(s, *p);
        s.push_str("\",\"");
        push_qty(s, *q as u128);
        s.push_str("\"]");
    }
    s.push(']');
}

pub(super) fn render_trade(sym: &str, e: i64, t: &Trade) -> String {
    let mut s = String::with_capacity(160);
    let _ = write!(s, r#"{{"e":"trade","E":{e},"s":"{sym}","t":{},"p":""#, t.id);
    push_price(&mut s, t.price);
    s.push_str(r#"","q":""#);
    push_qty(&mut s, t.qty as u128);
    let _ = write!(s, r#"","T":{},"m":{},"M":true}}"#, t.time, t.buyer_is_maker);
    s
}

pub(super) fn render_agg_trade(sym: &str, e: i64, t: &Trade) -> String {
    // One aggregate per trade: the simulator's taker orders fill one level.
    let mut s = String::with_capacity(180);
    let _ = write!(
        s,
        r#"{{"e":"aggTrade","E":{e},"s":"{sym}","a":{},"p":""#,
        t.id
    );
    push_price(&mut s, t.price);
    s.push_str(r#"","q":""#);
    push_qty(&mut s, t.qty as u128);
    let _ = write!(
        s,
        r#"","f":{id},"l":{id},"T":{},"m":{},"M":true}}"#,
        t.time,
        t.buyer_is_maker,
        id = t.id
    );
    s
}

pub(super) fn render_depth_update(sym: &str, e: i64, d: &BookDiff) -> String {
    let mut s = String::with_capacity(128 + 48 * (d.bids.len() + d.asks.len()));
    let _ = write!(
        s,
        r#"{{"e":"depthUpdate","E":{e},"s":"{sym}","U":{},"u":{},"b":"#,
        d.first_update_id, d.last_update_id
    );
    push_levels(&mut s, d.bids.iter().map(|(p, q)| (p, q)));
    s.push_str(r#","a":"#);
    push_levels(&mut s, d.asks.iter().map(|(p, q)| (p, q)));
    s.push('}');
    s
}

pub(super) fn render_book_ticker(sym: &str, u: u64, b: &Bbo) -> String {
    let mut s = String::with_capacity(128);
    let _ = write!(s, r#"{{"u":{u},"s":"{sym}","b":""#);
    push_price(&mut s, b.bid.0);
    s.push_str(r#"","B":""#);
    push_qty(&mut s, b.bid.1 as u128);
    s.push_str(r#"","a":""#);
    push_price(&mut s, b.ask.0);
    s.push_str(r#"","A":""#);
    push_qty(&mut s, b.ask.1 as u128);
    s.push_str("\"}");
    s
}

pub(super) fn render_ticker(sym: &str, e: i64, st: &Stats, bbo: Option<Bbo>) -> String {
    let mut s = String::with_capacity(512);
    let _ = write!(s, r#"{{"e":"24hrTicker","E":{e},"s":"{sym}","p":""#);
    push_price(&mut s, st.last - st.open);
    let pct = if st.open != 0 {
        (st.last - st.open) as f64 * 100.0 / st.open as f64
    } else {
        0.0
    };
    let _ = write!(s, r#"","P":"{pct:.3}","w":""#);
    // Weighted average price in 1e-8 units: quote(1e-10) / volume(1e-8) * 1e6.
    let w = (st.quote_volume * 1_000_000)
        .checked_div(st.volume)
        .unwrap_or(st.last as u128 * 1_000_000);
    push_qty(&mut s, w);
    s.push_str(r#"","x":""#);
    push_price(&mut s, st.prev_price);
    s.push_str(r#"","c":""#);
    push_price(&mut s, st.last);
    s.push_str(r#"","Q":""#);
    push_qty(&mut s, st.last_qty as u128);
    let (bid, ask) = bbo.map_or(((0, 0), (0, 0)), |b| (b.bid, b.ask));
    s.push_str(r#"","b":""#);
    push_price(&mut s, bid.0);
    s.push_str(r#"","B":""#);
    push_qty(&mut s, bid.1 as u128);
    s.push_str(r#"","a":""#);
    push_price(&mut s, ask.0);
    s.push_str(r#"","A":""#);
    push_qty(&mut s, ask.1 as u128);
    s.push_str(r#"","o":""#);
    push_price(&mut s, st.open);
    s.push_str(r#"","h":""#);
    push_price(&mut s, st.high);
    s.push_str(r#"","l":""#);
    push_price(&mut s, st.low);
    s.push_str(r#"","v":""#);
    push_qty(&mut s, st.volume);
    s.push_str(r#"","q":""#);
    push_quote(&mut s, st.quote_volume);
    // Binance uses -1 for the first/last trade id when there were no trades.
    let (first, last) = if st.count == 0 {
        (-1, -1)
    } else {
        (st.first_trade_id as i64, st.last_trade_id as i64)
    };
    let _ = write!(
        s,
        r#"","O":{},"C":{e},"F":{first},"L":{last},"n":{}}}"#,
        st.open_time, st.count
    );
    s
}

pub(super) fn render_kline(sym: &str, e: i64, c: &Candle, closed: bool) -> String {
    let mut s = String::with_capacity(400);
    let (first, last) = (
        c.first_trade_id.map_or(-1, |v| v as i64),
        c.last_trade_id.map_or(-1, |v| v as i64),
    );
    let _ = write!(
        s,
        r#"{{"e":"kline","E":{e},"s":"{sym}","k":{{"t":{},"T":{},"s":"{sym}","i":"{}","f":{first},"L":{last},"o":""#,
        c.start, c.end, KLINE_INTERVALS[c.interval].0
    );
    push_price(&mut s, c.open);
    s.push_str(r#"","c":""#);
    push_price(&mut s, c.close);
    s.push_str(r#"","h":""#);
    push_price(&mut s, c.high);
    s.push_str(r#"","l":""#);
    push_price(&mut s, c.low);
    s.push_str(r#"","v":""#);
    push_qty(&mut s, c.volume);
    let _ = write!(s, r#"","n":{},"x":{closed},"q":""#, c.count);
    push_quote(&mut s, c.quote_volume);
    s.push_str(r#"","V":""#);
    push_qty(&mut s, c.taker_buy_volume);
    s.push_str(r#"","Q":""#);
    push_quote(&mut s, c.taker_buy_quote_volume);
    s.push_str(r#"","B":"0"}}"#);
    s
}

/// `{"lastUpdateId":N,"bids":[..],"asks":[..]}`, best levels first.
pub(super) fn render_book(m: &Market, limit: usize) -> String {
    let mut s = String::with_capacity(64 + 48 * 2 * limit.min(m.bids.len().max(m.asks.len())));
    let _ = write!(s, r#"{{"lastUpdateId":{},"bids":"#, m.last_update_id);
    push_levels(&mut s, m.bids.iter().rev().take(limit));
    s.push_str(r#","asks":"#);
    push_levels(&mut s, m.asks.iter().take(limit));
    s.push('}');
    s
}

/// Build a frame: the raw payload and its combined-stream wrappers.
pub(super) fn frame(entry: &SymbolEntry, sym: usize, topic: Topic, raw: String) -> FrameInner {
    let kinds: &[Kind] = match topic {
        Topic::Trade => &[Kind::Trade],
        Topic::AggTrade => &[Kind::AggTrade],
        Topic::Depth => &[Kind::Depth, Kind::Depth100],
        Topic::Ticker => &[Kind::Ticker],
        Topic::BookTicker => &[Kind::BookTicker],
        Topic::Kline(i) => &[Kind::Kline(i)][..],
        Topic::Garbage => &[],
    };
    let wrapped = kinds
        .iter()
        .map(|k| {
            let w = format!(
                r#"{{"stream":"{}@{}","data":{raw}}}"#,
                entry.lower,
                k.suffix()
            );
            (*k, Utf8Bytes::from(w))
        })
        .collect();
    FrameInner {
        sym,
        topic,
        raw: Utf8Bytes::from(raw),
        wrapped,
    }
}

pub(super) fn kline_frame(
    entry: &SymbolEntry,
    sym: usize,
    e: i64,
    c: &Candle,
    closed: bool,
) -> FrameInner {
    // The Kline kind needs its index at runtime, so build it here.
    let raw = render_kline(&entry.wire, e, c, closed);
    let kind = Kind::Kline(c.interval);
    let w = format!(
        r#"{{"stream":"{}@{}","data":{raw}}}"#,
        entry.lower,
        kind.suffix()
    );
    FrameInner {
        sym,
        topic: Topic::Kline(c.interval),
        raw: Utf8Bytes::from(raw),
        wrapped: vec![(kind, Utf8Bytes::from(w))],
    }
}
