//! A private `redis-server` for unit tests: a free port, a temp dir, killed on drop.
//!
//! Tests never touch the Redis on 6379. `restart()` brings the server back on the same
//! port (empty, as after a crash) so reconnect paths can be exercised. Integration tests
//! keep their own copy in `tests/common`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The redis-server to run. Same rule as `tests/common` and `scripts/test.sh`:
/// `REDIS_SERVER_BIN`, else the PATH, else /usr/bin, /usr/local/bin. (Not an `MDBRIDGE_`
/// variable: those are config overrides, and an unknown one is refused.)
fn binary() -> std::path::PathBuf {
    use std::path::PathBuf;
    if let Some(p) = std::env::var_os("REDIS_SERVER_BIN") {
        return PathBuf::from(p);
    }
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("redis-server"))
                .collect()
        })
        .unwrap_or_default();
    candidates.extend(["/usr/bin/redis-server", "/usr/local/bin/redis-server"].map(PathBuf::from));
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "redis-server not found (looked at $REDIS_SERVER_BIN, PATH, /usr/bin, \
                 /usr/local/bin): install it (`apt-get install -y redis-server`) or run \
                 ./scripts/test.sh, which does"
            )
        })
}

pub struct RedisTestServer {
    binary: std::path::PathBuf,
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl RedisTestServer {
    /// Starts a server on a free port and waits until it answers `PING`.
    pub fn start() -> RedisTestServer {
        let binary = binary();
        // The OS picks a free port; the listener is dropped just before redis binds it.
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("no free local port")
            .port();
        let dir = tempfile::tempdir().expect("temp dir for redis-server");
        let mut server = RedisTestServer {
            binary,
            port,
            dir,
            child: None,
        };
        server.spawn();
        server
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Kills the server (like a crash); the port stays reserved for [`restart`](Self::restart).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a fresh, empty server on the same port.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    fn spawn(&mut self) {
        let child = Command::new(&self.binary)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.binary.display()));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.ping() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "redis-server on port {} did not answer PING within 10 s",
            self.port
        );
    }

    fn ping(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let mut buf = [0u8; 7];
        s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }
}

impl Drop for RedisTestServer {
    fn drop(&mut self) {
        self.kill();
    }
}
