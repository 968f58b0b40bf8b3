//! The processes a scenario starts and what `/proc` says about them: a private
//! `redis-server`, the roles (this same binary), the `redis-benchmark` baseline.
//! Every child is killed when its handle drops, so a failed run leaves nothing behind.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::scenario::ScenarioError;

/// Linux's USER_HZ: the unit of utime/stime in /proc/<pid>/stat on every supported arch.
const TICKS_PER_SEC: f64 = 100.0;

/// A child process killed (SIGKILL) and reaped on drop.
pub struct Proc {
    pub name: String,
    child: Child,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Proc, ScenarioError> {
        let err = std::fs::File::create(log.join(format!("{name}.log")))
            .map_err(|e| ScenarioError::Io(format!("log file for {name}: {e}")))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .map_err(|e| ScenarioError::Spawn(format!("{name} ({cmd:?}): {e}")))?;
        Ok(Proc {
            name: name.to_string(),
            child,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails when the process already exited (a bad config, a taken port).
    pub fn check_alive(&mut self, log: &Path) -> Result<(), ScenarioError> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            _ => {
                let tail = std::fs::read_to_string(log.join(format!("{}.log", self.name)))
                    .unwrap_or_default();
                let tail: String = tail.lines().rev().take(5).collect::<Vec<_>>().join(" | ");
                Err(ScenarioError::Spawn(format!(
                    "{} exited early: {tail}",
                    self.name
                )))
            }
        }
    }

    pub fn cpu_ticks(&self) -> u64 {
        cpu_ticks(self.pid())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// utime + stime of `pid`, in clock ticks (0 when unreadable).
pub fn cpu_ticks(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

pub fn ticks_to_secs(ticks: u64) -> f64 {
    ticks as f64 / TICKS_PER_SEC
}

/// A `/proc/<pid>/status` field in KiB (`VmHWM`, `VmRSS`); 0 when unreadable.
pub fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':')))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// The 1, 5 and 15 minute load averages.
pub fn load_avg() -> [f64; 3] {
    let s = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut it = s.split_whitespace().map(|v| v.parse().unwrap_or(0.0));
    [
        it.next().unwrap_or(0.0),
        it.next().unwrap_or(0.0),
        it.next().unwrap_or(0.0),
    ]
}

pub fn free_port() -> Result<u16, ScenarioError> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| ScenarioError::Io(format!("no free port: {e}")))
}

pub async fn wait_port(port: u16, what: &str) -> Result<(), ScenarioError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Err(ScenarioError::Spawn(format!(
        "{what}: nothing listens on 127.0.0.1:{port} after 30 s"
    )))
}

/// A fresh directory under the system temp dir, removed with everything in it on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> Result<TempDir, ScenarioError> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path =
            std::env::temp_dir().join(format!("mdbridge-bench-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&path)
            .map_err(|e| ScenarioError::Io(format!("{}: {e}", path.display())))?;
        Ok(TempDir(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `name` from `$REDIS_BIN_DIR`, /usr/bin, /usr/local/bin, else the PATH.
pub fn redis_tool(name: &str) -> PathBuf {
    let dirs = std::env::var("REDIS_BIN_DIR").ok().into_iter();
    dirs.chain(["/usr/bin".to_string(), "/usr/local/bin".to_string()])
        .map(|d| Path::new(&d).join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// A private redis-server on a free port of 127.0.0.1, no persistence.
pub async fn start_redis(dir: &Path) -> Result<(Proc, u16), ScenarioError> {
    let port = free_port()?;
    let mut cmd = Command::new(redis_tool("redis-server"));
    cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir);
    let p = Proc::spawn("redis-server", cmd, dir)?;
    wait_port(port, "redis-server").await?;
    Ok((p, port))
}

/// The machine's own ceiling, measured in the same run on the same private Redis.
#[derive(Debug, Clone, Serialize, Default)]
pub struct RedisBaseline {
    pub command: String,
    pub payload_bytes: usize,
    pub publish_per_sec: f64,
}

/// `redis-benchmark -c 1 -P 16 PUBLISH` of a `payload_bytes` payload, one subscriber
/// (`redis-cli SUBSCRIBE`) on the channel.
pub async fn redis_baseline(
    dir: &Path,
    port: u16,
    payload_bytes: usize,
    requests: u64,
) -> Result<RedisBaseline, ScenarioError> {
    let channel = "mdbridge-bench:baseline";
    let mut sub = Command::new(redis_tool("redis-cli"));
    sub.args(["-p", &port.to_string(), "subscribe", channel]);
    let _subscriber = Proc::spawn("redis-cli-subscriber", sub, dir)?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let payload = "x".repeat(payload_bytes);
    let args = [
        "-p".to_string(),
        port.to_string(),
        "-c".into(),
        "1".into(),
        "-P".into(),
        "16".into(),
        "-n".into(),
        requests.to_string(),
        "--csv".into(),
        "PUBLISH".into(),
        channel.into(),
    ];
    let command = format!(
        "redis-benchmark {} <{payload_bytes}-byte payload>",
        args.join(" ")
    );
    let mut cmd = Command::new(redis_tool("redis-benchmark"));
    cmd.args(&args).arg(&payload).stdin(Stdio::null());
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .map_err(|e| ScenarioError::Spawn(format!("redis-benchmark: {e}")))?
        .map_err(|e| ScenarioError::Spawn(format!("redis-benchmark: {e}")))?;
    let text = String::from_utf8_lossy(&out.stdout);
    // --csv: a header line, then `"PUBLISH ...","<rps>",...`.
    let rps = text
        .lines()
        .filter(|l| !l.starts_with("\"test\""))
        .find_map(|l| l.split(',').nth(1))
        .and_then(|v| v.trim_matches('"').parse::<f64>().ok())
        .ok_or_else(|| {
            ScenarioError::Spawn(format!(
                "redis-benchmark printed no rate: {} {}",
                text.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        })?;
    Ok(RedisBaseline {
        command,
        payload_bytes,
        publish_per_sec: rps,
    })
}

/// Calls per command from `INFO commandstats` (`cmdstat_xadd:calls=12,…` → `xadd: 12`);
/// empty when Redis cannot be read.
pub async fn redis_command_calls(port: u16) -> std::collections::BTreeMap<String, u64> {
    let read = async {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}/0")).ok()?;
        let mut conn = client.get_multiplexed_async_connection().await.ok()?;
        redis::cmd("INFO")
            .arg("commandstats")
            .query_async::<String>(&mut conn)
            .await
            .ok()
    };
    let text = tokio::time::timeout(Duration::from_secs(3), read)
        .await
        .ok()
        .flatten()
        .unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest
                .strip_prefix("calls=")?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            Some((name.to_string(), calls))
        })
        .collect()
}
