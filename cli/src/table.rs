//! kubectl-style plain tables (upper-case headers, columns padded with three spaces, no
//! borders), ages and sizes. Written here rather than taken from a table crate because
//! kubectl's look is just padding, and the table crates draw borders by default.

use std::fmt::Write as _;

/// Renders rows under `headers`, every column padded to its widest cell.
pub fn render(headers: &[&str], rows: &[Vec<String>]) -> String {
    let width = |i: usize| {
        rows.iter().map(|r| r.get(i).map_or(0, |c| c.chars().count())).max().unwrap_or(0).max(headers[i].len())
    };
    let widths: Vec<usize> = (0..headers.len()).map(width).collect();
    let mut out = String::new();
    let header: Vec<String> = headers.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, w) in widths.iter().enumerate() {
            let cell = row.get(i).map(String::as_str).unwrap_or("");
            if i + 1 == widths.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}   ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// A cell for an absent value.
pub const NONE: &str = "-";

/// An age the way kubectl prints one (`45s`, `3m12s`, `25m`, `2h5m`, `3d`).
pub fn age(d: jiff::SignedDuration) -> String {
    let secs = d.as_secs().max(0);
    let (m, h, days) = (secs / 60, secs / 3600, secs / 86400);
    match secs {
        s if s < 120 => format!("{s}s"),
        _ if m < 10 => format!("{m}m{}s", secs % 60),
        _ if h < 3 => format!("{m}m"),
        _ if h < 8 => format!("{h}h{}m", m % 60),
        _ if h < 48 => format!("{h}h"),
        _ if days < 8 => format!("{days}d{}h", h % 24),
        _ => format!("{days}d"),
    }
}

/// Age of `t` at `now`.
pub fn age_at(t: jiff::Timestamp, now: jiff::Timestamp) -> String {
    age(now.duration_since(t))
}

/// Bytes in binary units (`512 B`, `1.5 GiB`).
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// A message cut to `max` characters for a table cell (`…` marks the cut).
pub fn short(s: &str, max: usize) -> String {
    let one_line = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() <= max {
        one_line
    } else {
        let mut cut: String = one_line.chars().take(max.saturating_sub(1)).collect();
        cut.push('…');
        cut
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_padded_and_lines_trimmed() {
        let rows = vec![vec!["db-01".into(), "Protected".into(), "".into()], vec!["a".into(), "-".into(), "x".into()]];
        assert_eq!(
            render(&["NAME", "PHASE", "MESSAGE"], &rows),
            "NAME    PHASE       MESSAGE\ndb-01   Protected\na       -           x\n"
        );
    }

    #[test]
    fn ages_read_like_kubectl() {
        let s = jiff::SignedDuration::from_secs;
        let cases = [(0, "0s"), (119, "119s"), (192, "3m12s"), (1500, "25m"), (7500, "125m"), (11_100, "3h5m")];
        for (secs, want) in cases {
            assert_eq!(age(s(secs)), want);
        }
        assert_eq!(age(s(30 * 3600)), "30h");
        assert_eq!(age(s(3 * 86400 + 7200)), "3d2h");
        assert_eq!(age(s(20 * 86400)), "20d");
        assert_eq!(age(s(-5)), "0s", "clock skew shows as now");
    }

    #[test]
    fn sizes_use_binary_units() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(4 << 30), "4.0 GiB");
    }

    #[test]
    fn long_messages_are_cut_on_one_line() {
        assert_eq!(short("a\n  b", 10), "a b");
        assert_eq!(short("abcdefghij", 5), "abcd…");
    }
}
