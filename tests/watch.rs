//! `peersync status --watch` through the real binary in a tmux pane: the live view shows a
//! snapshot pull's progress bar while a node pulls one, then the node active; an unreachable API
//! shows as an error the view keeps retrying; Ctrl-C ends it with status 0 and the cursor back.
//! Skipped (with a message) where tmux is not installed.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::process::{bootstrap_addr, cli, fill_random, NodeProc, BIN};
use serde_json::Value;

/// A tmux server of its own (a private socket) running one detached session; killed when dropped,
/// so a failing test leaves no view running.
struct Tmux {
    socket: String,
}

/// Printed by the pane's shell when the view exits; the shell then waits, so the pane (and its
/// cursor state) can still be read.
const EXITED: &str = "view exited with status ";

impl Tmux {
    /// `None` when tmux is not installed.
    fn start(dir: &Path, command: &[&str]) -> Option<Tmux> {
        if Command::new("tmux").arg("-V").output().is_err() {
            return None;
        }
        let unique = dir.file_name().unwrap().to_string_lossy();
        let tmux = Tmux { socket: format!("peersync-watch-{}-{unique}", std::process::id()) };
        // The shell catches Ctrl-C (the view, started afresh, does not inherit the trap) so that it
        // outlives the view. The view must size itself from the pane, not from the test's variables.
        let script = format!(r#"trap true INT; "$@"; echo "{EXITED}$?"; read _"#);
        let mut args = vec!["-f", "/dev/null", "new-session", "-d", "-s", "w", "-x", "120", "-y", "40"];
        args.extend_from_slice(&["sh", "-c", &script, "sh", "env", "-u", "COLUMNS", "-u", "LINES"]);
        args.extend_from_slice(command);
        let out = Command::new("tmux").args(["-L", &tmux.socket]).args(&args).output().unwrap();
        assert!(out.status.success(), "tmux new-session failed: {}", String::from_utf8_lossy(&out.stderr));
        Some(tmux)
    }

    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux").args(["-L", &self.socket]).args(args).output().unwrap();
        assert!(out.status.success(), "tmux {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The pane's text as shown now.
    fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "w"])
    }

    /// A tmux format of the pane, such as `#{cursor_flag}`.
    fn pane(&self, format: &str) -> String {
        self.run(&["display-message", "-p", "-t", "w", format]).trim().to_owned()
    }

    /// Waits until the screen satisfies `check`, then returns it.
    fn wait_screen(&self, what: &str, deadline: Duration, check: impl Fn(&str) -> bool) -> String {
        let mut seen = String::new();
        common::wait_sync(what, deadline, || {
            seen = self.screen();
            if check(&seen) {
                Ok(())
            } else {
                Err(format!("\n{seen}"))
            }
        });
        seen
    }

    /// Sends Ctrl-C and waits until the view has exited; returns its exit status.
    fn interrupt(&self) -> String {
        self.run(&["send-keys", "-t", "w", "C-c"]);
        let screen = self.wait_screen("the view to exit after Ctrl-C", Duration::from_secs(10), |s| s.contains(EXITED));
        let status = screen.split(EXITED).nth(1).unwrap_or("").split_whitespace().next().unwrap_or("");
        status.to_owned()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux").args(["-L", &self.socket, "kill-server"]).output();
    }
}

/// `12D3..x7Yq9z`: how the view shortens a peer id.
fn short(id: &str) -> String {
    format!("{}..{}", &id[..4], &id[id.len() - 6..])
}

