//! A private redis-server with arbitrary arguments (ACL file, TLS-only, replica), the
//! certificates a TLS test needs (generated with rcgen, no system tool), and a publisher
//! plus executor pair configured with any `[redis]` settings.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{find_redis_server, free_port, role_config, Proc, WAIT};

/// A redis-server started with `args` on a free port, killed on drop. Readiness is read
/// from its log ("Ready to accept connections"), so it works for TLS-only servers too.
pub struct CustomRedis {
    pub port: u16,
    pub dir: tempfile::TempDir,
    child: Child,
}

impl CustomRedis {
    /// `args` may use `{port}` and `{dir}`; `tls` puts the port on `--tls-port` (and
    /// disables the plain one).
    pub fn start(args: &[String], tls: bool) -> CustomRedis {
        let dir = tempfile::tempdir().expect("tempdir");
        CustomRedis::start_in(dir, args, tls)
    }

    pub fn start_in(dir: tempfile::TempDir, args: &[String], tls: bool) -> CustomRedis {
        let port = free_port();
        let log = dir.path().join("redis.log");
        let mut cmd = Command::new(find_redis_server());
        if tls {
            cmd.args(["--port", "0", "--tls-port", &port.to_string()]);
        } else {
            cmd.args(["--port", &port.to_string()]);
        }
        cmd.args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .arg("--logfile")
            .arg(&log);
        for a in args {
            cmd.arg(
                a.replace("{port}", &port.to_string())
                    .replace("{dir}", &dir.path().display().to_string()),
            );
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        let mut server = CustomRedis { port, dir, child };
        let deadline = Instant::now() + WAIT;
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("Ready to accept connections") {
                break;
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("redis-server exited with {status}:\n{text}");
            }
            assert!(Instant::now() < deadline, "redis-server not ready:\n{text}");
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A connection as `user`/`password` over plain TCP.
    pub fn conn_as(&self, user: &str, password: &str) -> redis::Connection {
        let url = format!("redis://{user}:{password}@127.0.0.1:{}/0", self.port);
        redis::Client::open(url)
            .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)))
            .expect("connect to the test redis")
    }
}

impl Drop for CustomRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// PEM files of a test CA, a server certificate for 127.0.0.1 and a client certificate.
pub struct TlsFiles {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

/// Generates a CA and the certificates it signs into `dir`.
pub fn tls_files(dir: &Path) -> TlsFiles {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "mdbridge test CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate().expect("ca key");
    let ca = ca_params.self_signed(&ca_key).expect("ca cert");

    let leaf = |name: &str, purpose: ExtendedKeyUsagePurpose| {
        let mut p = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".into()])
            .expect("leaf params");
        p.distinguished_name.push(DnType::CommonName, name);
        p.extended_key_usages = vec![purpose];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().expect("leaf key");
        let cert = p.signed_by(&key, &ca, &ca_key).expect("leaf cert");
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf("redis", ExtendedKeyUsagePurpose::ServerAuth);
    let (client_cert, client_key) = leaf("mdbridge", ExtendedKeyUsagePurpose::ClientAuth);
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::File::create(&path)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .expect("write pem");
        path
    };
    TlsFiles {
        ca: write("ca.pem", &ca.pem()),
        server_cert: write("server.pem", &server_cert),
        server_key: write("server.key", &server_key),
        client_cert: write("client.pem", &client_cert),
        client_key: write("client.key", &client_key),
    }
}

/// A publisher (with `feed`) and an executor, each with its own Redis URL and extra
/// `[redis]` lines; returns once both are healthy.
pub async fn roles_with(
    publisher_url: &str,
    publisher_redis: &str,
    executor_url: &str,
    executor_redis: &str,
    feed: &str,
) -> (Proc, Proc) {
    let (ph, pb, eh, eb) = (free_port(), free_port(), free_port(), free_port());
    let with = |url: &str, http: u16, bots: u16, redis_extra: &str, extra: &str| {
        role_config(url, http, bots, extra)
            .replace("[redis]\n", &format!("[redis]\n{redis_extra}\n"))
    };
    let mut publisher = Proc::role(
        "publisher",
        &with(publisher_url, ph, pb, publisher_redis, feed),
        ph,
        None,
    );
    let mut executor = Proc::role(
        "executor",
        &with(executor_url, eh, eb, executor_redis, ""),
        eh,
        Some(eb),
    );
    publisher.wait_healthy().await;
    executor.wait_healthy().await;
    (publisher, executor)
}
