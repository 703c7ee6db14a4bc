//! The live view of `peersync status --watch`: one frame of text made from the node's status JSON
//! and the sample the previous frame kept, which gives the rates and ETAs.
//!
//! Pure: no I/O, no clock (the caller passes `now`), no terminal; `main.rs` polls, draws each frame
//! over the last and restores the terminal. The status is read as loose JSON, so a field a node does
//! not report shows as `-` and never breaks the view. Text is ASCII, so a character is a column.

use std::time::{Duration, Instant};

use serde_json::Value;

mod text;

use text::{bytes, clip, duration, opt_bytes, short, text, Paint};

/// The terminal the frame must fit in.
#[derive(Debug, Clone, Copy)]
pub struct Size {
    pub cols: usize,
    pub rows: usize,
}

/// What one frame keeps for the next.
#[derive(Debug, Clone)]
pub struct Sample {
    /// When the status was read.
    at: Instant,
    /// That status, shown under the error while the node cannot be reached.
    status: Value,
    /// The snapshot pull (keyed by its CID) and the replay, while they run.
    snapshot: Option<Progress>,
    replay: Option<Progress>,
    /// The node's traffic counters (in, out) when it reports them, and their rates in bytes/s.
    bytes: Option<(u64, u64)>,
    byte_rates: Option<(f64, f64)>,
    /// Since when polls fail; `None` while they succeed.
    failing_since: Option<Instant>,
}

/// A task with a known end: a snapshot's bytes or a replay's ops.
#[derive(Debug, Clone)]
struct Progress {
    /// Which task: a snapshot's CID, or "replay".
    key: String,
    /// Counted from here: a replay's ops held when the view first saw it.
    base: u64,
    done: u64,
    total: u64,
    /// Units per second, smoothed over polls; `None` until two polls saw the task.
    rate: Option<f64>,
}

/// Weight of the newest poll in a smoothed rate.
const RATE_WEIGHT: f64 = 0.5;

/// Draws one frame. `poll` is the node's status, or why it could not be had; `color` adds ANSI
/// colors. Every line fits in `size.cols` and the frame in `size.rows`.
pub fn render(
    poll: Result<&Value, &str>,
    api: &str,
    prev: Option<&Sample>,
    now: Instant,
    size: Size,
    color: bool,
) -> (String, Sample) {
    let paint = Paint(color);
    let mut lines = vec![];
    let (status, sample) = match poll {
        Ok(status) => {
            let sample = sample(status, prev, now);
            (Some(status), sample)
        }
        Err(error) => {
            lines.push(paint.red(&format!("! {api}: {error}")));
            let since = prev.and_then(|p| p.failing_since).unwrap_or(now);
            let failing = format!("  retrying, failing for {}", duration(now.saturating_duration_since(since)));
            match prev.filter(|p| !p.status.is_null()) {
                Some(prev) => {
                    let ago = duration(now.saturating_duration_since(prev.at));
                    lines.push(format!("{failing}; below is the status of {ago} ago"));
                    (Some(&prev.status), Sample { failing_since: Some(since), ..prev.clone() })
                }
                None => {
                    lines.push(format!("{failing}; no status yet"));
                    let empty = Sample {
                        at: now,
                        status: Value::Null,
                        snapshot: None,
                        replay: None,
                        bytes: None,
                        byte_rates: None,
                        failing_since: Some(since),
                    };
                    return (frame(lines, size), empty);
                }
            }
        }
    };
    if let Some(s) = status {
        body(&mut lines, s, &sample, size, paint);
    }
    (frame(lines, size), sample)
}

