//! Per-connection request rate limit: a token bucket, plus a flood detector for bots that
//! keep sending far past the limit.
//!
//! Owned by one reader task (no locking). Every text or binary message costs one token,
//! whatever it asks for; WebSocket control frames (ping/pong) are not requests and cost
//! nothing (they are bounded by `message_timeout_ms` and tungstenite's frame limits).

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

    pub fn check(&mut self, now: Instant) -> Verdict {
        let refill = now.saturating_duration_since(self.last).as_secs_f64() * self.rate;
        self.last = now;
        self.tokens = (self.tokens + refill).min(self.burst);
        self.debt = (self.debt - refill).max(0.0);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Verdict::Allow;
        }
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
}
