//! Bot-side command-line tools: `mdbridge bench` and `mdbridge watch`.
//!
//! `mdbridge bench` is an end-to-end measuring bot. It connects to a bot server like any
//! client, subscribes, and reports events per second and the latency from `ts_recv` (the
//! host read the exchange frame) to the moment this client parsed the event.
//!
//! It measures a running deployment (demo, hybrid, publisher + executor); it does not start
//! one. Run it on the same machine as the host so `ts_recv` and this clock agree.

mod bots;
mod hist;
mod procs;
mod report;
mod scenario;

pub use hist::Quantiles;
pub use procs::RedisBaseline;
pub use report::{Drops, IdleFigures, Params, Report, RoleUsage, RunReport};
pub use scenario::{run_scenario, Scenario, ScenarioError, ScenarioOptions};

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio_tungstenite::tungstenite::Message;

use crate::event::now_micros;

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub url: String,
    pub channels: Vec<String>,
    pub duration: Duration,
    /// Parallel bot connections, each with the same subscription.
    pub clients: usize,
}

/// What one run measured, over all clients.
#[derive(Debug, Clone, Default)]
pub struct BenchReport {
    pub events: u64,
    pub seconds: f64,
    pub latency_us_p50: u64,
    pub latency_us_p99: u64,
    pub latency_us_max: u64,
    pub errors: u64,
    pub violations: Violations,
}

impl BenchReport {
    pub fn events_per_second(&self) -> f64 {
        self.events as f64 / self.seconds.max(1e-9)
    }
}

#[derive(Deserialize)]
struct Head<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(default)]
    ts_recv: Option<u64>,
    #[serde(default)]
    exchange: Option<&'a str>,
    #[serde(default)]
    symbol: Option<&'a str>,
    #[serde(default)]
    action: Option<&'a str>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default)]
    prev_seq: Option<u64>,
    #[serde(default)]
    trade_id: Option<&'a str>,
    #[serde(default)]
    state: Option<&'a str>,
    #[serde(default)]
    detail: Option<&'a str>,
}

/// What one bot saw that breaks PROTOCOL §2: the correctness half of a load test.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Violations {
    /// A book delta whose `prev_seq` is not the previous book message's `seq`, or a delta
    /// before any snapshot, without a `resync` status or snapshot in between.
    pub book_chain: u64,
    /// A numeric trade id not above the previous one of its (exchange, symbol): a
    /// duplicate or a reordering.
    pub trade_order: u64,
    /// Trade ids skipped (lost trades), for exchanges whose ids are consecutive.
    pub trade_gaps: u64,
}

/// Follows books and trades per (exchange, symbol) as one bot receives them.
#[derive(Default)]
struct Checker {
    books: std::collections::HashMap<(String, String), Option<u64>>,
    trades: std::collections::HashMap<(String, String), u64>,
    violations: Violations,
}

impl Checker {
    fn observe(&mut self, h: &Head<'_>) {
        let key = || {
            (
                h.exchange.unwrap_or_default().to_string(),
                h.symbol.unwrap_or_default().to_string(),
            )
        };
        match h.kind {
            "book" => {
                let at = self.books.entry(key()).or_insert(None);
                match h.action {
                    Some("snapshot") => *at = h.seq,
                    _ => {
                        if at.is_none() || h.prev_seq != *at {
                            self.violations.book_chain += 1;
                        }
                        *at = h.seq;
                    }
                }
            }
            // A resync resets the book its detail names (`book:<exchange>:<symbol>: …`), or
            // every book of the exchange when it names none: a snapshot comes next.
            "status" if h.state == Some("resync") => {
                let exchange = h.exchange.unwrap_or_default();
                let symbol = h
                    .detail
                    .and_then(|d| d.strip_prefix("book:"))
                    .and_then(|d| d.split(':').nth(1));
                for ((ex, sym), at) in self.books.iter_mut() {
                    if ex == exchange && symbol.is_none_or(|s| s == sym) {
                        *at = None;
                    }
                }
            }
            "trade" => {
                let Some(id) = h.trade_id.and_then(|t| t.parse::<u64>().ok()) else {
                    return;
                };
                match self.trades.insert(key(), id) {
                    Some(last) if id <= last => self.violations.trade_order += 1,
                    Some(last) => self.violations.trade_gaps += id - last - 1,
                    None => {}
                }
            }
            _ => {}
        }
    }
}

