//! Binance's payloads as the documentation shows them: one borrowed struct per stream
//! (trade, 24hrTicker, bookTicker, depthUpdate, kline) and the REST depth body, each with
//! the documented example. Mapping them to events is `super`'s job.

use serde::Deserialize;

/// Trade stream `<symbol>@trade`.
///
/// ```json
/// {"e":"trade","E":1672515782136,"s":"BNBBTC","t":12345,"p":"0.001","q":"100",
///  "b":88,"a":50,"T":1672515782136,"m":true,"M":true}
/// ```
/// <https://github.com/binance/binance-spot-api-docs/blob/master/web-socket-streams.md#trade-streams>
#[derive(Debug, Deserialize)]
pub struct TradeWire<'a> {
    #[serde(rename = "s")]
    pub symbol: &'a str,
    #[serde(rename = "t")]
    pub trade_id: u64,
    #[serde(rename = "p")]
    pub price: &'a str,
    #[serde(rename = "q")]
    pub qty: &'a str,
    #[serde(rename = "T")]
    pub trade_time: u64,
    /// Is the buyer the market maker? Then the taker sold.
    #[serde(rename = "m")]
    pub buyer_is_maker: bool,
}

/// Individual symbol ticker `<symbol>@ticker` (24 h rolling window).
///
/// ```json
/// {"e":"24hrTicker","E":1672515782136,"s":"BNBBTC","p":"0.0015","P":"250.00","w":"0.0018",
///  "x":"0.0009","c":"0.0025","Q":"10","b":"0.0024","B":"10","a":"0.0026","A":"100",
///  "o":"0.0010","h":"0.0025","l":"0.0010","v":"10000","q":"18","O":0,"C":86400000,
///  "F":0,"L":18150,"n":18151}
/// ```
/// <https://github.com/binance/binance-spot-api-docs/blob/master/web-socket-streams.md#individual-symbol-ticker-streams>
#[derive(Debug, Deserialize)]
pub struct TickerWire<'a> {
    #[serde(rename = "E")]
    pub event_time: u64,
    #[serde(rename = "s")]
    pub symbol: &'a str,
    #[serde(rename = "c")]
    pub last: &'a str,
    #[serde(rename = "b")]
    pub bid: &'a str,
    #[serde(rename = "B")]
    pub bid_qty: &'a str,
    #[serde(rename = "a")]
    pub ask: &'a str,
    #[serde(rename = "A")]
    pub ask_qty: &'a str,
    /// Total traded base asset volume.
    #[serde(rename = "v")]
    pub volume: &'a str,
}

/// Book ticker `<symbol>@bookTicker` (no `e` field, no time).
///
/// ```json
/// {"u":400900217,"s":"BNBUSDT","b":"25.35190000","B":"31.21000000","a":"25.36520000","A":"40.66000000"}
/// ```
/// <https://github.com/binance/binance-spot-api-docs/blob/master/web-socket-streams.md#individual-symbol-book-ticker-streams>
#[derive(Debug, Deserialize)]
pub struct BookTickerWire<'a> {
    #[serde(rename = "s")]
    pub symbol: &'a str,
    #[serde(rename = "b")]
    pub bid: &'a str,
    #[serde(rename = "B")]
    pub bid_qty: &'a str,
    #[serde(rename = "a")]
    pub ask: &'a str,
    #[serde(rename = "A")]
    pub ask_qty: &'a str,
}

/// Diff. depth stream `<symbol>@depth@100ms`.
///
/// ```json
/// {"e":"depthUpdate","E":1672515782136,"s":"BNBBTC","U":157,"u":160,
///  "b":[["0.0024","10"]],"a":[["0.0026","100"]]}
/// ```
/// <https://github.com/binance/binance-spot-api-docs/blob/master/web-socket-streams.md#diff-depth-stream>
#[derive(Debug, Deserialize)]
pub struct DepthUpdateWire<'a> {
    #[serde(rename = "E")]
    pub event_time: u64,
    #[serde(rename = "s")]
    pub symbol: &'a str,
    /// First update id in the event.
    #[serde(rename = "U")]
    pub first_update_id: u64,
    /// Final update id in the event.
    #[serde(rename = "u")]
    pub final_update_id: u64,
    #[serde(rename = "b", borrow)]
    pub bids: Vec<(&'a str, &'a str)>,
    #[serde(rename = "a", borrow)]
    pub asks: Vec<(&'a str, &'a str)>,
}

/// Kline stream `<symbol>@kline_<interval>`.
///
/// ```json
/// {"e":"kline","E":1672515782136,"s":"BNBBTC","k":{"t":1672515780000,"T":1672515839999,
///  "s":"BNBBTC","i":"1m","f":100,"L":200,"o":"0.0010","c":"0.0020","h":"0.0025",
///  "l":"0.0015","v":"1000","n":100,"x":false,"q":"1.0000","V":"500","Q":"0.500","B":"123456"}}
/// ```
/// <https://github.com/binance/binance-spot-api-docs/blob/master/web-socket-streams.md#klinecandlestick-streams-for-utc>
#[derive(Debug, Deserialize)]
pub struct KlineWire<'a> {
    #[serde(rename = "E")]
    pub event_time: u64,
    #[serde(rename = "s")]
    pub symbol: &'a str,
    #[serde(rename = "k", borrow)]
    pub kline: KlineBody<'a>,
}

#[derive(Debug, Deserialize)]
pub struct KlineBody<'a> {
    #[serde(rename = "t")]
    pub start: u64,
    #[serde(rename = "i")]
    pub interval: &'a str,
    #[serde(rename = "o")]
    pub open: &'a str,
    #[serde(rename = "h")]
    pub high: &'a str,
    #[serde(rename = "l")]
    pub low: &'a str,
    #[serde(rename = "c")]
    pub close: &'a str,
    #[serde(rename = "v")]
    pub volume: &'a str,
    #[serde(rename = "x")]
    pub closed: bool,
}

/// REST order book `GET /api/v3/depth?symbol=BNBBTC&limit=1000`.
///
/// ```json
/// {"lastUpdateId":1027024,"bids":[["4.00000000","431.00000000"]],"asks":[["4.00000200","12.00000000"]]}
/// ```
/// <https://github.com/binance/binance-spot-api-docs/blob/master/rest-api.md#order-book>
#[derive(Debug, Deserialize)]
pub struct DepthSnapshotWire {
    #[serde(rename = "lastUpdateId")]
    pub last_update_id: u64,
    pub bids: Vec<(String, String)>,
    pub asks: Vec<(String, String)>,
}
