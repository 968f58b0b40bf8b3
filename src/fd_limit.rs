//! The process's file-descriptor budget: every bot socket, admin connection, Redis
//! connection and exchange socket costs one.
//!
//! At start the soft `RLIMIT_NOFILE` is raised to the hard limit (capped at 2^20): the
//! common soft default of 1 024 exists for `select()`, which tokio does not use, and would
//! otherwise cap bots far below what the machine allows. How the budget is shared between
//! the bot listener and the admin port is documented in docs/operations.md ("File
//! descriptors"); the admin port never takes more than `[http] max_connections`.
//! This module only reads and raises the limit; it never lowers it.

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// Highest soft limit asked for when the hard limit is unlimited.
const CEILING: u64 = 1 << 20;

/// The descriptor limit after [`raise`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdLimit {
    /// The soft limit now in force (`None`: unlimited).
    pub soft: Option<u64>,
    /// The soft limit before, when it was raised.
    pub raised_from: Option<u64>,
}

/// Raises the soft limit to the hard one (see the module doc); on failure keeps it.
pub fn raise() -> FdLimit {
    let before = getrlimit(Resource::Nofile);
    let target = before.maximum.unwrap_or(CEILING).min(CEILING);
    match before.current {
        Some(soft) if soft < target => {
            let wanted = Rlimit {
                current: Some(target),
                maximum: before.maximum,
            };
            match setrlimit(Resource::Nofile, wanted) {
                Ok(()) => FdLimit {
                    soft: Some(target),
                    raised_from: Some(soft),
                },
                Err(_) => FdLimit {
                    soft: Some(soft),
                    raised_from: None,
                },
            }
        }
        current => FdLimit {
            soft: current,
            raised_from: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raising_never_lowers_and_is_idempotent() {
        let before = getrlimit(Resource::Nofile).current;
        let first = raise();
        let second = raise();
        assert!(first.soft >= before || first.soft.is_none());
        assert_eq!(second.soft, first.soft);
        assert_eq!(second.raised_from, None);
        assert_eq!(getrlimit(Resource::Nofile).current, first.soft);
    }
}
