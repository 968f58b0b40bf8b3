//! The one list of venues the bridge speaks: per venue, what config may ask of it (candle
//! intervals), how to build its [`Adapter`], and its simulator, if any.
//!
//! Config validation, [`super::adapter_for`], `mdbridge normalize --exchange` and
//! `mdbridge simulate --exchange` all read this table, so a new venue is one entry here
//! plus its own files (docs/adding-an-exchange.md). It owns no wire format and no socket.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{binance, coinbase, Adapter};
use crate::config::FeedChannel;
use crate::event::Exchange;
use crate::simulator::SimConfig;

/// A running simulator (see [`Venue::simulator`]).
pub type SimFuture = Pin<Box<dyn Future<Output = std::io::Result<()>> + Send>>;

/// One venue's entry.
pub struct Venue {
    pub exchange: Exchange,
    /// Feed channels the venue serves (`trade`, `ticker`, `book`, `candle`).
    pub channels: &'static [&'static str],
    /// Candle intervals (`candle:<interval>` in a feed's channels) the venue serves.
    pub candle_intervals: &'static [&'static str],
    /// Said before the list when config asks for another interval.
    pub candle_wording: &'static str,
    /// Builds the adapter that labels its events `label`, for the feed's `symbols`.
    pub adapter: fn(Exchange, &[String]) -> Arc<dyn Adapter>,
    /// Serves a simulated venue on a listener until the token is cancelled.
    pub simulator: Option<fn(TcpListener, SimConfig, CancellationToken) -> SimFuture>,
    /// The simulator's endpoints, for its start-up line (`{addr}` is replaced).
    pub simulator_paths: &'static str,
}

const ALL_CHANNELS: [&str; 4] = ["trade", "ticker", "book", "candle"];

/// Every venue, in the order they are listed to operators.
pub static VENUES: &[Venue] = &[
    Venue {
        exchange: Exchange::Binance,
        channels: &ALL_CHANNELS,
        candle_intervals: &binance::KLINE_INTERVALS,
        candle_wording: "Binance klines come in",
        adapter: |label, symbols| Arc::new(binance::BinanceAdapter::new(label, symbols)),
        simulator: Some(|l, c, s| Box::pin(crate::simulator::serve_binance(l, c, s))),
        simulator_paths: "ws://{addr}/stream, ws://{addr}/ws, http://{addr}/api/v3/depth",
    },
    Venue {
        exchange: Exchange::Coinbase,
        channels: &ALL_CHANNELS,
        candle_intervals: &coinbase::CANDLE_INTERVALS,
        candle_wording: "the Coinbase candles channel serves 5-minute candles only:",
        adapter: |label, symbols| Arc::new(coinbase::CoinbaseAdapter::new(label, symbols)),
        simulator: Some(|l, c, s| Box::pin(crate::simulator::serve_coinbase(l, c, s))),
        simulator_paths: "ws://{addr}/",
    },
    // `sim` as a venue is the Binance protocol labelled `sim` (kept for configs written
    // before a feed could choose its label).
    Venue {
        exchange: Exchange::Sim,
        channels: &ALL_CHANNELS,
        candle_intervals: &binance::KLINE_INTERVALS,
        candle_wording: "Binance klines come in",
        adapter: |label, symbols| Arc::new(binance::BinanceAdapter::new(label, symbols)),
        simulator: None,
        simulator_paths: "",
    },
];

/// The entry of `exchange`, if the bridge speaks it.
pub fn venue(exchange: Exchange) -> Option<&'static Venue> {
    VENUES.iter().find(|v| v.exchange == exchange)
}

/// Names of the venues with an adapter (`sim` excluded: it is a label, not a venue).
pub fn names() -> Vec<&'static str> {
    VENUES
        .iter()
        .filter(|v| v.exchange != Exchange::Sim)
        .map(|v| v.exchange.as_str())
        .collect()
}

/// Names of the venues with a simulator.
pub fn simulated() -> Vec<&'static str> {
    VENUES
        .iter()
        .filter(|v| v.simulator.is_some())
        .map(|v| v.exchange.as_str())
        .collect()
}

impl Venue {
    /// Why `channel` is refused for this venue, or None when it is served.
    pub fn refuse_channel(&self, channel: &FeedChannel) -> Option<String> {
        let kind = match channel {
            FeedChannel::Trade => "trade",
            FeedChannel::Ticker => "ticker",
            FeedChannel::Book => "book",
            FeedChannel::Candle(interval) => {
                if !self.channels.contains(&"candle") {
                    return Some(format!("{} serves no candles", self.exchange));
                }
                return self.refuse_candle(interval);
            }
        };
        (!self.channels.contains(&kind)).then(|| {
            format!(
                "`{kind}`: {} serves {}",
                self.exchange,
                self.channels.join(", ")
            )
        })
    }

    /// Why `candle:<interval>` is refused for this venue, or None when it is served.
    pub fn refuse_candle(&self, interval: &str) -> Option<String> {
        if self.candle_intervals.contains(&interval) {
            return None;
        }
        Some(format!(
            "`candle:{interval}`: {} {}",
            self.candle_wording,
            self.candle_intervals.join(", ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_venue_builds_an_adapter_with_its_own_label() {
        for v in VENUES {
            let a = (v.adapter)(Exchange::Sim, &["BTC-USD".to_string()]);
            assert_eq!(a.exchange(), Exchange::Sim);
        }
        assert_eq!(names(), ["binance", "coinbase"]);
        assert_eq!(simulated(), ["binance", "coinbase"]);
    }

    #[test]
    fn a_channel_the_venue_lacks_is_refused() {
        let trades_only = Venue {
            exchange: Exchange::Kraken,
            channels: &["trade"],
            candle_intervals: &[],
            candle_wording: "",
            adapter: |label, symbols| Arc::new(binance::BinanceAdapter::new(label, symbols)),
            simulator: None,
            simulator_paths: "",
        };
        assert_eq!(trades_only.refuse_channel(&FeedChannel::Trade), None);
        assert_eq!(
            trades_only.refuse_channel(&FeedChannel::Book).unwrap(),
            "`book`: kraken serves trade"
        );
        assert_eq!(
            trades_only
                .refuse_channel(&FeedChannel::Candle("1m".into()))
                .unwrap(),
            "kraken serves no candles"
        );
    }

    #[test]
    fn candle_refusals_name_the_venue_rule() {
        let cb = venue(Exchange::Coinbase).unwrap();
        assert_eq!(cb.refuse_candle("5m"), None);
        assert_eq!(
            cb.refuse_candle("1m").unwrap(),
            "`candle:1m`: the Coinbase candles channel serves 5-minute candles only: 5m"
        );
        let bn = venue(Exchange::Binance).unwrap();
        assert!(bn
            .refuse_candle("7m")
            .unwrap()
            .contains("Binance klines come in"));
    }
}