/// Errors of the measuring client.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("cannot connect to {url}: {cause}")]
    Connect { url: String, cause: String },
    #[error("the server refused the subscription: {0}")]
    Refused(String),
    #[error("the connection ended: {0}")]
    Lost(String),
}

/// Runs the measurement and returns the combined report.
pub async fn run(options: BenchOptions) -> Result<BenchReport, BenchError> {
    let mut tasks = Vec::new();
    for _ in 0..options.clients.max(1) {
        let (mut ws, _) = tokio_tungstenite::connect_async(options.url.as_str())
            .await
            .map_err(|e| BenchError::Connect {
                url: options.url.clone(),
                cause: e.to_string(),
            })?;
        let sub = serde_json::json!({"op":"subscribe","channels":options.channels,"req":"bench"});
        ws.send(Message::text(sub.to_string()))
            .await
            .map_err(|e| BenchError::Connect {
                url: options.url.clone(),
                cause: e.to_string(),
            })?;
        let duration = options.duration;
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(1 << 16);
            let mut checker = Checker::default();
            let mut events = 0u64;
            let mut errors = 0u64;
            let mut refused = None;
            let started = Instant::now();
            let deadline = tokio::time::Instant::now() + duration;
            loop {
                let msg = match tokio::time::timeout_at(deadline, ws.next()).await {
                    Err(_) | Ok(None) => break,
                    Ok(Some(Err(_))) => break,
                    Ok(Some(Ok(m))) => m,
                };
                let Message::Text(text) = msg else { continue };
                let Ok(head) = serde_json::from_str::<Head>(text.as_str()) else {
                    errors += 1;
                    continue;
                };
                checker.observe(&head);
                match head.kind {
                    "subscribed" | "pong" => {}
                    "error" => {
                        errors += 1;
                        refused.get_or_insert_with(|| text.to_string());
                    }
                    _ => {
                        events += 1;
                        if let Some(t) = head.ts_recv {
                            latencies.push(now_micros().saturating_sub(t));
                        }
                    }
                }
            }
            let _ = ws.close(None).await;
            (
                events,
                errors,
                latencies,
                started.elapsed().as_secs_f64(),
                refused,
                checker.violations,
            )
        }));
    }
    let mut report = BenchReport::default();
    let mut all = Vec::new();
    for task in tasks {
        let Ok((events, errors, latencies, secs, refused, violations)) = task.await else {
            continue;
        };
        if events == 0 {
            if let Some(r) = refused {
                return Err(BenchError::Refused(r));
            }
        }
        report.events += events;
        report.violations.book_chain += violations.book_chain;
        report.violations.trade_order += violations.trade_order;
        report.violations.trade_gaps += violations.trade_gaps;
        report.errors += errors;
        report.seconds = report.seconds.max(secs);
        all.extend(latencies);
    }
    all.sort_unstable();
    let pct = |p: f64| -> u64 {
        if all.is_empty() {
            0
        } else {
            all[((all.len() - 1) as f64 * p) as usize]
        }
    };
    report.latency_us_p50 = pct(0.50);
    report.latency_us_p99 = pct(0.99);
    report.latency_us_max = all.last().copied().unwrap_or(0);
    Ok(report)
}

/// `mdbridge watch`: subscribes like a bot and prints every frame the server sends, one
/// JSON object per line, until `limit` events (if any) or the connection ends.
///
/// `limit` counts events (trade, ticker, book, candle, status), not the server's replies
/// (`subscribed`, `pong`, ...), so `-n 3` shows three market events. An `error` reply is
/// printed and then ends the watch with [`BenchError::Refused`] (a non-zero exit): a
/// script piping `watch` must not mistake a refused subscription for a quiet market.
/// A connection that ends before `limit` events is an error too. Returns the events seen.
pub async fn watch(
    url: &str,
    channels: &[String],
    limit: Option<u64>,
    mut out: impl std::io::Write,
) -> Result<u64, BenchError> {
    let connect_err = |e: &dyn std::fmt::Display| BenchError::Connect {
        url: url.to_string(),
        cause: e.to_string(),
    };
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .map_err(|e| connect_err(&e))?;
    let sub = serde_json::json!({"op":"subscribe","channels":channels,"req":"watch"});
    ws.send(Message::text(sub.to_string()))
        .await
        .map_err(|e| connect_err(&e))?;
    let mut events = 0u64;
    let mut result = Ok(());
    while limit.is_none_or(|l| events < l) {
        let msg = match ws.next().await {
            Some(Ok(msg)) => msg,
            Some(Err(e)) => {
                result = Err(BenchError::Lost(e.to_string()));
                break;
            }
            None => {
                result = Err(BenchError::Lost("end of stream".into()));
                break;
            }
        };
        match msg {
            Message::Text(text) => {
                if writeln!(out, "{}", text.as_str()).is_err() {
                    break;
                }
                match frame_kind(text.as_str()) {
                    FrameKind::Event => events += 1,
                    FrameKind::Reply => {}
                    FrameKind::Error(detail) => {
                        result = Err(BenchError::Refused(detail));
                        break;
                    }
                }
            }
            Message::Close(frame) => {
                let why = frame.map_or_else(
                    || "closed without a code".to_string(),
                    |f| format!("closed with code {} {}", u16::from(f.code), f.reason),
                );
                result = Err(BenchError::Lost(why));
                break;
            }
            _ => {}
        }
    }
    let _ = out.flush();
    let _ = ws.close(None).await;
    result.map(|()| events)
}