/// Reads the counters of `status` and derives rates from `prev`.
fn sample(status: &Value, prev: Option<&Sample>, now: Instant) -> Sample {
    let sync = &status["sync"];
    let snapshot = sync["snapshot"].as_object().map(|s| {
        let key = s.get("cid").and_then(Value::as_str).unwrap_or("").to_owned();
        let field = |name: &str| s.get(name).and_then(Value::as_u64).unwrap_or(0);
        (key, 0, field("bytes_have"), field("bytes_total"))
    });
    let held: u64 =
        status["version_vector"].as_object().map(|v| v.values().filter_map(Value::as_u64).sum()).unwrap_or(0);
    let lag = lag_total(sync);
    let replaying = snapshot.is_none() && lag > 0 && (sync["phase"] == "catching_up" || pulls(sync) > 0);
    let replay = replaying.then(|| {
        let base = prev.and_then(|p| p.replay.as_ref()).map_or(held, |r| r.base.min(held));
        ("replay".to_owned(), base, held - base, held + lag - base)
    });
    let dt = prev.map(|p| now.saturating_duration_since(p.at).as_secs_f64()).filter(|dt| *dt > 0.0);
    let progress = |task: Option<(String, u64, u64, u64)>, last: Option<&Progress>| {
        task.map(|(key, base, done, total)| {
            let last = last.filter(|l| l.key == key && l.base == base);
            let rate = match (last, dt) {
                (Some(l), Some(dt)) => Some(smooth(l.rate, done.saturating_sub(l.done) as f64 / dt)),
                _ => None,
            };
            Progress { key, base, done, total, rate }
        })
    };
    let bytes = sync["bytes_in"].as_u64().zip(sync["bytes_out"].as_u64());
    let byte_rates = match (bytes, prev.and_then(|p| p.bytes.map(|b| (b, p.byte_rates))), dt) {
        (Some((now_in, now_out)), Some(((was_in, was_out), rates)), Some(dt)) => Some((
            smooth(rates.map(|r| r.0), now_in.saturating_sub(was_in) as f64 / dt),
            smooth(rates.map(|r| r.1), now_out.saturating_sub(was_out) as f64 / dt),
        )),
        _ => None,
    };
    Sample {
        at: now,
        status: status.clone(),
        snapshot: progress(snapshot, prev.and_then(|p| p.snapshot.as_ref())),
        replay: progress(replay, prev.and_then(|p| p.replay.as_ref())),
        bytes,
        byte_rates,
        failing_since: None,
    }
}

fn smooth(last: Option<f64>, new: f64) -> f64 {
    last.map_or(new, |l| RATE_WEIGHT * new + (1.0 - RATE_WEIGHT) * l)
}

fn lag_total(sync: &Value) -> u64 {
    sync["lag_ops"].as_object().map(|l| l.values().filter_map(Value::as_u64).sum()).unwrap_or(0)
}

fn pulls(sync: &Value) -> usize {
    sync["pulls"].as_object().map_or(0, |p| p.len())
}

