//! Exchange time stamps in text form → microseconds since the Unix epoch.
//!
//! Owns RFC 3339 parsing (`2023-02-09T20:32:50.714964855Z`, any number of fraction digits,
//! `Z` or a numeric offset): fractions beyond microseconds are truncated, never rounded, so
//! an event is never stamped later than it happened. It knows nothing about any venue.

/// Microseconds since the epoch of an RFC 3339 time stamp, or None when it is not one.
pub fn rfc3339_micros(text: &str) -> Option<u64> {
    let b = text.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num = |from: usize, to: usize| -> Option<i64> {
        let digits = b.get(from..to)?;
        if !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        Some(
            digits
                .iter()
                .fold(0i64, |n, d| n * 10 + i64::from(d - b'0')),
        )
    };
    let (year, month, day) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    let (hour, minute, second) = (num(11, 13)?, num(14, 16)?, num(17, 19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    // 60 is a leap second: counted as the next second's start would be, like most parsers.
    if second > 60 {
        return None;
    }
    let mut i = 19;
    let mut micros = 0i64;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            if i - start < 6 {
                micros = micros * 10 + i64::from(b[i] - b'0');
            }
            i += 1;
        }
        let kept = (i - start).min(6);
        if i == start {
            return None;
        }
        micros *= 10i64.pow(6 - kept as u32);
    }
    let offset_secs = match b.get(i..)? {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let hm = [*h1, *h2, *m1, *m2];
            if !hm.iter().all(u8::is_ascii_digit) {
                return None;
            }
            let h = i64::from(hm[0] - b'0') * 10 + i64::from(hm[1] - b'0');
            let m = i64::from(hm[2] - b'0') * 10 + i64::from(hm[3] - b'0');
            let s = (h * 60 + m) * 60;
            if *sign == b'+' {
                s
            } else {
                -s
            }
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset_secs;
    let total = secs.checked_mul(1_000_000)?.checked_add(micros)?;
    u64::try_from(total).ok()
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nanoseconds_are_truncated_to_microseconds() {
        assert_eq!(
            rfc3339_micros("2023-02-09T20:32:50.714964855Z"),
            Some(1_675_974_770_714_964)
        );
        // .9999999 would round up to the next second: truncated instead.
        assert_eq!(
            rfc3339_micros("1970-01-01T00:00:00.9999999Z"),
            Some(999_999)
        );
        assert_eq!(
            rfc3339_micros("2019-08-14T20:42:27.265Z"),
            Some(1_565_815_347_265_000)
        );
        assert_eq!(rfc3339_micros("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(rfc3339_micros("1970-01-01T01:00:00+01:00"), Some(0));
        assert_eq!(
            rfc3339_micros("2024-02-29T00:00:00Z"),
            Some(1_709_164_800_000_000)
        );
    }

    #[test]
    fn not_rfc3339_is_none() {
        for bad in [
            "",
            "2023-02-09",
            "2023-13-09T20:32:50Z",
            "2023-02-09T20:32:50",
            "2023-02-09T20:32:50.Z",
            "1969-12-31T23:59:59Z",
            "2023-02-09T20:32:50.1Zjunk",
            "2023-06-23 20:31:56.121961769 +0000 UTC m=+91717.525857105",
        ] {
            assert_eq!(rfc3339_micros(bad), None, "{bad}");
        }
    }
}
