//! The files under deploy/ are part of the product: alert rules pass promtool and their unit
//! tests, systemd units pass `systemd-analyze verify`, and the example configs load.

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;
use common::bin;

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