/// The lines of a status: node, phase, progress, traffic, leases, peers.
fn body(lines: &mut Vec<String>, s: &Value, sample: &Sample, size: Size, paint: Paint) {
    let sync = &s["sync"];
    let state = text(&s["state"]);
    let state = if state == "active" { paint.green(&state) } else { paint.yellow(&state) };
    lines.push(format!(
        "{} {}  {}  cluster {}",
        paint.bold("peersync"),
        short(&text(&s["peer_id"])),
        text(&s["role"]),
        text(&s["cluster"])
    ));
    let held: u64 = s["version_vector"].as_object().map(|v| v.values().filter_map(Value::as_u64).sum()).unwrap_or(0);
    lines.push(format!(
        "state {state}  phase {}  ops held {held}  log {}  lag {} ops  pulls {}  buffered {}  gaps {}",
        text(&sync["phase"]),
        text(&s["log_ops"]),
        lag_total(sync),
        pulls(sync),
        text(&sync["buffered_ops"]),
        sync["gaps"].as_array().map_or("-".into(), |g| g.len().to_string()),
    ));
    if let Some(p) = &sample.snapshot {
        let snap = &sync["snapshot"];
        lines.push(format!(
            "snapshot {}  chunks {}/{}  sources {}",
            short(&p.key),
            text(&snap["chunks_have"]),
            text(&snap["chunks_total"]),
            text(&snap["sources"])
        ));
        lines.push(bar(p, size.cols, paint, bytes));
    }
    if let Some(p) = &sample.replay {
        lines.push("replay".into());
        lines.push(bar(p, size.cols, paint, |n| format!("{n} ops")));
    }
    let (rate_in, rate_out) = match sample.byte_rates {
        Some((i, o)) => (format!(" ({}/s)", bytes(i as u64)), format!(" ({}/s)", bytes(o as u64))),
        None => (String::new(), String::new()),
    };
    lines.push(format!(
        "net in {}{rate_in}  out {}{rate_out}  gossip unsent {} ignored {}  gap overflows {}  rejected {}",
        opt_bytes(&sync["bytes_in"]),
        opt_bytes(&sync["bytes_out"]),
        text(&sync["gossip_unsent"]),
        text(&sync["gossip_ignored"]),
        text(&sync["gap_overflows"]),
        text(&sync["rejected_messages"]),
    ));
    if let Some(l) = sync["leases"].as_object() {
        let voters: Vec<String> =
            l.get("voters").and_then(Value::as_array).map_or(vec![], |v| v.iter().map(|p| short(&text(p))).collect());
        let field = |name: &str| l.get(name).map_or("-".into(), text);
        lines.push(format!(
            "leases {}  term {}  leader {}  voters {} [{}]  held {}  waiting {}",
            field("role"),
            field("term"),
            l.get("leader").filter(|v| !v.is_null()).map_or("none".into(), |v| short(&text(v))),
            voters.len(),
            voters.join(" "),
            field("leases"),
            field("waiting"),
        ));
    }
    peers(lines, s, size, paint);
}

/// The peer table, cut to the rows left (with a line saying how many it left out).
fn peers(lines: &mut Vec<String>, s: &Value, size: Size, paint: Paint) {
    let empty = vec![];
    let peers = s["peers"].as_array().unwrap_or(&empty);
    lines.push(String::new());
    lines.push(
        paint.bold(&format!("{:<16} {:<9} {:<8} {:>8} {:>9}  lag behind it", "peer", "role", "link", "rtt", "digest")),
    );
    let have = s["version_vector"].as_object();
    let room = size.rows.saturating_sub(lines.len());
    for (i, p) in peers.iter().enumerate() {
        if i + 1 == room && peers.len() > room {
            lines.push(format!("... and {} more peers", peers.len() - i));
            break;
        }
        let lag: Vec<(String, u64)> = p["version_vector"]
            .as_object()
            .map(|vv| {
                vv.iter()
                    .map(|(origin, seq)| {
                        let mine = have.and_then(|h| h.get(origin)).and_then(Value::as_u64).unwrap_or(0);
                        (short(origin), seq.as_u64().unwrap_or(0).saturating_sub(mine))
                    })
                    .filter(|(_, behind)| *behind > 0)
                    .collect()
            })
            .unwrap_or_default();
        let lag = match (&p["version_vector"], lag.is_empty()) {
            (Value::Null, _) => "-".to_owned(),
            (_, true) => "0".to_owned(),
            (_, false) => {
                let sum: u64 = lag.iter().map(|l| l.1).sum();
                let each: Vec<String> = lag.iter().map(|(o, n)| format!("{o} {n}")).collect();
                format!("{sum} ops: {}", each.join(", "))
            }
        };
        let link = if p["connected"] == true { paint.green("up      ") } else { "down    ".into() };
        let rtt = p["rtt_ms"].as_f64().map_or("-".into(), |ms| format!("{ms:.1}ms"));
        let digest = p["digest_age_ms"].as_u64().map_or("-".into(), |ms| duration(Duration::from_millis(ms)) + " ago");
        lines.push(format!(
            "{:<16} {:<9} {link} {rtt:>8} {digest:>9}  {lag}",
            short(&text(&p["peer_id"])),
            text(&p["role"]),
        ));
    }
    if peers.is_empty() {
        lines.push("(no peers known)".into());
    }
}

