//! A summary of an operator log for a benchmark report: how many warnings and errors,
//! and the most frequent messages, so a run that misbehaved says how.

use std::collections::BTreeMap;

/// Counts the warnings and errors in `log` (the operator's `text` format, with or
/// without ANSI colours) and lists the `top` most frequent messages, with span fields
/// dropped and digits folded to `#` so one message about many servers counts once.
pub fn summary(log: &str, top: usize) -> String {
    let mut by_message: BTreeMap<String, usize> = BTreeMap::new();
    let (mut lines, mut warnings, mut errors) = (0, 0, 0);
    for raw in log.lines() {
        lines += 1;
        let line = strip_ansi(raw);
        let mut words = line.split_whitespace();
        let _timestamp = words.next();
        let level = match words.next() {
            Some("WARN") => {
                warnings += 1;
                "WARN"
            }
            Some("ERROR") => {
                errors += 1;
                "ERROR"
            }
            _ => continue,
        };
        let rest = line.split_once(level).map(|(_, r)| r.trim()).unwrap_or_default();
        let message = rest.rsplit_once("}: ").map(|(_, m)| m).unwrap_or(rest);
        let folded: String = message.chars().map(|c| if c.is_ascii_digit() { '#' } else { c }).take(240).collect();
        *by_message.entry(format!("{level} {folded}")).or_default() += 1;
    }
    let mut common: Vec<_> = by_message.into_iter().collect();
    common.sort_by_key(|(_, count)| std::cmp::Reverse(*count));
    let mut out = format!("operator log: {lines} lines, {warnings} warnings, {errors} errors");
    for (message, count) in common.iter().take(top) {
        out.push_str(&format!("\n  {count:>6} × {message}"));
    }
    out
}

/// `line` without ANSI colour sequences (`ESC [ … m`), which `tracing`'s text format
/// writes even to a file.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_coloured_warnings_by_message() {
        let log = "\
\u{1b}[2m2026-11-27T20:39:07.900760Z\u{1b}[0m \u{1b}[33m WARN\u{1b}[0m \u{1b}[2msiterecovery_operator::registration::reconcile\u{1b}[0m\u{1b}[2m:\u{1b}[0m material not reconciled error=409 AlreadyExists
2026-11-27T20:39:08.249189Z  WARN siterecovery_operator::registration::reconcile: material not reconciled error=409 AlreadyExists
2026-11-27T20:39:09.000000Z  INFO reconcile{server=srv-0001}: siterecovery_operator::server: phase changed phase=Protected
2026-11-27T20:39:10.000000Z ERROR reconcile{server=srv-0002 namespace=\"a\"}: siterecovery_operator::server: status write failed for srv-0002
";
        let text = summary(log, 5);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "operator log: 4 lines, 2 warnings, 1 errors");
        assert_eq!(
            lines[1],
            "       2 × WARN siterecovery_operator::registration::reconcile: material not reconciled error=### AlreadyExists"
        );
        assert_eq!(lines[2], "       1 × ERROR siterecovery_operator::server: status write failed for srv-####");
        assert_eq!(lines.len(), 3);
    }
}
