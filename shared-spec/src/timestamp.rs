//! Event times: RFC 3339 text with any UTC offset, or epoch milliseconds.

/// Parses RFC 3339 (`2026-11-20T13:45:12.123+05:30`, `...Z`) into epoch milliseconds (UTC).
/// Fractional digits beyond milliseconds are truncated toward the past. Returns `None` for
/// anything else, including a missing offset or an impossible date.
pub fn parse_rfc3339_ms(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 {
        return None;
    }
    let year = digits(b, 0, 4)? as i64;
    let month = digits(b, 5, 2)?;
    let day = digits(b, 8, 2)?;
    let hour = digits(b, 11, 2)?;
    let minute = digits(b, 14, 2)?;
    let second = digits(b, 17, 2)?;
    if b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    if !(1..=12).contains(&month)
        || day < 1
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 59
    {
        return None;
    }
    let mut i = 19;
    let mut millis = 0i64;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            if i - start < 3 {
                millis = millis * 10 + (b[i] - b'0') as i64;
            }
            i += 1;
        }
        let n = i - start;
        if n == 0 {
            return None;
        }
        for _ in n..3 {
            millis *= 10;
        }
    }
    let offset_min: i64 = match b.get(i)? {
        b'Z' | b'z' if i + 1 == b.len() => 0,
        sign @ (b'+' | b'-') if i + 6 == b.len() && b[i + 3] == b':' => {
            let oh = digits(b, i + 1, 2)? as i64;
            let om = digits(b, i + 4, 2)? as i64;
            if oh > 23 || om > 59 {
                return None;
            }
            let m = oh * 60 + om;
            if *sign == b'-' { -m } else { m }
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    let secs =
        days * 86_400 + hour as i64 * 3600 + minute as i64 * 60 + second as i64 - offset_min * 60;
    Some(secs * 1000 + millis)
}

fn digits(b: &[u8], at: usize, n: usize) -> Option<u32> {
    let mut v = 0u32;
    for &c in b.get(at..at + n)? {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v * 10 + (c - b'0') as u32;
    }
    Some(v)
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if is_leap(y) => 29,
        _ => 28,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = m as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil date (year, month, day) of a day number since 1970-01-01.
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Formats epoch milliseconds as RFC 3339 UTC with milliseconds: `2026-11-20T08:15:12.123Z`.
pub fn format_ms(ms: i64) -> String {
    let days = ms.div_euclid(86_400_000);
    let rem = ms.rem_euclid(86_400_000);
    let (y, m, d) = civil_from_days(days);
    let (h, mi, s, milli) = (
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1000 % 60,
        rem % 1000,
    );
    format!("{y:04}-{m:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{milli:03}Z")
}

/// Parses a point in time given on a command line or in a request: RFC 3339, a bare date
/// (`2026-11-20`, meaning its UTC midnight), or epoch milliseconds written with 12 or 13
/// digits (1973 to 2286). Other runs of digits are refused: a date without dashes
/// (`20261120`) or epoch seconds would otherwise silently mean an instant in 1970.
pub fn parse_instant(s: &str) -> Option<i64> {
    let s = s.trim();
    if let Some(ms) = parse_rfc3339_ms(s) {
        return Some(ms);
    }
    let b = s.as_bytes();
    if b.len() == 10 && b[4] == b'-' && b[7] == b'-' {
        let (y, m, d) = (digits(b, 0, 4)? as i64, digits(b, 5, 2)?, digits(b, 8, 2)?);
        if (1..=12).contains(&m) && d >= 1 && d <= days_in_month(y, m) {
            return Some(days_from_civil(y, m, d) * 86_400_000);
        }
        return None;
    }
    if (12..=13).contains(&s.len()) && s.bytes().all(|c| c.is_ascii_digit()) {
        return s.parse().ok();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_offsets_and_fractions() {
        let z = parse_rfc3339_ms("2026-11-20T08:15:12.123Z").unwrap();
        assert_eq!(parse_rfc3339_ms("2026-11-20T13:45:12.123+05:30"), Some(z));
        assert_eq!(parse_rfc3339_ms("2026-11-20T03:15:12.123-05:00"), Some(z));
        assert_eq!(parse_rfc3339_ms("2026-11-20T08:15:12.1239999Z"), Some(z));
        assert_eq!(parse_rfc3339_ms("2026-11-20T08:15:12.12Z"), Some(z - 3));
        assert_eq!(parse_rfc3339_ms("2026-11-20T08:15:12Z"), Some(z - 123));
        assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339_ms("1969-12-31T23:59:59.999Z"), Some(-1));
        assert_eq!(format_ms(z), "2026-11-20T08:15:12.123Z");
        assert_eq!(format_ms(-1), "1969-12-31T23:59:59.999Z");
    }

    #[test]
    fn refuses_malformed() {
        for bad in [
            "2026-11-20T08:15:12",
            "2026-11-20T08:15:12.Z",
            "2026-02-30T08:15:12Z",
            "2026-11-20T24:00:00Z",
            "2026-11-20T08:15:12+0530",
            "2026-11-20T08:15:12Zjunk",
            "20261120T081512Z",
            "",
        ] {
            assert_eq!(parse_rfc3339_ms(bad), None, "{bad}");
        }
    }

    #[test]
    fn civil_round_trip() {
        for d in [-800_000, -1, 0, 1, 20_000, 2_000_000] {
            let (y, m, dd) = civil_from_days(d);
            assert_eq!(days_from_civil(y, m, dd), d);
        }
        assert_eq!(
            parse_instant("2026-11-20"),
            parse_rfc3339_ms("2026-11-20T00:00:00Z")
        );
    }

    #[test]
    fn epoch_milliseconds_only_where_they_cannot_be_taken_for_something_else() {
        let t = parse_rfc3339_ms("2026-11-20T00:00:00Z").unwrap();
        assert_eq!(parse_instant(&t.to_string()), Some(t));
        assert_eq!(parse_instant(" 100000000000 "), Some(100_000_000_000));
        assert_eq!(parse_instant("9999999999999"), Some(9_999_999_999_999));
        // A date without dashes, epoch seconds, too many digits: refused, not read as 1970.
        for text in [
            "20261120",
            "1795132800",
            "99999999999",
            "17951328000000",
            "0",
            "",
        ] {
            assert_eq!(parse_instant(text), None, "{text}");
        }
    }
}
