//! Where a Redis connection goes: the fixed `url`, or the master that Redis Sentinel names.
//!
//! Every role's connections (publisher, subscriber and its probe, latest-value store,
//! startup check, `/health/redis`) ask a [`Target`] on every (re)connect instead of
//! holding a [`Client`] built once at start, so a failover is followed by the next
//! reconnect. It owns no connection of its own and no background task beyond the
//! per-session [`MasterWatch`].
//!
//! - Plain `url`: [`Target::resolve`] returns the same client every time.
//! - `sentinels` + `master_name`: the sentinels are asked in turn
//!   (`SENTINEL get-master-addr-by-name`, each bounded by the I/O timeout); the first that
//!   names the master wins. The client is `url` with its host and port replaced by the
//!   master's, so user, password, database, `rediss://` and the TLS files are those of
//!   `url`. Sentinels authenticate with the user/password in their own URLs. The named node
//!   is then asked `ROLE`: one that says it is not the master (a stale sentinel, a failover
//!   in progress) is an error, so the caller backs off and resolves again. An ACL user not
//!   allowed `ROLE` skips that check (the sentinels' word is taken).
//! - While a session is up, [`Target::watch`] re-asks the sentinels every
//!   `probe_interval_ms`; when they name another master the watch fires and the caller ends
//!   the session. This catches a connection to a demoted or partitioned old master that
//!   stays open but silent.
//! - The reconnect backoff ([`Target::backoff`]) is cut short when the sentinels name a
//!   new master, so a promoted replica is used at once rather than after the rest of a
//!   backoff grown during the outage.
//! - A resolve that lands on another master than this role's previous one is a failover
//!   followed: `mdbridge_redis_failovers_total{role}` + 1 and one log line.
//!
//! redis-rs's own `sentinel` feature is not used: it hides the per-sentinel timeouts and
//! the master address a session is bound to, both of which the watch needs.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ::redis::aio::MultiplexedConnection;
use ::redis::{Client, RedisError, Value};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::{client_for, connect, io_timeout, redact, RedisFailure};
use crate::bus::BusError;
use crate::config::RedisConfig;
use crate::metrics;

/// How often [`Target::backoff`] asks the sentinels while waiting to reconnect.
pub const BACKOFF_POLL: Duration = Duration::from_millis(250);

