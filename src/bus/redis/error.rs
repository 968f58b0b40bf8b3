//! What a Redis failure means and what to do about it.
//!
//! An error *reply* is not a dead connection: an out-of-memory Redis (`OOM`) still speaks,
//! and reconnecting to it only adds load; a replica after a failover (`READONLY`) is the
//! wrong server and only a new connection (to whatever the URL now resolves to) helps; a
//! server still loading its dataset (`LOADING`) becomes usable by itself. [`RedisFailure`]
//! classifies a [`RedisError`] and [`RedisFailure::recovery`] says which of those policies
//! applies. The publisher and subscriber loops match on it; this module decides nothing
//! else (no logging, no metrics).

use std::time::Duration;

use ::redis::{ErrorKind, RedisError};

/// One Redis failure, by what it means for the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RedisFailure {
    /// `OOM`: `maxmemory` reached with a `noeviction` policy; writes are refused, the
    /// connection is healthy.
    #[error("Redis is out of memory (OOM): {0}")]
    OutOfMemory(String),
    /// `READONLY`: this server is (now) a replica, e.g. after a failover.
    #[error("Redis is a read-only replica (READONLY): {0}")]
    ReadOnly(String),
    /// `LOADING`: the server is loading its dataset after a restart.
    #[error("Redis is loading its dataset (LOADING): {0}")]
    Loading(String),
    /// `NOSCRIPT`: an `EVALSHA` whose script the server does not have (flushed, restarted).
    #[error("Redis does not have the script (NOSCRIPT): {0}")]
    NoScript(String),
    /// `NOPERM`, `NOAUTH`, `WRONGPASS`: the ACL user may not do this, or is not logged in.
    #[error("Redis refused by ACL or authentication: {0}")]
    Permission(String),
    /// The connection failed: refused, reset, timed out, closed, TLS.
    #[error("{0}")]
    Connection(String),
    /// Any other error reply: a bug or an unexpected server; the connection is fine.
    #[error("Redis error reply: {0}")]
    Other(String),
}

/// What the caller should do after a [`RedisFailure`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// Keep the connection; drop (and count) what failed and carry on. Reconnecting
    /// would not help and only loads the server.
    Drop,
    /// Keep the connection, but send nothing for a while (the server will be usable by
    /// itself, soon); what arrives meanwhile is dropped and counted.
    WaitAndRetry(Duration),
    /// Drop this connection and make a new one (with backoff).
    Reconnect,
    /// Load the script again (`SCRIPT LOAD` / `EVAL`), then retry once.
    ReloadScript,
    /// Retrying cannot help until an operator fixes the configuration (credentials,
    /// ACL): keep the connection, drop and count, and say so loudly (rate-limited).
    Fatal,
}

/// How long a `LOADING` server is left alone before the next try.
pub const LOADING_PAUSE: Duration = Duration::from_millis(500);

impl RedisFailure {
    /// Classifies any error redis-rs returns.
    pub fn classify(e: &RedisError) -> RedisFailure {
        let text = e.to_string();
        // Server replies first: redis-rs calls a failed AUTH "unrecoverable" too.
        match e.kind() {
            ErrorKind::ReadOnly => return RedisFailure::ReadOnly(text),
            ErrorKind::BusyLoadingError => return RedisFailure::Loading(text),
            ErrorKind::NoScriptError => return RedisFailure::NoScript(text),
            ErrorKind::AuthenticationFailed => return RedisFailure::Permission(text),
            _ => {}
        }
        // OOM and the ACL errors have no kind of their own: redis-rs keeps their code.
        match e.code() {
            Some("OOM") => return RedisFailure::OutOfMemory(text),
            Some("NOPERM" | "NOAUTH" | "WRONGPASS") => return RedisFailure::Permission(text),
            _ => {}
        }
        if e.is_io_error()
            || e.is_timeout()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.is_unrecoverable_error()
            || matches!(e.kind(), ErrorKind::ClientError)
        {
            return RedisFailure::Connection(text);
        }
        RedisFailure::Other(text)
    }

    /// The policy for this class (see the module docs).
    pub fn recovery(&self) -> Recovery {
        match self {
            RedisFailure::OutOfMemory(_) | RedisFailure::Other(_) => Recovery::Drop,
            RedisFailure::Loading(_) => Recovery::WaitAndRetry(LOADING_PAUSE),
            RedisFailure::ReadOnly(_) | RedisFailure::Connection(_) => Recovery::Reconnect,
            RedisFailure::NoScript(_) => Recovery::ReloadScript,
            RedisFailure::Permission(_) => Recovery::Fatal,
        }
    }

    /// Short, stable name of the class: the `reason` label of the failure metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            RedisFailure::OutOfMemory(_) => "redis_oom",
            RedisFailure::ReadOnly(_) => "redis_readonly",
            RedisFailure::Loading(_) => "redis_loading",
            RedisFailure::NoScript(_) => "redis_noscript",
            RedisFailure::Permission(_) => "redis_noperm",
            RedisFailure::Connection(_) => "redis_down",
            RedisFailure::Other(_) => "redis_error",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_and_policies() {
        let io = RedisError::from(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "reset",
        ));
        assert_eq!(RedisFailure::classify(&io).recovery(), Recovery::Reconnect);
        let ro = RedisError::from((ErrorKind::ReadOnly, "readonly"));
        assert!(matches!(
            RedisFailure::classify(&ro),
            RedisFailure::ReadOnly(_)
        ));
        let loading = RedisError::from((ErrorKind::BusyLoadingError, "loading"));
        assert_eq!(
            RedisFailure::classify(&loading).recovery(),
            Recovery::WaitAndRetry(LOADING_PAUSE)
        );
        let ns = RedisError::from((ErrorKind::NoScriptError, "noscript"));
        assert_eq!(
            RedisFailure::classify(&ns).recovery(),
            Recovery::ReloadScript
        );
        let generic = RedisError::from((ErrorKind::ResponseError, "ERR", "wrong".to_string()));
        assert_eq!(RedisFailure::classify(&generic).recovery(), Recovery::Drop);
        let auth = RedisError::from((ErrorKind::AuthenticationFailed, "auth"));
        assert_eq!(RedisFailure::classify(&auth).recovery(), Recovery::Fatal);
        // OOM and NOPERM (extension errors in redis-rs) are checked against a real server
        // in live_tests and tests/redis_security.rs.
    }
}