enum FrameKind {
    /// A market or status event: counted by `watch -n`.
    Event,
    /// The server's answer to a request (`subscribed`, `unsubscribed`, `pong`, `recovered`).
    Reply,
    /// An `error` reply, with its code and message.
    Error(String),
}

fn frame_kind(text: &str) -> FrameKind {
    #[derive(Deserialize)]
    struct Kind<'a> {
        #[serde(borrow, rename = "type")]
        kind: Option<std::borrow::Cow<'a, str>>,
        #[serde(borrow)]
        code: Option<std::borrow::Cow<'a, str>>,
        #[serde(borrow)]
        message: Option<std::borrow::Cow<'a, str>>,
    }
    let Ok(k) = serde_json::from_str::<Kind<'_>>(text) else {
        return FrameKind::Reply;
    };
    match k.kind.as_deref() {
        Some("error") => FrameKind::Error(format!(
            "{}: {}",
            k.code.as_deref().unwrap_or("error"),
            k.message.as_deref().unwrap_or("")
        )),
        Some("subscribed" | "unsubscribed" | "pong" | "recovered") | None => FrameKind::Reply,
        Some(_) => FrameKind::Event,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(checker: &mut Checker, frames: &[&str]) {
        for f in frames {
            let h: Head<'_> = serde_json::from_str(f).expect("test frame");
            checker.observe(&h);
        }
    }

    #[test]
    fn checker_counts_chain_breaks_and_trade_disorder() {
        let mut c = Checker::default();
        feed(
            &mut c,
            &[
                r#"{"type":"book","exchange":"sim","symbol":"A-B","action":"delta","seq":3,"prev_seq":2}"#,
                r#"{"type":"book","exchange":"sim","symbol":"A-B","action":"snapshot","seq":10}"#,
                r#"{"type":"book","exchange":"sim","symbol":"A-B","action":"delta","seq":12,"prev_seq":10}"#,
                r#"{"type":"book","exchange":"sim","symbol":"A-B","action":"delta","seq":20,"prev_seq":15}"#,
                r#"{"type":"book","exchange":"sim","symbol":"E-F","action":"snapshot","seq":5}"#,
                r#"{"type":"status","exchange":"sim","state":"resync","detail":"book:sim:A-B: gap"}"#,
                r#"{"type":"book","exchange":"sim","symbol":"E-F","action":"delta","seq":6,"prev_seq":5}"#,
                r#"{"type":"book","exchange":"sim","symbol":"A-B","action":"snapshot","seq":30}"#,
                r#"{"type":"book","exchange":"sim","symbol":"A-B","action":"delta","seq":31,"prev_seq":30}"#,
                r#"{"type":"trade","exchange":"sim","symbol":"A-B","trade_id":"1"}"#,
                r#"{"type":"trade","exchange":"sim","symbol":"A-B","trade_id":"2"}"#,
                r#"{"type":"trade","exchange":"sim","symbol":"A-B","trade_id":"2"}"#,
                r#"{"type":"trade","exchange":"sim","symbol":"A-B","trade_id":"5"}"#,
                r#"{"type":"trade","exchange":"sim","symbol":"C-D","trade_id":"9"}"#,
            ],
        );
        assert_eq!(
            c.violations,
            Violations {
                book_chain: 2,
                trade_order: 1,
                trade_gaps: 2
            }
        );
    }
}
