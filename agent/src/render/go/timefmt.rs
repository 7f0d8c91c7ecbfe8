//! Go's `time.Time.Format` for `timestamp "layout"`, in UTC (the agent's clock has no zone):
//! the reference-time layout elements (`2006`, `01`, `Jan`, `15`, `04`, `05`, `.000`, `MST`,
//! `Z07:00`…) are replaced, everything else is kept as written.

/// Go's `time.RFC3339`, `timestamp`'s layout when none is given.
pub const RFC3339: &str = "2006-01-02T15:04:05Z07:00";

/// A moment in UTC, split as Go's formatter reads it.
pub struct Moment {
    unix: i64,
    year: i64,
    month: usize,
    day: i64,
    yday: i64,
    weekday: usize,
    hour: i64,
    min: i64,
    sec: i64,
    nanos: u32,
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const DAYS: [&str; 7] = [
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
];

impl Moment {
    pub fn from_unix(secs: i64, nanos: u32) -> Moment {
        let days = secs.div_euclid(86_400);
        let rest = secs.rem_euclid(86_400);
        // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
        const BEFORE: [i64; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
        let yday = BEFORE[month as usize - 1] + day + i64::from(leap && month > 2);
        Moment {
            unix: secs,
            year,
            month: month as usize,
            day,
            yday,
            weekday: (days + 4).rem_euclid(7) as usize,
            hour: rest / 3600,
            min: rest % 3600 / 60,
            sec: rest % 60,
            nanos,
        }
    }

    pub fn unix(&self) -> i64 {
        self.unix
    }

    pub fn now() -> Moment {
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Moment::from_unix(since.as_secs() as i64, since.subsec_nanos())
    }
}

/// The layout elements, longest first where one is a prefix of another.
const ELEMENTS: &[&str] = &[
    "January",
    "Monday",
    "2006",
    "Z07:00:00",
    "-07:00:00",
    "Z070000",
    "-070000",
    "Z07:00",
    "-07:00",
    "Z0700",
    "-0700",
    "Jan",
    "Mon",
    "MST",
    "002",
    "__2",
    "_2",
    "01",
    "02",
    "03",
    "04",
    "05",
    "06",
    "15",
    "Z07",
    "-07",
    "PM",
    "pm",
    "1",
    "2",
    "3",
    "4",
    "5",
];

pub fn format(t: &Moment, layout: &str) -> String {
    let mut out = String::new();
    let mut rest = layout;
    'outer: while !rest.is_empty() {
        if let Some(frac) = fraction(rest) {
            let digits = frac.len() - 1;
            let all = format!("{:09}", t.nanos);
            let mut shown = all[..digits].to_string();
            let separator = frac.chars().next().unwrap_or('.');
            if frac.as_bytes()[1] == b'9' {
                shown = shown.trim_end_matches('0').to_string();
                if !shown.is_empty() {
                    out.push(separator);
                }
            } else {
                out.push(separator);
            }
            out.push_str(&shown);
            rest = &rest[frac.len()..];
            continue;
        }
        for el in ELEMENTS {
            if let Some(after) = rest.strip_prefix(el) {
                // Go takes "Jan"/"Mon" only when no lower-case letter follows ("Janet" is text).
                let word_ok = !matches!(*el, "Jan" | "Mon")
                    || !after.starts_with(|c: char| c.is_ascii_lowercase());
                if word_ok {
                    out.push_str(&element(t, el));
                    rest = after;
                    continue 'outer;
                }
            }
        }
        let c = rest.chars().next().expect("rest is not empty");
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// `.000`, `,999`…: a fractional second right after a seconds element.
fn fraction(rest: &str) -> Option<&str> {
    let bytes = rest.as_bytes();
    if !matches!(bytes.first(), Some(b'.' | b',')) {
        return None;
    }
    let digit = *bytes.get(1)?;
    if digit != b'0' && digit != b'9' {
        return None;
    }
    let n = bytes[1..].iter().take_while(|&&b| b == digit).count();
    // Go requires a non-digit after the run.
    if bytes.get(1 + n).is_some_and(u8::is_ascii_digit) {
        return None;
    }
    Some(&rest[..(1 + n).min(10)])
}

fn element(t: &Moment, el: &str) -> String {
    let hour12 = match t.hour % 12 {
        0 => 12,
        h => h,
    };
    match el {
        "January" => MONTHS[t.month - 1].into(),
        "Jan" => MONTHS[t.month - 1][..3].into(),
        "Monday" => DAYS[t.weekday].into(),
        "Mon" => DAYS[t.weekday][..3].into(),
        "2006" => format!("{:04}", t.year),
        "06" => format!("{:02}", t.year.rem_euclid(100)),
        "01" => format!("{:02}", t.month),
        "1" => t.month.to_string(),
        "02" => format!("{:02}", t.day),
        "_2" => format!("{:>2}", t.day),
        "2" => t.day.to_string(),
        "002" => format!("{:03}", t.yday),
        "__2" => format!("{:>3}", t.yday),
        "15" => format!("{:02}", t.hour),
        "03" => format!("{hour12:02}"),
        "3" => hour12.to_string(),
        "04" => format!("{:02}", t.min),
        "4" => t.min.to_string(),
        "05" => format!("{:02}", t.sec),
        "5" => t.sec.to_string(),
        "PM" => if t.hour >= 12 { "PM" } else { "AM" }.into(),
        "pm" => if t.hour >= 12 { "pm" } else { "am" }.into(),
        "MST" => "UTC".into(),
        z if z.starts_with('Z') => "Z".into(),
        "-07" => "+00".into(),
        "-0700" => "+0000".into(),
        "-07:00" => "+00:00".into(),
        "-070000" => "+000000".into(),
        _ => "+00:00:00".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_layouts() {
        // 2026-11-23T18:10:05.120Z, a Monday, day 327.
        let t = Moment::from_unix(1_795_457_405, 120_000_000);
        for (layout, want) in [
            ("2006-01-02T15:04:05Z07:00", "2026-11-23T18:10:05Z"),
            (
                "Mon Jan _2 15:04:05 MST 2006",
                "Mon Nov 23 18:10:05 UTC 2026",
            ),
            (
                "Monday, January 2, 06 3:4:5 PM",
                "Monday, November 23, 26 6:10:5 PM",
            ),
            (
                "05.000 05.999 05,00 002 -0700",
                "05.120 05.12 05,12 327 +0000",
            ),
            ("Janet 2006", "Janet 2026"),
        ] {
            assert_eq!(format(&t, layout), want, "{layout}");
        }
        assert_eq!(
            format(&Moment::from_unix(951_782_400, 0), "2006-01-02 002 .999x"),
            "2000-02-29 060 x"
        );
    }
}
