//! The bot port's front door: the accept loop with its handshake cap, the TLS acceptor
//! for `wss://`, and the file-descriptor budget that bounds `max_connections`.
//!
//! Owns nothing after a connection is accepted: each accepted socket goes, with its
//! handshake permit, to `connection.rs`, which runs the TLS + WebSocket handshake under
//! the handshake timeout and gives the permit back when the handshake is over.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;

use super::connection::{self, Shared};
use crate::config::BotsConfig;

/// File descriptors kept out of the bot budget: the admin HTTP listener and its
/// connections (capped separately, see docs/operations.md), Redis connections, the
/// exchange feeds, log files and the runtime's own.
pub const FD_RESERVE: u64 = 512;

/// Loads the certificate chain and key when `tls_cert_file`/`tls_key_file` are set.
pub fn tls_acceptor(config: &BotsConfig) -> io::Result<Option<TlsAcceptor>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let (Some(cert), Some(key)) = (&config.tls_cert_file, &config.tls_key_file) else {
        return Ok(None);
    };
    let bad = |what: &str, file: &str, e: &dyn std::fmt::Display| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bots.{what} `{file}`: {e}"),
        )
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| bad("tls_cert_file", cert, &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad("tls_cert_file", cert, &e))?;
    if chain.is_empty() {
        return Err(bad("tls_cert_file", cert, &"no certificate in the file"));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| bad("tls_key_file", key, &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("tls_cert_file", cert, &e))?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| bad("tls_key_file", key, &e))?;
    Ok(Some(TlsAcceptor::from(Arc::new(server))))
}

/// `max_connections`, lowered when the process's file-descriptor limit cannot hold it
/// next to the handshakes and [`FD_RESERVE`]. The soft limit is raised to the hard one
/// first ([`crate::fd_limit::raise`], idempotent; allowed without privileges).
pub fn connection_budget(config: &BotsConfig) -> usize {
    let want = config.max_connections;
    let Some(limit) = crate::fd_limit::raise().soft else {
        return want;
    };
    let available = limit
        .saturating_sub(FD_RESERVE)
        .saturating_sub(config.max_handshakes as u64)
        .max(1);
    if want as u64 > available {
        let clamped = usize::try_from(available).unwrap_or(usize::MAX);
        tracing::warn!(
            max_connections = want,
            clamped,
            rlimit_nofile = limit,
            max_handshakes = config.max_handshakes,
            reserve = FD_RESERVE,
            "bots.max_connections does not fit the file-descriptor limit; lowering it \
             (raise `ulimit -n` / LimitNOFILE to keep it)"
        );
        clamped
    } else {
        want
    }
}

/// Accepts until `shared.shutdown`. A handshake permit is taken *before* `accept`, so
/// past `max_handshakes` new connections wait in the kernel's backlog and cost no file
/// descriptor here.
pub async fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>, tracker: &TaskTracker) {
    let handshakes = Arc::new(Semaphore::new(shared.config.max_handshakes.max(1)));
    loop {
        let permit = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            p = handshakes.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    tracker.spawn(connection::connection(shared.clone(), stream, peer, permit));
                }
                Err(e) => {
                    // Usually out of file descriptors: wait a little instead of spinning.
                    tracing::warn!(cause = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}
