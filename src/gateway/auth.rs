//! Who may connect and what they may subscribe to: bearer tokens, per-token `allow`
//! patterns, and the per-address throttle on failed authentication.
//!
//! Owns the decision only; the handshake (HTTP status, headers, metrics) is in
//! `handshake.rs`. Everything here is synchronous and short: the throttle's map sits
//! behind a `std::sync::Mutex` that is never held across an await.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_tungstenite::tungstenite::handshake::server::Request;
use tokio_tungstenite::tungstenite::http::header;

use crate::config::{BotToken, BotsConfig};
use crate::event::Pattern;

/// Addresses the throttle remembers at most; past it, the stalest entry is forgotten, so
/// an attacker with many addresses cannot grow the map.
const THROTTLE_CAPACITY: usize = 4_096;

/// What a token may subscribe to.
#[derive(Debug, Clone)]
pub enum Permissions {
    /// Every channel (no tokens configured, or a plain-string token).
    All,
    /// Only patterns covered by one of these.
    Allow(Arc<[Pattern]>),
}

impl Permissions {
    /// The first of `patterns` this token may not subscribe to.
    pub fn first_forbidden<'a>(&self, patterns: &'a [Pattern]) -> Option<&'a Pattern> {
        match self {
            Permissions::All => None,
            Permissions::Allow(allow) => patterns
                .iter()
                .find(|p| !allow.iter().any(|a| covers(a, p))),
        }
    }
}

/// True when `allow` matches every channel `pattern` can match: the same number of
/// segments, and each `allow` segment is `*` or equal to the pattern's.
pub fn covers(allow: &Pattern, pattern: &Pattern) -> bool {
    let mut a = allow.as_str().split(':');
    let mut p = pattern.as_str().split(':');
    loop {
        match (a.next(), p.next()) {
            (None, None) => return true,
            (Some("*"), Some(_)) => {}
            (Some(x), Some(y)) if x == y => {}
            _ => return false,
        }
    }
}

/// The configured tokens, ready for comparison.
pub struct Tokens {
    entries: Vec<(Box<[u8]>, Permissions)>,
}

impl Tokens {
    /// Allow patterns were validated with the config; one that still fails to parse is
    /// dropped (the token then allows less, never more).
    pub fn new(tokens: &[BotToken]) -> Tokens {
        let entries = tokens
            .iter()
            .map(|t| {
                let perms = match t.allow() {
                    None => Permissions::All,
                    Some(list) => Permissions::Allow(
                        list.iter()
                            .filter_map(|p| Pattern::parse(p).ok())
                            .collect::<Vec<_>>()
                            .into(),
                    ),
                };
                (t.token().as_bytes().into(), perms)
            })
            .collect();
        Tokens { entries }
    }

    /// True when no authentication is configured.
    pub fn open(&self) -> bool {
        self.entries.is_empty()
    }

    /// The permissions of the token the request carries (`Authorization: Bearer <token>`
    /// or `?token=<token>`); `None` when it carries no valid token. Without configured
    /// tokens everyone gets [`Permissions::All`].
    pub fn check(&self, req: &Request) -> Option<Permissions> {
        if self.open() {
            return Some(Permissions::All);
        }
        let header = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim().to_string());
        let query = req.uri().query().and_then(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == "token")
                .map(|(_, v)| v.into_owned())
        });
        let mut found = None;
        for given in header.iter().chain(query.iter()) {
            // Every entry is compared, so timing does not tell which one matched.
            for (token, perms) in &self.entries {
                if constant_time_eq(token, given.as_bytes()) && found.is_none() {
                    found = Some(perms.clone());
                }
            }
        }
        found
    }
}

/// Compares tokens without an early exit, so timing does not reveal a matching prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// One address's recent failures.
#[derive(Debug, Clone, Copy)]
struct Failures {
    /// Start of the counting window.
    since: Instant,
    count: u32,
    /// Until then bad tokens get 429 instead of 401 (valid ones are still admitted).
    blocked_until: Option<Instant>,
    last_seen: Instant,
}

/// Counts failed authentications per address (IPv6: per /64, since one host usually owns
/// the whole prefix) and puts an address that failed too often in cooldown, during which
/// its bad tokens are answered 429 (never its valid ones: see `handshake.rs`).
pub struct AuthThrottle {
    max_failures: u32,
    window: Duration,
    cooldown: Duration,
    capacity: usize,
    peers: Mutex<HashMap<IpAddr, Failures>>,
}

