//! Text helpers of the live view: clipping to the terminal's width (escape sequences take no
//! column), short ids, sizes, durations, loose JSON scalars, and ANSI styles.

use std::time::Duration;

use serde_json::Value;

/// `line` cut to `cols` visible characters; ANSI escape sequences are kept and take no column.
pub(super) fn clip(line: &str, cols: usize) -> String {
    let mut out = String::with_capacity(line.len());
    let (mut shown, mut chars, mut cut) = (0, line.chars(), false);
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            out.push(c);
            for c in chars.by_ref() {
                out.push(c);
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else if shown < cols {
            out.push(c);
            shown += 1;
        } else {
            cut = true;
        }
    }
    if cut && line.contains('\x1b') {
        out.push_str("\x1b[0m");
    }
    out
}

/// A peer id or CID as its first 4 and last 6 characters: `12D3..x7Yq9z`.
pub(super) fn short(id: &str) -> String {
    if id.len() <= 14 || !id.is_ascii() {
        return id.to_owned();
    }
    format!("{}..{}", &id[..4], &id[id.len() - 6..])
}

/// A JSON scalar as text; `-` when absent.
pub(super) fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub(super) fn opt_bytes(v: &Value) -> String {
    v.as_u64().map_or("-".into(), bytes)
}

pub(super) fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let (mut value, mut unit) = (n as f64 / 1024.0, 0);
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// `850ms`, `42s`, `3m05s`, `2h07m`.
pub(super) fn duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => format!("{}ms", d.as_millis()),
        1..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

/// ANSI styles, or none.
#[derive(Debug, Clone, Copy)]
pub(super) struct Paint(pub(super) bool);

impl Paint {
    fn wrap(self, code: &str, s: &str) -> String {
        if self.0 && !s.is_empty() {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_owned()
        }
    }
    pub(super) fn bold(self, s: &str) -> String {
        self.wrap("1", s)
    }
    pub(super) fn dim(self, s: &str) -> String {
        self.wrap("2", s)
    }
    pub(super) fn red(self, s: &str) -> String {
        self.wrap("31", s)
    }
    pub(super) fn green(self, s: &str) -> String {
        self.wrap("32", s)
    }
    pub(super) fn yellow(self, s: &str) -> String {
        self.wrap("33", s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_read_naturally() {
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 << 30), "3.0 GiB");
        assert_eq!(duration(Duration::from_millis(850)), "850ms");
        assert_eq!(duration(Duration::from_secs(185)), "3m05s");
        assert_eq!(duration(Duration::from_secs(7620)), "2h07m");
        assert_eq!(short("12D3KooWAbCdEfGhIjKlMnOpQrStUvWxYz"), "12D3..UvWxYz");
        assert_eq!(short("peer1"), "peer1");
    }
}
