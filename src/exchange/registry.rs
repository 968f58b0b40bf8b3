//! The one list of venues the bridge speaks: per venue, what config may ask of it (candle
//! intervals), how to build its [`Adapter`], and its simulator, if any.
//!
//! Config validation, [`super::adapter_for`], `mdbridge normalize --exchange` and
//! `mdbridge simulate --exchange` and `mdbridge demo` all read this table, so a new venue
//! is one `pub mod` line and one entry here plus its own files under `registry/<venue>`
//! (adapter, unit tests, simulator front-end; docs/adding-an-exchange.md). It owns no wire
//! format and no socket.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::Adapter;
use crate::config::FeedChannel;
use crate::event::Exchange;
use crate::simulator::SimConfig;

// Each venue's own files (adapter, its tests, its simulator), declared with its entry.
pub mod binance;
pub mod coinbase;

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
    /// The venue's simulator, if it has one.
    pub simulator: Option<Simulator>,
}

/// A venue's simulator: how to run it, where a feed finds it, what the demo runs.
/// In the texts `{addr}` stands for the simulator's `host:port`.
pub struct Simulator {
    /// Serves the simulated venue on a listener until the token is cancelled.
    pub serve: fn(TcpListener, SimConfig, CancellationToken) -> SimFuture,
    /// Its endpoints, for its start-up line.
    pub paths: &'static str,
    /// A feed's `url` to reach it.
    pub ws_url: &'static str,
    /// A feed's `rest_url` to reach it, when the venue's books need REST.
    pub rest_url: Option<&'static str>,
    /// What `mdbridge demo` simulates unless `--venue <name>=<symbols>` says otherwise.
    pub demo_symbols: &'static [&'static str],
    /// The candle interval the demo's feed asks for.
    pub demo_candle: &'static str,
}

impl Simulator {
    /// `text` with `{addr}` replaced.
    pub fn at(text: &str, addr: &str) -> String {
        text.replace("{addr}", addr)
    }
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
        simulator: Some(Simulator {
            serve: |l, c, s| Box::pin(binance::simulator::serve_binance(l, c, s)),
            paths: "ws://{addr}/stream, ws://{addr}/ws, http://{addr}/api/v3/depth",
            ws_url: "ws://{addr}/stream",
            rest_url: Some("http://{addr}"),
            demo_symbols: &["BTC-USDT", "ETH-USDT"],
            demo_candle: "1m",
        }),
    },
    Venue {
        exchange: Exchange::Coinbase,
        channels: &ALL_CHANNELS,
        candle_intervals: &coinbase::CANDLE_INTERVALS,
        candle_wording: "the Coinbase candles channel serves 5-minute candles only:",
        adapter: |label, symbols| Arc::new(coinbase::CoinbaseAdapter::new(label, symbols)),
        simulator: Some(Simulator {
            serve: |l, c, s| Box::pin(coinbase::simulator::serve_coinbase(l, c, s)),
            paths: "ws://{addr}/",
            ws_url: "ws://{addr}/",
            rest_url: None,
            demo_symbols: &["BTC-USD", "ETH-USD"],
            demo_candle: "5m",
        }),
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

/// The venues `mdbridge demo` simulates, from its `--venue NAME[=SYMBOLS]` options (symbols
/// comma-separated; none: the simulator's `demo_symbols`): with no option, every simulated
/// venue on its demo symbols. Err names the option that cannot be served.
pub fn demo_venues(specs: &[String]) -> Result<Vec<(&'static Venue, Vec<String>)>, String> {
    let demo = |v: &'static Venue| {
        v.simulator.as_ref().map(|sim| {
            let symbols = sim.demo_symbols.iter().map(|s| s.to_string()).collect();
            (v, symbols)
        })
    };
    if specs.is_empty() {
        return Ok(VENUES.iter().filter_map(demo).collect());
    }
    let mut chosen: Vec<(&'static Venue, Vec<String>)> = Vec::new();
    for spec in specs {
        let (name, symbols) = spec.split_once('=').unwrap_or((spec.as_str(), ""));
        let venue = name
            .trim()
            .parse::<Exchange>()
            .ok()
            .and_then(venue)
            .filter(|v| v.simulator.is_some() && v.exchange != Exchange::Sim)
            .ok_or_else(|| {
                format!(
                    "--venue {spec}: `{name}` is not simulated (available: {})",
                    simulated().join(", ")
                )
            })?;
        let symbols: Vec<String> = symbols
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        if let Some(bad) = symbols.iter().find(|s| !crate::event::valid_symbol(s)) {
            return Err(format!(
                "--venue {spec}: `{bad}` is not BASE-QUOTE in upper case (e.g. BTC-USDT)"
            ));
        }
        if chosen.iter().any(|(v, _)| v.exchange == venue.exchange) {
            return Err(format!("--venue {spec}: {name} given twice"));
        }
        match (symbols.is_empty(), demo(venue)) {
            (false, _) => chosen.push((venue, symbols)),
            (true, Some(defaults)) => chosen.push(defaults),
            (true, None) => {}
        }
    }
    Ok(chosen)
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
    fn demo_venues_come_from_the_registry() {
        let names = |r: Vec<(&Venue, Vec<String>)>| -> Vec<String> {
            r.iter()
                .map(|(v, s)| format!("{}={}", v.exchange, s.join(",")))
                .collect()
        };
        assert_eq!(
            names(demo_venues(&[]).unwrap()),
            ["binance=BTC-USDT,ETH-USDT", "coinbase=BTC-USD,ETH-USD"]
        );
        let specs = [
            "coinbase=SOL-USD, BTC-USD".to_string(),
            "binance".to_string(),
        ];
        assert_eq!(
            names(demo_venues(&specs).unwrap()),
            ["coinbase=SOL-USD,BTC-USD", "binance=BTC-USDT,ETH-USDT"]
        );
        for (bad, why) in [
            ("kraken", "not simulated (available: binance, coinbase)"),
            ("sim", "not simulated"),
            ("binance=btcusdt", "`btcusdt` is not BASE-QUOTE"),
        ] {
            let Err(e) = demo_venues(&[bad.to_string()]) else {
                panic!("{bad} accepted")
            };
            assert!(e.contains(why), "{bad}: {e}");
        }
        assert!(demo_venues(&["binance".into(), "binance=A-B".into()]).is_err());
        // What the demo asks of each simulated venue, the venue serves.
        for v in VENUES {
            if let Some(sim) = &v.simulator {
                assert_eq!(v.refuse_candle(sim.demo_candle), None, "{}", v.exchange);
            }
        }
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
