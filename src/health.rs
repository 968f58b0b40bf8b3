//! Health of each part of an instance, as the admin `/health` endpoint reports it.
//!
//! `app` registers one [`HealthHandle`] per component (each exchange feed, the Redis
//! publisher and subscriber, the bot server) and hands it to that part; the part flips it
//! up or down with a reason. The HTTP layer only reads the registry, it never reaches into
//! the roles.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::event::now_micros;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ComponentHealth {
    pub healthy: bool,
    /// Healthy but below par (a consumer group falling behind its stream): `/health` still
    /// answers 200, with status `degraded`. Only shown when set.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub degraded: bool,
    pub detail: Option<String>,
    /// When the state last changed (µs since the epoch).
    pub since: u64,
}

/// All components of this instance.
#[derive(Clone, Default)]
pub struct Health {
    components: Arc<Mutex<BTreeMap<String, ComponentHealth>>>,
}

/// One component's switch; cheap to clone.
#[derive(Clone)]
pub struct HealthHandle {
    name: String,
    registry: Health,
}

impl Health {
    pub fn new() -> Health {
        Health::default()
    }

    /// Registers `name`, unhealthy until the part says otherwise.
    pub fn register(&self, name: impl Into<String>) -> HealthHandle {
        let name = name.into();
        self.set(&name, false, false, Some("starting".to_string()));
        HealthHandle {
            name,
            registry: self.clone(),
        }
    }

    fn set(&self, name: &str, healthy: bool, degraded: bool, detail: Option<String>) {
        let mut map = match self.components.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        let changed = map
            .get(name)
            .map(|c| c.healthy != healthy || c.degraded != degraded || c.detail != detail);
        if changed != Some(false) {
            map.insert(
                name.to_string(),
                ComponentHealth {
                    healthy,
                    degraded,
                    detail,
                    since: now_micros(),
                },
            );
        }
    }

    /// A copy of every component's state, by name.
    pub fn report(&self) -> BTreeMap<String, ComponentHealth> {
        match self.components.lock() {
            Ok(m) => m.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn all_healthy(&self) -> bool {
        self.report().values().all(|c| c.healthy)
    }
}

impl HealthHandle {
    pub fn up(&self, detail: Option<String>) {
        self.registry.set(&self.name, true, false, detail);
    }
    pub fn down(&self, detail: impl Into<String>) {
        self.registry
            .set(&self.name, false, false, Some(detail.into()));
    }
    /// Working, but below par: `detail` says what and by how much.
    pub fn degraded(&self, detail: impl Into<String>) {
        self.registry
            .set(&self.name, true, true, Some(detail.into()));
    }
    pub fn name(&self) -> &str {
        &self.name
    }
    /// A component `<name>/<part>` in the same registry (e.g. one socket of a sharded
    /// feed), unhealthy until it says otherwise.
    pub fn part(&self, part: &str) -> HealthHandle {
        self.registry.register(format!("{}/{part}", self.name))
    }
    /// A handle that belongs to no shown registry (for tools and tests).
    pub fn detached(name: &str) -> HealthHandle {
        Health::new().register(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components_start_down_and_flip() {
        let h = Health::new();
        let redis = h.register("redis");
        let bots = h.register("bots");
        assert!(!h.all_healthy());
        redis.up(None);
        bots.up(Some("0 clients".into()));
        assert!(h.all_healthy());
        redis.down("connection refused");
        let r = h.report();
        assert!(!r["redis"].healthy);
        assert_eq!(r["redis"].detail.as_deref(), Some("connection refused"));
        redis.degraded("lag 500 > 100");
        let r = h.report();
        assert!(r["redis"].healthy && r["redis"].degraded);
        assert!(h.all_healthy());
        redis.up(None);
        assert!(!h.report()["redis"].degraded);
    }
}