/// Host and port of a Redis master, as a sentinel names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasterAddr {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for MasterAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Why a resolve gave no usable master; the caller backs off and tries again.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("no sentinel names master `{name}`: {detail}")]
    NoMaster { name: String, detail: String },
    #[error("{addr} says it is a {role}, not the master")]
    NotMaster { addr: MasterAddr, role: String },
    #[error("{0}")]
    Client(#[from] BusError),
    #[error("{}", RedisFailure::classify(.0))]
    Redis(#[from] RedisError),
}

/// The resolver one role uses for all its connections; cheap to clone.
#[derive(Clone)]
pub struct Target {
    inner: Arc<Inner>,
    role: &'static str,
    /// The master this role was last resolved to (Sentinel only): a different one next
    /// time is a failover followed.
    last: Arc<Mutex<Option<MasterAddr>>>,
}

struct Inner {
    config: RedisConfig,
    mode: Mode,
}

enum Mode {
    Fixed(Client),
    Sentinel {
        master_name: String,
        sentinels: Vec<Sentinel>,
    },
}

struct Sentinel {
    /// For logs: the URL without its password.
    shown: String,
    client: Client,
}

/// A client for the current master, and which master that is (Sentinel only).
pub struct Resolved {
    pub client: Client,
    pub master: Option<MasterAddr>,
}

impl Resolved {
    /// For logs: where this session is connected.
    pub fn shown(&self, target: &Target) -> String {
        match &self.master {
            Some(addr) => format!("{addr} (master `{}`)", target.master_name()),
            None => redact(&target.inner.config.url),
        }
    }
}

impl Target {
    /// Builds the clients (reads the TLS files) for `role`'s connections; a bad URL or file
    /// is an error here, at start.
    pub fn new(config: &RedisConfig, role: &'static str) -> Result<Target, BusError> {
        let mode = if config.sentinels.is_empty() {
            Mode::Fixed(super::client(config)?)
        } else {
            let sentinels = config
                .sentinels
                .iter()
                .map(|url| {
                    Ok(Sentinel {
                        shown: redact(url),
                        client: client_for(config, url)?,
                    })
                })
                .collect::<Result<Vec<_>, BusError>>()?;
            Mode::Sentinel {
                master_name: config.master_name.clone(),
                sentinels,
            }
        };
        Ok(Target {
            inner: Arc::new(Inner {
                config: config.clone(),
                mode,
            }),
            role,
            last: Arc::default(),
        })
    }

    fn master_name(&self) -> &str {
        match &self.inner.mode {
            Mode::Sentinel { master_name, .. } => master_name,
            Mode::Fixed(_) => "",
        }
    }

    /// For error messages: the URL, or the master name and its sentinels.
    pub fn describe(&self) -> String {
        match &self.inner.mode {
            Mode::Fixed(_) => redact(&self.inner.config.url),
            Mode::Sentinel {
                master_name,
                sentinels,
            } => {
                let list: Vec<&str> = sentinels.iter().map(|s| s.shown.as_str()).collect();
                format!("master `{master_name}` via sentinels [{}]", list.join(", "))
            }
        }
    }

    /// A client for the current master. Sentinel: asks the sentinels, checks the named
    /// node's `ROLE`, counts a failover when the master changed since the last resolve.
    pub async fn resolve(&self) -> Result<Resolved, TargetError> {
        if let Mode::Fixed(client) = &self.inner.mode {
            // Nothing to ask and no role to check: no connection either.
            return Ok(Resolved {
                client: client.clone(),
                master: None,
            });
        }
        // Sentinel: the role check needs a connection to the named node; it is dropped.
        Ok(self.connect().await?.1)
    }

    /// [`resolve`](Self::resolve) plus a multiplexed connection to the master (the one the
    /// role check used, so the caller does not connect twice).
    pub async fn connect(&self) -> Result<(MultiplexedConnection, Resolved), TargetError> {
        let timeout = io_timeout(&self.inner.config);
        let addr = match &self.inner.mode {
            Mode::Fixed(client) => {
                let conn = connect(client, timeout).await?;
                let resolved = Resolved {
                    client: client.clone(),
                    master: None,
                };
                return Ok((conn, resolved));
            }
            Mode::Sentinel { .. } => self.ask(&mut None).await?,
        };
        let client = client_for(&self.inner.config, &self.master_url(&addr))?;
        let mut conn = connect(&client, timeout).await?;
        check_role(&mut conn, &addr, timeout).await?;
        self.note(&addr);
        let resolved = Resolved {
            client,
            master: Some(addr),
        };
        Ok((conn, resolved))
    }

    /// The reconnect backoff: sleeps `delay`, but with Sentinel wakes early when the
    /// sentinels name another master than this role's last one. During an outage the
    /// backoff grows towards `reconnect_max_ms`; without this the promoted replica would
    /// wait out the rest of it. The sentinels are polled every [`BACKOFF_POLL`] at most,
    /// on one kept connection, and only for delays longer than that.
    pub async fn backoff(&self, delay: Duration) {
        let last = self
            .last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let Some(last) = last.filter(|_| delay > BACKOFF_POLL) else {
            return tokio::time::sleep(delay).await;
        };
        let deadline = tokio::time::Instant::now() + delay;
        let mut link = None;
        loop {
            let poll = tokio::time::Instant::now() + BACKOFF_POLL;
            tokio::time::sleep_until(poll.min(deadline)).await;
            if tokio::time::Instant::now() >= deadline {
                return;
            }
            match tokio::time::timeout_at(deadline, self.ask(&mut link)).await {
                Ok(Ok(addr)) if addr != last => {
                    info!(role = self.role, master = %addr, "sentinels name a new redis master; reconnecting now");
                    return;
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    }

    /// Fires (with the reason) when the sentinels name another master than `session`'s.
    /// Never fires for a plain URL, nor while no sentinel answers (the session's own
    /// errors and probe cover a dead master).
    pub fn watch(&self, session: &Resolved) -> MasterWatch {
        let Some(current) = session.master.clone() else {
            return MasterWatch(None);
        };
        let every = Duration::from_millis(self.inner.config.probe_interval_ms.max(100));
        let target = self.clone();
        MasterWatch(Some(tokio::spawn(async move {
            let mut link = None;
            loop {
                tokio::time::sleep(every).await;
                match target.ask(&mut link).await {
                    Ok(addr) if addr != current => {
                        return format!("sentinels name a new master {addr} (was {current})")
                    }
                    Ok(_) => {}
                    Err(e) => debug!(cause = %e, "sentinel check failed; session kept"),
                }
            }
        })))
    }

    /// Asks each sentinel in turn; the first that names the master wins. `link` is the
    /// connection to the sentinel that answered last (the watch keeps it between checks,
    /// so a long session costs the sentinels one connection, not one per check): it is
    /// asked first, and replaced by whichever sentinel answers if it fails.
    async fn ask(
        &self,
        link: &mut Option<MultiplexedConnection>,
    ) -> Result<MasterAddr, TargetError> {
        let Mode::Sentinel {
            master_name,
            sentinels,
        } = &self.inner.mode
        else {
            return Err(TargetError::NoMaster {
                name: String::new(),
                detail: "no sentinels configured".into(),
            });
        };
        let timeout = io_timeout(&self.inner.config);
        if let Some(conn) = link.as_mut() {
            if let Ok(Ok(Some(answer))) =
                tokio::time::timeout(timeout, query_master(conn, master_name)).await
            {
                if let Some(addr) = parse_addr(answer) {
                    return Ok(addr);
                }
            }
            *link = None;
        }
        let mut detail = Vec::new();
        for sentinel in sentinels {
            let attempt = async {
                let mut conn = connect(&sentinel.client, timeout).await?;
                let answer = query_master(&mut conn, master_name).await?;
                Ok::<_, RedisError>((conn, answer))
            };
            match tokio::time::timeout(timeout, attempt).await {
                Ok(Ok((conn, Some(answer)))) => match parse_addr(answer) {
                    Some(addr) => {
                        *link = Some(conn);
                        return Ok(addr);
                    }
                    None => detail.push(format!("{}: bad port", sentinel.shown)),
                },
                Ok(Ok((_, None))) => detail.push(format!("{}: unknown master", sentinel.shown)),
                Ok(Err(e)) => detail.push(format!("{}: {e}", sentinel.shown)),
                Err(_) => detail.push(format!("{}: timed out", sentinel.shown)),
            }
        }
        Err(TargetError::NoMaster {
            name: master_name.clone(),
            detail: detail.join("; "),
        })
    }

    /// `url` with the master's host and port: credentials, database and TLS stay.
    fn master_url(&self, addr: &MasterAddr) -> String {
        let url = &self.inner.config.url;
        match url::Url::parse(url) {
            Ok(mut u) => {
                let host_ok = u.set_host(Some(&addr.host)).is_ok();
                if host_ok && u.set_port(Some(addr.port)).is_ok() {
                    return u.to_string();
                }
                format!("redis://{addr}/")
            }
            Err(_) => format!("redis://{addr}/"),
        }
    }

    /// Remembers `addr` as this role's master; a change is a failover followed.
    fn note(&self, addr: &MasterAddr) {
        let previous = self
            .last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .replace(addr.clone());
        match previous {
            Some(prev) if prev != *addr => {
                metrics::redis_failover(self.role);
                warn!(role = self.role, from = %prev, to = %addr, master = self.master_name(), "redis failover followed: new master");
            }
            None => {
                info!(role = self.role, master = %addr, name = self.master_name(), "sentinels name the redis master")
            }
            Some(_) => {}
        }
    }
}

/// `SENTINEL get-master-addr-by-name`: `[host, port]`, or nil for an unknown name.
async fn query_master(
    conn: &mut MultiplexedConnection,
    master_name: &str,
) -> ::redis::RedisResult<Option<(String, String)>> {
    ::redis::cmd("SENTINEL")
        .arg("get-master-addr-by-name")
        .arg(master_name)
        .query_async(conn)
        .await
}

fn parse_addr((host, port): (String, String)) -> Option<MasterAddr> {
    Some(MasterAddr {
        host,
        port: port.parse().ok()?,
    })
}

/// `ROLE` must say `master`. A NOPERM (ACL user without `ROLE`) skips the check.
async fn check_role(
    conn: &mut MultiplexedConnection,
    addr: &MasterAddr,
    timeout: Duration,
) -> Result<(), TargetError> {
    let reply =
        tokio::time::timeout(timeout, ::redis::cmd("ROLE").query_async::<Value>(conn)).await;
    let value = match reply {
        Ok(Ok(v)) => v,
        Ok(Err(e)) if e.code() == Some("NOPERM") => return Ok(()),
        Ok(Err(e)) => return Err(e.into()),
        Err(_) => {
            return Err(TargetError::NotMaster {
                addr: addr.clone(),
                role: "node not answering ROLE".into(),
            })
        }
    };
    let role = match &value {
        Value::Array(items) => match items.first() {
            Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
            Some(Value::SimpleString(s)) => s.clone(),
            _ => String::new(),
        },
        _ => String::new(),
    };
    if role == "master" {
        Ok(())
    } else {
        Err(TargetError::NotMaster {
            addr: addr.clone(),
            role: if role.is_empty() { "?".into() } else { role },
        })
    }
}

/// A session's watch on the sentinels ([`Target::watch`]); aborted when dropped.
pub struct MasterWatch(Option<JoinHandle<String>>);

impl MasterWatch {
    /// A watch that never fires.
    pub fn none() -> MasterWatch {
        MasterWatch(None)
    }

    /// Completes when the sentinels name another master; pending forever otherwise.
    pub async fn moved(&mut self) -> String {
        if let Some(handle) = self.0.as_mut() {
            if let Ok(reason) = handle.await {
                self.0 = None;
                return reason;
            }
            self.0 = None;
        }
        std::future::pending().await
    }

    /// The watch already fired (for callers without a select loop).
    pub fn has_moved(&self) -> bool {
        self.0.as_ref().is_some_and(|h| h.is_finished())
    }
}

impl Drop for MasterWatch {
    fn drop(&mut self) {
        if let Some(handle) = self.0.take() {
            handle.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sentinel_config(url: &str) -> RedisConfig {
        RedisConfig {
            url: url.into(),
            sentinels: vec!["redis://:spw@127.0.0.1:26379".into()],
            master_name: "m".into(),
            ..RedisConfig::default()
        }
    }

    #[test]
    fn master_url_keeps_credentials_db_and_scheme() {
        let t = Target::new(&sentinel_config("redis://u:p@ignored:1/3"), "publish").unwrap();
        let addr = MasterAddr {
            host: "10.0.0.7".into(),
            port: 6380,
        };
        assert_eq!(t.master_url(&addr), "redis://u:p@10.0.0.7:6380/3");
        assert!(t.describe().contains("redis://:***@127.0.0.1:26379"));
        assert!(!t.describe().contains("spw"));
    }

    #[tokio::test]
    async fn a_replica_is_not_taken_for_the_master() {
        let master = crate::bus::redis_test_server::RedisTestServer::start();
        let replica = crate::bus::redis_test_server::RedisTestServer::start();
        let timeout = Duration::from_secs(2);
        let addr = |port| MasterAddr {
            host: "127.0.0.1".into(),
            port,
        };
        let mut conn = connect(&Client::open(replica.url()).unwrap(), timeout)
            .await
            .unwrap();
        let _: () = ::redis::cmd("REPLICAOF")
            .arg("127.0.0.1")
            .arg(master.port())
            .query_async(&mut conn)
            .await
            .unwrap();
        let err = check_role(&mut conn, &addr(replica.port()), timeout)
            .await
            .unwrap_err();
        match err {
            TargetError::NotMaster { role, .. } => assert_eq!(role, "slave"),
            other => panic!("{other}"),
        }
        let mut conn = connect(&Client::open(master.url()).unwrap(), timeout)
            .await
            .unwrap();
        check_role(&mut conn, &addr(master.port()), timeout)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn no_sentinel_answering_is_a_no_master_error() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = RedisConfig {
            sentinels: vec![format!("redis://127.0.0.1:{port}")],
            master_name: "m".into(),
            probe_timeout_ms: 300,
            ..RedisConfig::default()
        };
        let t = Target::new(&config, "publish").unwrap();
        let err = t.resolve().await.err().unwrap();
        assert!(matches!(err, TargetError::NoMaster { .. }), "{err}");
    }
}
