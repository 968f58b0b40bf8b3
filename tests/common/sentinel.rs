//! A real Redis Sentinel setup for the tests: one master, one replica and three sentinels
//! (quorum 2; the sentinels require a password), each a `redis-server` process on a free port with its own writable config
//! file in a temp dir (sentinels rewrite theirs). Killed on drop.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{find_redis_server, free_port, WAIT};

/// Name of the monitored master.
pub const MASTER: &str = "m";
/// The sentinels' own password (`requirepass`): mdbridge must send it from the URLs.
pub const SENTINEL_PASS: &str = "sentinel-secret";

/// One `redis-server` process (data node or sentinel).
pub struct Node {
    pub port: u16,
    /// Password of this node's default user, if it has one.
    pass: Option<&'static str>,
    child: Option<Child>,
}

impl Node {
    fn spawn(args: &[String], dir: &Path) -> Node {
        let port = args
            .iter()
            .position(|a| a == "--port")
            .and_then(|i| args.get(i + 1))
            .and_then(|p| p.parse().ok())
            .expect("--port given");
        let log = std::fs::File::create(dir.join(format!("{port}.log"))).expect("log");
        let child = Command::new(find_redis_server())
            .args(args)
            .stdout(log)
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        Node {
            port,
            pass: None,
            child: Some(child),
        }
    }

    pub fn url(&self) -> String {
        match self.pass {
            Some(p) => format!("redis://:{p}@127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    pub fn conn(&self) -> Option<redis::Connection> {
        redis::Client::open(self.url())
            .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(300)))
            .ok()
    }

    /// One command; `None` if the node does not answer.
    pub fn query<T: redis::FromRedisValue>(&self, cmd: &mut redis::Cmd) -> Option<T> {
        let mut conn = self.conn()?;
        cmd.query(&mut conn).ok()
    }

    /// SIGKILL: no goodbye to clients, no failover handshake.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Master, replica and three sentinels, ready for a failover.
pub struct SentinelSet {
    pub master: Node,
    pub replica: Node,
    pub sentinels: Vec<Node>,
    pub dir: tempfile::TempDir,
}

impl SentinelSet {
    /// Starts everything and waits until the replica is in sync and every sentinel knows
    /// the replica and the two other sentinels (else a failover cannot be elected).
    pub fn start() -> SentinelSet {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = |port: u16, extra: &[&str]| -> Vec<String> {
            let mut v: Vec<String> = [
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                &dir.path().display().to_string(),
                "--dbfilename",
                &format!("dump-{port}.rdb"),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            v.extend(extra.iter().map(|s| s.to_string()));
            v
        };
        let master = Node::spawn(&data(free_port(), &[]), dir.path());
        wait_for("master answers", || {
            master.query::<String>(&mut redis::cmd("PING")).is_some()
        });
        let replica_port = free_port();
        let replica = Node::spawn(
            &data(
                replica_port,
                &["--replicaof", "127.0.0.1", &master.port.to_string()],
            ),
            dir.path(),
        );
        wait_for("replica in sync", || {
            replica
                .query::<String>(redis::cmd("INFO").arg("replication"))
                .is_some_and(|i| i.contains("master_link_status:up"))
        });
        let sentinels: Vec<Node> = (0..3)
            .map(|_| {
                let port = free_port();
                let conf = dir.path().join(format!("sentinel-{port}.conf"));
                std::fs::write(
                    &conf,
                    format!(
                        "port {port}\nbind 127.0.0.1\ndir {}\n\
                         sentinel monitor {MASTER} 127.0.0.1 {} 2\n\
                         sentinel down-after-milliseconds {MASTER} 1000\n\
                         sentinel failover-timeout {MASTER} 5000\n\
                         sentinel parallel-syncs {MASTER} 1\n\
                         requirepass {SENTINEL_PASS}\n\
                         sentinel sentinel-pass {SENTINEL_PASS}\n",
                        dir.path().display(),
                        master.port
                    ),
                )
                .expect("write sentinel.conf");
                let mut node = Node::spawn(
                    &[
                        conf.display().to_string(),
                        "--sentinel".into(),
                        "--port".into(),
                        port.to_string(),
                    ],
                    dir.path(),
                );
                node.pass = Some(SENTINEL_PASS);
                node
            })
            .collect();
        for s in &sentinels {
            wait_for("sentinel knows the replica and its peers", || {
                let replicas: Option<Vec<redis::Value>> =
                    s.query(redis::cmd("SENTINEL").arg("replicas").arg(MASTER));
                let peers: Option<Vec<redis::Value>> =
                    s.query(redis::cmd("SENTINEL").arg("sentinels").arg(MASTER));
                replicas.is_some_and(|r| r.len() == 1) && peers.is_some_and(|p| p.len() == 2)
            });
        }
        SentinelSet {
            master,
            replica,
            sentinels,
            dir,
        }
    }

    /// `["redis://127.0.0.1:P", ...]` as a TOML array.
    pub fn toml_list(&self) -> String {
        let urls: Vec<String> = self
            .sentinels
            .iter()
            .map(|s| format!("\"{}\"", s.url()))
            .collect();
        format!("[{}]", urls.join(", "))
    }

    /// The master's port as the first sentinel that answers names it.
    pub fn named_master_port(&self) -> Option<u16> {
        self.sentinels.iter().find_map(|s| {
            s.query::<Option<(String, String)>>(
                redis::cmd("SENTINEL")
                    .arg("get-master-addr-by-name")
                    .arg(MASTER),
            )
            .flatten()
            .and_then(|(_, p)| p.parse().ok())
        })
    }

    /// Every sentinel's log and the data nodes' logs, for a failing test.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        if let Ok(entries) = std::fs::read_dir(self.dir.path()) {
            for e in entries.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "log") {
                    let text = std::fs::read_to_string(&p).unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(30).collect();
                    out.push_str(&format!("---- {} ----\n", p.display()));
                    for l in tail.into_iter().rev() {
                        out.push_str(l);
                        out.push('\n');
                    }
                }
            }
        }
        out
    }
}

impl Drop for SentinelSet {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT * 2;
    while Instant::now() < deadline {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("sentinel setup: timed out waiting for: {what}");
}
