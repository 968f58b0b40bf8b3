//! A fixed-size log-linear latency histogram (microseconds): exact below 1 024 µs, then
//! 64 sub-buckets per power of two (≤ 1.6 % error). Recording is one index computation
//! and an add, so a measuring bot can record every frame at a million frames a second
//! without keeping the samples.

use serde::Serialize;

const LINEAR: u64 = 1_024;
const SUB_BITS: u32 = 6;
const SUB: usize = 1 << SUB_BITS;
/// Powers of two above `LINEAR` covered: up to 2^42 µs, far beyond any run.
const OCTAVES: usize = 32;

/// Counts of latencies, mergeable across bots.
#[derive(Clone)]
pub struct Histogram {
    buckets: Vec<u64>,
    count: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: vec![0; LINEAR as usize + OCTAVES * SUB],
            count: 0,
            max: 0,
        }
    }
}

/// Percentiles of a histogram, in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Quantiles {
    pub n: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

fn index(v: u64) -> usize {
    if v < LINEAR {
        return v as usize;
    }
    let log = 63 - v.leading_zeros(); // ≥ 10
    let octave = (log - 10) as usize;
    let sub = ((v >> (log - SUB_BITS)) as usize) & (SUB - 1);
    (LINEAR as usize + octave * SUB + sub).min(LINEAR as usize + OCTAVES * SUB - 1)
}

/// The lower bound of bucket `i` (what a percentile reports).
fn value(i: usize) -> u64 {
    if i < LINEAR as usize {
        return i as u64;
    }
    let octave = ((i - LINEAR as usize) / SUB) as u32;
    let sub = ((i - LINEAR as usize) % SUB) as u64;
    let log = octave + 10;
    (1u64 << log) + (sub << (log - SUB_BITS))
}

impl Histogram {
    pub fn record(&mut self, us: u64) {
        if let Some(b) = self.buckets.get_mut(index(us)) {
            *b += 1;
        }
        self.count += 1;
        self.max = self.max.max(us);
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a += b;
        }
        self.count += other.count;
        self.max = self.max.max(other.max);
    }

    fn percentile(&self, p: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((self.count as f64 * p).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return value(i).min(self.max);
            }
        }
        self.max
    }

    pub fn quantiles(&self) -> Quantiles {
        Quantiles {
            n: self.count,
            p50_us: self.percentile(0.50),
            p99_us: self.percentile(0.99),
            p999_us: self.percentile(0.999),
            max_us: self.max,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_round_trip_within_two_percent() {
        for v in [
            0,
            1,
            999,
            1_023,
            1_024,
            1_500,
            65_537,
            10_000_000,
            123_456_789,
        ] {
            let lo = value(index(v));
            assert!(lo <= v, "{v}: {lo}");
            assert!(v - lo <= v / 50 + 1, "{v}: {lo}");
        }
    }

    #[test]
    fn percentiles_of_a_uniform_run() {
        let mut h = Histogram::default();
        for v in 1..=1_000 {
            h.record(v);
        }
        let q = h.quantiles();
        assert_eq!(
            (q.n, q.p50_us, q.p99_us, q.max_us),
            (1_000, 500, 990, 1_000)
        );
        let mut other = Histogram::default();
        other.record(5_000);
        h.merge(&other);
        assert_eq!(h.quantiles().max_us, 5_000);
    }
}
