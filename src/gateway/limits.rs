//! Per-connection request rate limit: a token bucket, plus a flood detector for bots that
//! keep sending far past the limit.
//!
//! Owned by one reader task (no locking). A request costs one token per channel it names
//! (a `subscribe` / `unsubscribe` of N distinct patterns costs N: each book, ticker, candle
//! or status pattern of a subscribe starts its own store read), any other text or binary
//! message one; a request costing more than the bucket holds is refused whole. WebSocket
//! control frames (ping/pong) are not requests and cost nothing (they are bounded by
//! `message_timeout_ms` and tungstenite's frame limits).
//!
//! Two steps, so a bot already over its limit costs no parsing: [`RateLimiter::ready`]
//! before the message is parsed, [`RateLimiter::charge`] once its cost is known.

use std::time::Instant;

/// Refused requests may run ahead of the refill rate by this many times
/// max(burst, rate per second) before the bot is closed: a bot slightly over its limit keeps getting `rate_limited` answers, one that
/// ignores them and floods is cut off.
const FLOOD_BURSTS: f64 = 10.0;

/// What to do with one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Answer `rate_limited`, do not process.
    Limited,
    /// Close the connection: it floods.
    Flood,
}

#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    tokens: f64,
    /// Refused requests not yet paid back by the refill rate.
    debt: f64,
    flood_at: f64,
    last: Instant,
}

impl RateLimiter {
    /// `rate` requests per second sustained, `burst` at once (the bucket starts full).
    pub fn new(rate: f64, burst: u32, now: Instant) -> RateLimiter {
        let burst = f64::from(burst.max(1));
        let rate = if rate.is_finite() && rate > 0.0 {
            rate
        } else {
            f64::MIN_POSITIVE
        };
        RateLimiter {
            rate,
            burst,
            tokens: burst,
            debt: 0.0,
            flood_at: FLOOD_BURSTS * burst.max(rate),
            last: now,
        }
    }

    /// A request of cost one (both steps at once).
    #[cfg(test)]
    pub fn check(&mut self, now: Instant) -> Verdict {
        match self.ready(now) {
            None => self.charge(1),
            Some(refused) => refused,
        }
    }

    /// Refills, then `None` when at least one token is left (parse the request, then
    /// [`charge`](Self::charge) its cost); otherwise the refusal, without parsing.
    pub fn ready(&mut self, now: Instant) -> Option<Verdict> {
        let refill = now.saturating_duration_since(self.last).as_secs_f64() * self.rate;
        self.last = now;
        self.tokens = (self.tokens + refill).min(self.burst);
        self.debt = (self.debt - refill).max(0.0);
        if self.tokens >= 1.0 {
            None
        } else {
            Some(self.refuse())
        }
    }

    /// Takes `cost` tokens (at least 1), or none at all when fewer are left: the request
    /// is then refused whole.
    pub fn charge(&mut self, cost: usize) -> Verdict {
        let cost = cost.max(1) as f64;
        if self.tokens >= cost {
            self.tokens -= cost;
            return Verdict::Allow;
        }
        self.refuse()
    }

    /// A refused request adds one to the debt whatever its cost: flooding is about how
    /// many requests keep coming, and a refused one started no work.
    fn refuse(&mut self) -> Verdict {
        self.debt += 1.0;
        if self.debt > self.flood_at {
            Verdict::Flood
        } else {
            Verdict::Limited
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_limited_then_refilled_then_flood() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(10.0, 3, t0);
        let got: Vec<Verdict> = (0..5).map(|_| r.check(t0)).collect();
        use Verdict::*;
        assert_eq!(got, [Allow, Allow, Allow, Limited, Limited]);
        // 100 ms later one token is back.
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(r.check(t1), Allow);
        assert_eq!(r.check(t1), Limited);
        // Flood: refused requests pile up past 10 bursts (here 10 × max(3, 10) = 100).
        let mut last = Limited;
        for _ in 0..200 {
            last = r.check(t1);
            if last == Flood {
                break;
            }
        }
        assert_eq!(last, Flood);
    }

    #[test]
    fn a_request_costs_its_channels_and_is_refused_whole() {
        use Verdict::*;
        let t0 = Instant::now();
        let mut r = RateLimiter::new(0.001, 4, t0);
        assert_eq!(r.ready(t0), None);
        // Five channels with four tokens: refused, and nothing taken.
        assert_eq!(r.charge(5), Limited);
        assert_eq!(r.ready(t0), None);
        assert_eq!(r.charge(3), Allow);
        assert_eq!(r.ready(t0), None);
        assert_eq!(r.charge(0), Allow, "a request costs at least one");
        assert_eq!(r.ready(t0), Some(Limited));
        assert_eq!(r.check(t0), Limited);
    }
}
