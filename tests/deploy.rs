//! The files under deploy/ are part of the product: alert rules pass promtool and their unit
//! tests, systemd units pass `systemd-analyze verify`, the example configs load, and every
//! metric the Grafana dashboard and the alerts query is exported by a freshly started
//! publisher or executor.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

mod common;
use common::{bin, sim_bridge};

fn deploy(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(rel)
}

/// A tool the test needs, or a clear failure naming the package that brings it.
fn tool(name: &str, package: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/local/bin", "/bin"] {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("`{name}` not found: install it with `apt-get install -y {package}` (./scripts/test.sh does)");
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().expect("run tool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let promtool = tool("promtool", "prometheus");
    let (ok, text) = run(Command::new(&promtool)
        .args(["check", "rules"])
        .arg(deploy("prometheus/alerts.yml")));
    assert!(ok, "promtool check rules:\n{text}");
    let (ok, text) = run(Command::new(&promtool)
        .args(["test", "rules", "alerts_test.yml"])
        .current_dir(deploy("prometheus")));
    assert!(ok, "promtool test rules:\n{text}");
    assert!(text.contains("SUCCESS"), "{text}");
}

/// Every alert has a unit test that shows it firing.
#[test]
fn every_alert_has_a_unit_test() {
    let rules = std::fs::read_to_string(deploy("prometheus/alerts.yml")).expect("alerts.yml");
    let tests =
        std::fs::read_to_string(deploy("prometheus/alerts_test.yml")).expect("alerts_test.yml");
    let names: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert!(names.len() >= 7, "alerts: {names:?}");
    for name in names {
        assert!(
            tests.contains(&format!("alertname: {name}")),
            "alert {name} has no unit test in alerts_test.yml"
        );
    }
}

#[test]
fn systemd_units_verify() {
    let analyze = tool("systemd-analyze", "systemd");
    let dir = tempfile::tempdir().expect("tempdir");
    for role in ["publisher", "executor", "hybrid"] {
        let name = format!("mdbridge-{role}.service");
        let unit = std::fs::read_to_string(deploy(&format!("systemd/{name}"))).expect("unit");
        assert!(
            unit.contains(&format!(
                "ExecStart=/usr/local/bin/mdbridge {role} --config"
            )),
            "{name}: ExecStart runs the {role} role"
        );
        // Verify against the binary of this build (the unit names the installed path).
        let unit = unit.replace("/usr/local/bin/mdbridge", bin());
        let path = dir.path().join(&name);
        std::fs::write(&path, unit).expect("write unit");
        let (ok, text) = run(Command::new(&analyze).arg("verify").arg(&path));
        assert!(
            ok && text.trim().is_empty(),
            "systemd-analyze verify {name}:\n{text}"
        );
    }
}

#[test]
fn example_configs_load() {
    use mdbridge::config::{Config, Role};
    for (file, role) in [
        ("example/publisher.toml", Role::Publisher),
        ("example/executor-1.toml", Role::Executor),
        ("example/executor-2.toml", Role::Executor),
    ] {
        if let Err(e) = Config::load(Some(&deploy(file)), role) {
            panic!("{file}: {e}");
        }
    }
}
/// Metric names a PromQL expression uses: `mdbridge_*` words, with the histogram suffixes
/// of the exposition (`_bucket`, `_sum`, `_count`) kept as they are written.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("mdbridge_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

fn dashboard_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(s)) => out.push(s.clone()),
                    ("query", serde_json::Value::Object(q)) => {
                        if let Some(s) = q.get("query").and_then(|s| s.as_str()) {
                            out.push(s.to_string());
                        }
                    }
                    _ => dashboard_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| dashboard_exprs(v, out)),
        _ => {}
    }
}

/// Every series a scrape of `text` holds, by name (labels stripped).
fn exported(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn dashboard_and_alerts_query_only_exported_metrics() {
    let json = std::fs::read_to_string(deploy("grafana/mdbridge.json")).expect("dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&json).expect("dashboard is JSON");
    let mut exprs = Vec::new();
    dashboard_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() >= 20, "dashboard queries: {exprs:?}");
    let rules = std::fs::read_to_string(deploy("prometheus/alerts.yml")).expect("alerts.yml");
    exprs.extend(
        rules
            .lines()
            .filter_map(|l| l.trim().strip_prefix("expr: "))
            .map(str::to_string),
    );
    let wanted: BTreeSet<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();

    // A fresh publisher and executor, before any failure: every series must already exist.
    let bridge = sim_bridge("200", &["BTC-USDT"], &["trade", "book"]).await;
    let mut scraped = BTreeSet::new();
    for proc in [&bridge.publisher, &bridge.executor] {
        let text = reqwest::get(proc.http_url("/metrics"))
            .await
            .expect("scrape")
            .text()
            .await
            .expect("body");
        scraped.extend(exported(&text));
    }
    // Per-stream gauges exist only once a durable stream does (tests/streams_admin.rs
    // shows them exported then); every other series exists from start.
    let per_stream = mdbridge::metrics::streams::PER_STREAM_SERIES;
    let missing: Vec<&String> = wanted
        .difference(&scraped)
        .filter(|name| !per_stream.contains(&name.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "the dashboard or alerts query series no instance exports: {missing:?}\nexported: {scraped:?}"
    );
}
