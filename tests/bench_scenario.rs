//! Smoke test of the scenario runner (`mdbridge bench --scenario`): a tiny latency run
//! must start and stop everything by itself and report the figures' shape and counted
//! events. Speed is not asserted here (that belongs in benches); needs `redis-server`,
//! `redis-cli` and `redis-benchmark` (skipped with a note when absent).

use std::path::PathBuf;

use mdbridge::bench::{run_scenario, Scenario, ScenarioOptions};

fn have_redis_tools() -> bool {
    ["redis-server", "redis-cli", "redis-benchmark"]
        .iter()
        .all(|t| {
            std::process::Command::new(t)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_scenario_reports_counted_events() {
    if !have_redis_tools() {
        eprintln!("skipped: redis-server / redis-cli / redis-benchmark not installed");
        return;
    }
    let report = run_scenario(ScenarioOptions {
        scenario: Scenario::Latency,
        binary: PathBuf::from(env!("CARGO_BIN_EXE_mdbridge")),
        secs: 2,
        warmup_secs: 1,
        bots: Some(3),
        trades_per_sec: Some(200),
        symbols: vec!["BTC-USDT".into(), "ETH-USDT".into()],
        baseline_requests: 20_000,
    })
    .await
    .expect("scenario runs");
    assert_eq!(report.scenario, "latency");
    assert!(report.redis_baseline.publish_per_sec > 0.0);
    assert!(report.redis_baseline.payload_bytes > 100);
    assert_eq!(report.runs.len(), 1);
    let run = &report.runs[0];
    assert_eq!(run.bots, 3);
    assert!(run.events > 0, "no events counted: {}", report.text());
    assert!(run.frames >= run.events);
    assert_eq!(run.latency.n, run.frames);
    let roles: Vec<&str> = run.roles.iter().map(|r| r.role.as_str()).collect();
    assert_eq!(roles, ["simulate", "publisher", "executor", "redis-server"]);
    assert!(run.roles.iter().all(|r| r.peak_rss_kib > 0));
    let json = serde_json::to_value(&report).expect("serializes");
    for key in ["redis_baseline", "runs", "load_avg_before", "params"] {
        assert!(json.get(key).is_some(), "{key} missing");
    }
    assert!(json["runs"][0]["latency"]["p99_us"].is_u64());
}