/// `  [#####.....]  42.0%  1.2 MiB / 2.0 MiB  350.0 KiB/s  ETA 3s`, the bar as wide as the line allows.
fn bar(p: &Progress, cols: usize, paint: Paint, unit: fn(u64) -> String) -> String {
    let fraction = if p.total == 0 { 0.0 } else { (p.done as f64 / p.total as f64).min(1.0) };
    let (rate, eta) = match p.rate {
        Some(r) if r > 0.0 => {
            let left = p.total.saturating_sub(p.done) as f64 / r;
            (format!("{}/s", unit(r as u64)), format!("ETA {}", duration(Duration::from_secs_f64(left.min(1e7)))))
        }
        Some(_) => ("stalled".into(), "ETA -".into()),
        None => ("rate -".into(), "ETA -".into()),
    };
    let tail = format!("{:5.1}%  {} / {}  {rate}  {eta}", fraction * 100.0, unit(p.done), unit(p.total));
    let width = cols.saturating_sub(tail.len() + 6).clamp(10, 60);
    let filled = ((fraction * width as f64) as usize).min(width);
    format!("  [{}{}]  {tail}", paint.green(&"#".repeat(filled)), paint.dim(&".".repeat(width - filled)))
}

/// The lines cut to the terminal: each to `cols` columns (escape sequences take none), at most
/// `rows` of them.
fn frame(lines: Vec<String>, size: Size) -> String {
    let mut out = String::new();
    for line in lines.iter().take(size.rows.max(1)) {
        out.push_str(&clip(line, size.cols));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const WIDE: Size = Size { cols: 100, rows: 40 };
    const KIB: u64 = 1024;

    fn pulling(have: u64, total: u64) -> Value {
        json!({
            "peer_id": "12D3KooWAbCdEfGhIjKlMnOpQrStUvWxYz", "role": "replica", "state": "syncing",
            "cluster": "default", "version_vector": {}, "log_ops": 0,
            "peers": [{"peer_id": "12D3KooWPrimaryPeer000000000001", "connected": true, "role": "primary",
                       "rtt_ms": 0.42, "digest_age_ms": 1500, "version_vector": {"12D3KooWPrimaryPeer000000000001": 2000}}],
            "sync": {"phase": "catching_up", "lag_ops": {"12D3KooWPrimaryPeer000000000001": 2000}, "pulls": {},
                     "gaps": [], "buffered_ops": 0, "rejected_messages": 0, "bytes_in": have, "bytes_out": 300,
                     "gossip_unsent": 0, "gossip_ignored": 0, "gap_overflows": 0, "leases": null,
                     "snapshot": {"cid": "bafkr4iSNAPSHOTcid0000000000abcdef", "chunks_total": 256,
                                  "chunks_have": have / (4 * KIB), "bytes_total": total, "bytes_have": have,
                                  "sources": 1, "bytes_fetched": have}}
        })
    }

    fn replaying(held: u64, lag: u64) -> Value {
        json!({
            "state": "syncing", "version_vector": {"12D3KooWOriginA00000000000000001": held},
            "peers": [],
            "sync": {"phase": "catching_up", "lag_ops": {"12D3KooWOriginA00000000000000001": lag},
                     "pulls": {"12D3KooWOriginA00000000000000001": ["12D3KooWPeer", held]}, "snapshot": null}
        })
    }

    fn line<'a>(frame: &'a str, starts: &str) -> &'a str {
        frame
            .lines()
            .find(|l| l.trim_start().starts_with(starts))
            .unwrap_or_else(|| panic!("no {starts:?} line in\n{frame}"))
    }

    #[test]
    fn a_snapshot_pull_shows_a_bar_its_bytes_and_no_rate_until_a_second_poll() {
        let (frame, _) = render(Ok(&pulling(512 * KIB, 1024 * KIB)), "A", None, Instant::now(), WIDE, false);
        assert!(line(&frame, "snapshot").contains("bafk..abcdef  chunks 128/256  sources 1"), "{frame}");
        let bar = line(&frame, "[");
        let inside = &bar[bar.find('[').unwrap() + 1..bar.find(']').unwrap()];
        assert_eq!(inside.matches('#').count(), inside.len() / 2, "{bar}");
        assert!(bar.contains(" 50.0%  512.0 KiB / 1.0 MiB  rate -  ETA -"), "{bar}");
        assert!(line(&frame, "state").contains("state syncing  phase catching_up"), "{frame}");
        assert!(!frame.contains("replay"), "a replay bar during a snapshot pull:\n{frame}");
    }

    #[test]
    fn rate_and_eta_come_from_successive_polls_and_are_smoothed() {
        let t0 = Instant::now();
        let (_, s0) = render(Ok(&pulling(0, 1024 * KIB)), "A", None, t0, WIDE, false);
        let (frame, s1) =
            render(Ok(&pulling(256 * KIB, 1024 * KIB)), "A", Some(&s0), t0 + Duration::from_secs(1), WIDE, false);
        assert!(line(&frame, "[").contains("256.0 KiB/s  ETA 3s"), "{frame}");
        assert!(line(&frame, "net").contains("in 256.0 KiB (256.0 KiB/s)  out 300 B (0 B/s)"), "{frame}");
        // 128 KiB in the next second: the shown rate is halfway between, 192 KiB/s; 640 KiB left.
        let (frame, _) =
            render(Ok(&pulling(384 * KIB, 1024 * KIB)), "A", Some(&s1), t0 + Duration::from_secs(2), WIDE, false);
        assert!(line(&frame, "[").contains("192.0 KiB/s  ETA 3s"), "{frame}");
    }

    #[test]
    fn a_new_snapshot_starts_its_rate_afresh() {
        let t0 = Instant::now();
        let (_, s0) = render(Ok(&pulling(100 * KIB, 1024 * KIB)), "A", None, t0, WIDE, false);
        let mut other = pulling(200 * KIB, 1024 * KIB);
        other["sync"]["snapshot"]["cid"] = json!("bafkr4iANOTHERcid000000000fedcba");
        let (frame, _) = render(Ok(&other), "A", Some(&s0), t0 + Duration::from_secs(1), WIDE, false);
        assert!(line(&frame, "[").contains("rate -  ETA -"), "{frame}");
    }

    #[test]
    fn a_replay_counts_ops_from_the_first_poll_that_saw_it() {
        let t0 = Instant::now();
        let (frame, s0) = render(Ok(&replaying(100, 900)), "A", None, t0, WIDE, false);
        assert!(line(&frame, "[").contains("  0.0%  0 ops / 900 ops  rate -"), "{frame}");
        let (frame, s1) = render(Ok(&replaying(400, 600)), "A", Some(&s0), t0 + Duration::from_secs(1), WIDE, false);
        assert!(line(&frame, "[").contains(" 33.3%  300 ops / 900 ops  300 ops/s  ETA 2s"), "{frame}");
        // A stall: no ops in a second halves the smoothed rate, it does not divide by zero.
        let (frame, _) = render(Ok(&replaying(400, 600)), "A", Some(&s1), t0 + Duration::from_secs(2), WIDE, false);
        assert!(line(&frame, "[").contains("150 ops/s  ETA 4s"), "{frame}");
        let (frame, _) = render(Ok(&replaying(1000, 0)), "A", Some(&s1), t0 + Duration::from_secs(2), WIDE, false);
        assert!(!frame.contains('['), "no bar once caught up:\n{frame}");
    }

    #[test]
    fn peers_show_role_rtt_digest_age_and_what_this_node_lacks_per_origin() {
        let (frame, _) = render(Ok(&pulling(0, KIB)), "A", None, Instant::now(), WIDE, false);
        let peer = line(&frame, "12D3..000001");
        for part in ["primary", "up", "0.4ms", "1s ago", "2000 ops: 12D3..000001 2000"] {
            assert!(peer.contains(part), "{part:?} not in {peer:?}");
        }
    }

    #[test]
    fn every_line_fits_the_width_colored_or_not() {
        let mut status = pulling(512 * KIB, 1024 * KIB);
        status["sync"]["leases"] = json!({"role": "leader", "term": 7, "leader": "12D3KooWLeader0000000000001",
            "voters": ["12D3KooWLeader0000000000001", "12D3KooWVoter00000000000002"], "leases": 2, "waiting": 0});
        for cols in [20, 40, 79] {
            for color in [false, true] {
                let (frame, _) = render(Ok(&status), "A", None, Instant::now(), Size { cols, rows: 40 }, color);
                for l in frame.lines() {
                    let visible = strip(l);
                    assert!(visible.len() <= cols, "{} > {cols} columns: {visible:?}", visible.len());
                    if let Some(last) = l.rfind('\x1b') {
                        assert!(l[last..].starts_with("\x1b[0m"), "a line leaves a style on: {l:?}");
                    }
                }
                let leases = "leases leader  term 7  leader 12D3..000001";
                assert!(frame.contains(&leases[..cols.min(leases.len())]), "{frame}");
            }
        }
        assert_eq!(clip("\x1b[32m####\x1b[0m....", 6), "\x1b[32m####\x1b[0m..\x1b[0m");
        assert_eq!(clip("short", 10), "short");
    }

    fn strip(line: &str) -> String {
        let mut out = String::new();
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            if c == '\x1b' {
                chars.by_ref().find(char::is_ascii_alphabetic);
            } else {
                out.push(c);
            }
        }
        out
    }

    #[test]
    fn missing_fields_show_as_dashes() {
        let (frame, sample) = render(Ok(&json!({})), "A", None, Instant::now(), WIDE, false);
        assert!(line(&frame, "state").starts_with("state -  phase -  ops held 0  log -"), "{frame}");
        assert!(line(&frame, "net").starts_with("net in -  out -  gossip unsent -"), "{frame}");
        assert!(frame.contains("(no peers known)") && !frame.contains("leases") && !frame.contains('['), "{frame}");
        let peer = json!({"peers": [{"peer_id": "p"}]});
        let (frame, _) = render(Ok(&peer), "A", Some(&sample), Instant::now(), WIDE, false);
        assert!(line(&frame, "p ").ends_with("down            -         -  -"), "{frame}");
    }

    #[test]
    fn an_unreachable_node_shows_the_error_over_the_last_status_and_keeps_the_rates_base() {
        let t0 = Instant::now();
        let (frame, _) = render(Err("cannot reach it"), "http://x:1", None, t0, WIDE, false);
        assert_eq!(frame, "! http://x:1: cannot reach it\n  retrying, failing for 0ms; no status yet\n");
        let (_, s0) = render(Ok(&pulling(0, 1024 * KIB)), "A", None, t0, WIDE, false);
        let (_, s1) = render(Err("refused"), "A", Some(&s0), t0 + Duration::from_secs(2), WIDE, false);
        let (frame, s1) = render(Err("refused"), "A", Some(&s1), t0 + Duration::from_secs(3), WIDE, false);
        assert!(
            frame.starts_with("! A: refused\n  retrying, failing for 1s; below is the status of 3s ago\n"),
            "{frame}"
        );
        assert!(line(&frame, "snapshot").contains("bafk..abcdef"), "{frame}");
        // The rate spans the whole outage: 512 KiB over 4 s.
        let (frame, _) =
            render(Ok(&pulling(512 * KIB, 1024 * KIB)), "A", Some(&s1), t0 + Duration::from_secs(4), WIDE, false);
        assert!(line(&frame, "[").contains("128.0 KiB/s  ETA 4s"), "{frame}");
    }

    #[test]
    fn peers_beyond_the_rows_are_counted_not_drawn() {
        let peers: Vec<Value> = (0..50).map(|i| json!({"peer_id": format!("peer{i}")})).collect();
        let (frame, _) =
            render(Ok(&json!({ "peers": peers })), "A", None, Instant::now(), Size { cols: 80, rows: 12 }, false);
        assert_eq!(frame.lines().count(), 12, "{frame}");
        let shown =
            frame.lines().filter(|l| l.strip_prefix("peer").is_some_and(|n| n.starts_with(char::is_numeric))).count();
        assert_eq!(line(&frame, "..."), format!("... and {} more peers", 50 - shown));
    }
}