#[test]
fn the_live_view_shows_a_snapshot_pull_with_its_progress_then_the_node_active() {
    let dir = tempfile::tempdir().unwrap();
    if Command::new("tmux").arg("-V").output().is_err() {
        eprintln!("SKIPPED: tmux is not installed (apt-get install tmux); the live view was not tested");
        return;
    }
    let fast = ["--gossip-heartbeat-ms", "100", "--discovery-interval-ms", "300", "--digest-min-ms", "100"];
    let small = ["--snapshot-chunk-bytes", "4096", "--log-retention-ops", "10", "--log-retention-bytes", "1"];
    let a = NodeProc::start(&dir.path().join("a"), &[&fast[..], &small[..]].concat());
    fill_random(&a.api, 8);
    let (ok, out, err) = cli(&["snapshot", "create", "--api", &a.api]);
    assert!(ok, "{err}");
    let snap: Value = serde_json::from_str(&out).unwrap();
    assert!(snap["chunks"].as_u64().unwrap() > 600, "{snap}");

    // One chunk in flight makes the pull take long enough to be watched.
    let a_addr = bootstrap_addr(&a);
    let b_args =
        [&fast[..], &["--bootstrap", &a_addr, "--role", "replica", "--snapshot-chunks-per-source", "1"]].concat();
    let b = NodeProc::start(&dir.path().join("b"), &b_args);
    let tmux = Tmux::start(dir.path(), &[BIN, "status", "--watch", "--interval-ms", "200", "--api", &b.api]).unwrap();

    let pulling = tmux.wait_screen("the snapshot progress bar", Duration::from_secs(60), |s| {
        s.lines().any(|l| l.trim_start().starts_with("[#") && l.contains("KiB /"))
    });
    let bar = pulling.lines().find(|l| l.trim_start().starts_with("[#")).unwrap();
    assert!(bar.contains("MiB") && bar.contains('%') && bar.contains("ETA"), "{pulling}");
    let snapshot = pulling.lines().find(|l| l.starts_with("snapshot ")).unwrap_or_else(|| panic!("{pulling}"));
    assert!(snapshot.contains("chunks ") && snapshot.contains(&short(snap["cid"].as_str().unwrap())), "{pulling}");
    assert!(pulling.contains("state syncing  phase catching_up"), "{pulling}");
    assert_eq!(tmux.pane("#{cursor_flag}"), "0", "the view hides the cursor");

    // A rate needs two polls of the same pull; the pull may end first on a fast machine, so look
    // for it only while the bar is still there.
    let rated = tmux.wait_screen("a rate and an ETA, or the end of the pull", Duration::from_secs(60), |s| {
        let bar = s.lines().find(|l| l.trim_start().starts_with("[#"));
        bar.is_none_or(|b| b.contains("/s  ETA ") && !b.contains("ETA -"))
    });
    eprintln!("first frame with the bar:\n{pulling}\nnext:\n{rated}");

    let active = tmux.wait_screen("the node active", Duration::from_secs(60), |s| s.contains("state active"));
    let peer =
        active.lines().find(|l| l.starts_with(&short(&a.peer_id))).unwrap_or_else(|| panic!("no A in\n{active}"));
    assert!(peer.contains("primary") && peer.contains(" up ") && peer.contains("ms"), "{active}");
    assert!(!active.lines().any(|l| l.trim_start().starts_with("[#")), "a bar once active:\n{active}");
    assert!(active.lines().all(|l| l.chars().count() <= 120), "{active}");

    assert_eq!(tmux.interrupt(), "0", "Ctrl-C ends the view with status 0");
    assert_eq!(tmux.pane("#{cursor_flag}"), "1", "the cursor is shown again after Ctrl-C");
}

#[test]
fn an_unreachable_api_shows_in_the_view_and_the_view_keeps_polling() {
    let dir = tempfile::tempdir().unwrap();
    let command = [BIN, "status", "--watch", "--interval-ms", "100", "--api", "http://127.0.0.1:1"];
    let Some(tmux) = Tmux::start(dir.path(), &command) else {
        eprintln!("SKIPPED: tmux is not installed (apt-get install tmux); the live view was not tested");
        return;
    };
    let screen = tmux.wait_screen("the error in the view", Duration::from_secs(30), |s| {
        s.starts_with("! http://127.0.0.1:1: cannot reach")
    });
    assert!(screen.contains("no status yet"), "{screen}");
    // Still polling a second later: the error did not end the view.
    let screen = tmux.wait_screen("a second of failures", Duration::from_secs(30), |s| {
        let failing = s.split("failing for ").nth(1).and_then(|rest| rest.split(';').next()).unwrap_or("");
        failing.ends_with('s') && !failing.ends_with("ms")
    });
    assert!(!screen.contains(EXITED), "{screen}");
    assert_eq!(tmux.interrupt(), "0");
}