impl AuthThrottle {
    pub fn new(config: &BotsConfig) -> AuthThrottle {
        AuthThrottle {
            max_failures: config.auth_max_failures.max(1),
            window: Duration::from_millis(config.auth_window_ms),
            cooldown: Duration::from_millis(config.auth_cooldown_ms),
            capacity: THROTTLE_CAPACITY,
            peers: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Failures>> {
        // A poisoned map only holds counters: keep using it.
        match self.peers.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// When `ip` is blocked: how long it still is.
    pub fn blocked(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        let key = key(ip);
        let mut peers = self.lock();
        let entry = peers.get_mut(&key)?;
        match entry.blocked_until {
            Some(until) if until > now => {
                entry.last_seen = now;
                Some(until - now)
            }
            Some(_) => {
                peers.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Records a failure; returns true when this one starts a cooldown.
    pub fn failed(&self, ip: IpAddr, now: Instant) -> bool {
        let key = key(ip);
        let mut peers = self.lock();
        if !peers.contains_key(&key) && peers.len() >= self.capacity {
            evict(&mut peers, now, self.window);
        }
        let entry = peers.entry(key).or_insert(Failures {
            since: now,
            count: 0,
            blocked_until: None,
            last_seen: now,
        });
        if now.duration_since(entry.since) > self.window {
            entry.since = now;
            entry.count = 0;
        }
        entry.count += 1;
        entry.last_seen = now;
        if entry.count >= self.max_failures && entry.blocked_until.is_none() {
            entry.blocked_until = Some(now + self.cooldown);
            return true;
        }
        false
    }

    // No `succeeded`: a valid token does not forget the address's failures, or behind a
    // NAT a legitimate bot's reconnects would keep resetting a guesser's count. Failures
    // age out with the window; valid tokens are admitted even during a cooldown.

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

/// Makes room for one entry: drops every entry whose window and cooldown are over; if
/// none is, the one seen longest ago (O(n), only when the map is full).
fn evict(peers: &mut HashMap<IpAddr, Failures>, now: Instant, window: Duration) {
    let before = peers.len();
    peers.retain(|_, f| {
        f.blocked_until.is_some_and(|u| u > now) || now.duration_since(f.since) <= window
    });
    if peers.len() < before {
        return;
    }
    if let Some(oldest) = peers
        .iter()
        .min_by_key(|(_, f)| f.last_seen)
        .map(|(k, _)| *k)
    {
        peers.remove(&oldest);
    }
}

/// IPv4 addresses count alone; IPv6 by their /64.
fn key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let s = v6.segments();
            IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Pattern {
        Pattern::parse(s).unwrap()
    }

    #[test]
    fn allow_covers_only_what_it_matches_entirely() {
        assert!(covers(&p("trade:*:*"), &p("trade:binance:BTC-USDT")));
        assert!(covers(&p("trade:*:*"), &p("trade:*:BTC-USDT")));
        assert!(covers(&p("book:binance:*"), &p("book:binance:*")));
        assert!(!covers(&p("book:binance:*"), &p("book:*:BTC-USDT")));
        assert!(!covers(&p("trade:binance:*"), &p("*:binance:BTC-USDT")));
        assert!(covers(&p("*:binance:*"), &p("ticker:binance:ETH-USDT")));
        assert!(!covers(&p("*:binance:*"), &p("status:binance")));
        assert!(!covers(&p("*:binance:*"), &p("candle:binance:BTC-USDT:1m")));
        let perms = Permissions::Allow(vec![p("trade:*:*"), p("status:binance")].into());
        let asked = [p("trade:binance:BTC-USDT"), p("book:binance:BTC-USDT")];
        assert_eq!(perms.first_forbidden(&asked), Some(&asked[1]));
        assert_eq!(perms.first_forbidden(&asked[..1]), None);
        assert_eq!(Permissions::All.first_forbidden(&asked), None);
    }

    #[test]
    fn throttle_blocks_after_max_failures_and_stays_bounded() {
        let cfg = BotsConfig {
            auth_max_failures: 3,
            ..BotsConfig::default()
        };
        let t = AuthThrottle::new(&cfg);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let now = Instant::now();
        assert!(!t.failed(ip, now));
        assert!(!t.failed(ip, now));
        assert_eq!(t.blocked(ip, now), None);
        assert!(t.failed(ip, now));
        assert!(t.blocked(ip, now).is_some());
        assert_eq!(t.blocked(ip, now + Duration::from_secs(61)), None);
        // Two addresses of one /64 share an entry.
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        let b: IpAddr = "2001:db8::2".parse().unwrap();
        for _ in 0..3 {
            t.failed(a, now);
        }
        assert!(t.blocked(b, now).is_some());
        for i in 0..(THROTTLE_CAPACITY as u32 * 2) {
            t.failed(IpAddr::V4(std::net::Ipv4Addr::from(i)), now);
        }
        assert!(t.len() <= THROTTLE_CAPACITY);
    }
}
