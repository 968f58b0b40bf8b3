//! What an operator reads, from real processes: every metric series documented in
//! docs/operations.md exists from start (the test reads the doc's table, so doc and code
//! cannot drift); logs carry no ANSI colours off a terminal; `[log] format = "json"` writes
//! one JSON object per line; a reconnect line says why.

mod common;

use common::*;

/// A label value the doc names: `side="bus"` (key given) or `queue_full` (the series' label).
type LabelValue = (Option<String>, String);

/// The series of docs/operations.md's metric table, as (name, labels from the doc, label
/// values the doc names in the row's meaning).
fn documented_series() -> Vec<(String, Vec<String>, Vec<LabelValue>)> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operations.md"))
        .expect("docs/operations.md");
    let section = doc
        .split("\n## Metrics")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("a Metrics section");
    let backticked = |cell: &str| -> Vec<String> {
        cell.split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect()
    };
    let mut out = Vec::new();
    for row in section.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let (series, meaning) = (cells[1], cells[2]);
        let values: Vec<LabelValue> = backticked(meaning)
            .into_iter()
            .filter_map(|t| match t.split_once('=') {
                Some((k, v)) => Some((Some(k.to_string()), v.trim_matches('"').to_string())),
                None if t.chars().all(|c| c.is_ascii_lowercase() || c == '_') => Some((None, t)),
                None => None,
            })
            .collect();
        for s in backticked(series) {
            let (name, labels) = match s.split_once('{') {
                Some((n, l)) => (
                    n.to_string(),
                    l.trim_end_matches('}')
                        .split(',')
                        .map(str::to_string)
                        .collect(),
                ),
                None => (s.clone(), Vec::new()),
            };
            out.push((format!("mdbridge_{name}"), labels, values.clone()));
        }
    }
    assert!(out.len() >= 20, "metric table not found: {out:?}");
    out
}

/// Sample lines of `name` (histograms: its `_bucket`/`_count`/`_sum` too).
fn samples<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            let n = l.split(['{', ' ']).next().unwrap_or_default();
            n == name
                || ["_bucket", "_count", "_sum"]
                    .iter()
                    .any(|s| n == format!("{name}{s}"))
        })
        .collect()
}

fn check_every_documented_series(role: &str, text: &str) {
    let mut missing = Vec::new();
    for (name, labels, values) in documented_series() {
        // Per-stream gauges exist once a durable stream does (tests/streams_admin.rs).
        if mdbridge::metrics::streams::PER_STREAM_SERIES.contains(&name.as_str()) {
            continue;
        }
        let found = samples(text, &name);
        if found.is_empty() {
            missing.push(name.clone());
            continue;
        }
        for label in &labels {
            if !found.iter().any(|l| l.contains(&format!("{label}=\""))) {
                missing.push(format!("{name}{{{label}}}"));
            }
        }
        // Label values the doc names (`queue_full`, `side="bus"`) exist from start too.
        if labels.is_empty() {
            continue;
        }
        for (key, value) in &values {
            let key = match key {
                Some(k) => k.clone(),
                None if labels.len() == 1 => labels[0].clone(),
                None => continue,
            };
            if !found
                .iter()
                .any(|l| l.contains(&format!("{key}=\"{value}\"")))
            {
                missing.push(format!("{name}{{{key}=\"{value}\"}}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "{role}: documented series missing at start: {missing:?}\n{text}"
    );
}

async fn scrape(p: &Proc) -> String {
    let url = p.http_url("/metrics");
    wait_until("/metrics answers", WAIT, || async {
        reqwest::get(&url).await.is_ok()
    })
    .await;
    reqwest::get(&url)
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("body")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documented_metrics_exist_from_start_and_logs_suit_their_reader() {
    let redis = RedisServer::start();

    // An executor that has seen nothing yet.
    let (h, b) = (free_port(), free_port());
    let mut executor = Proc::role("executor", &role_config(&redis.url(), h, b, ""), h, Some(b));
    executor.wait_healthy().await;
    check_every_documented_series("executor", &scrape(&executor).await);

    // A publisher whose exchange refuses connections, logging JSON.
    let (h2, b2, dead) = (free_port(), free_port(), free_port());
    let config = role_config(
        &redis.url(),
        h2,
        b2,
        &format!(
            "[log]\nformat = \"json\"\n{}",
            sim_feed(dead, "binance", &["BTC-USDT"], &["trade"])
        ),
    );
    let mut publisher = Proc::role("publisher", &config, h2, None);
    check_every_documented_series("publisher", &scrape(&publisher).await);

    // Every reconnect line says why.
    wait_until("a reconnect line", WAIT, || async {
        publisher.log().contains("reconnecting")
    })
    .await;
    publisher.sigterm();
    assert_eq!(publisher.wait_exit().await, Some(0));
    let log = publisher.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let reconnects: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|v| v["fields"]["message"] == "reconnecting")
        .collect();
    assert!(!reconnects.is_empty(), "{log}");
    for r in &reconnects {
        let cause = r["fields"]["cause"].as_str().unwrap_or_default();
        assert!(
            cause.contains("connection refused"),
            "reconnect without why: {r}"
        );
    }

    // Plain text off a terminal: stderr here is a file.
    executor.sigterm();
    assert_eq!(executor.wait_exit().await, Some(0));
    let text = executor.log();
    assert!(text.contains("starting"), "{text}");
    assert!(
        !text.contains("\x1b["),
        "ANSI colours in a log file:\n{text}"
    );
}
