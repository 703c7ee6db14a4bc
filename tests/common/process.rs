//! Running the real `peersync` binary as a child process.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub const BIN: &str = env!("CARGO_BIN_EXE_peersync");

/// A running `peersync node` process. Killed (SIGKILL) when dropped.
pub struct NodeProc {
    pub child: Child,
    pub api: String,
    pub peer_id: String,
    pub data_dir: PathBuf,
}

impl NodeProc {
    /// Starts `peersync node` on `data_dir` with the API on a free port, plus `extra` flags, and
    /// waits (with a deadline) for it to print its API address.
    pub fn start(data_dir: &Path, extra: &[&str]) -> NodeProc {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(data_dir.with_extension("log")).unwrap();
        let mut child = Command::new(BIN)
            .args(["node", "--data-dir"])
            .arg(data_dir)
            .args(["--api", "127.0.0.1:0", "--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let (mut api, mut peer_id) = (None, None);
        while api.is_none() || peer_id.is_none() {
            match rx.recv_timeout(Duration::from_secs(30)) {
                Ok(line) => {
                    if let Some(a) = line.strip_prefix("api: ") {
                        api = Some(a.to_owned());
                    } else if let Some(p) = line.strip_prefix("peer_id: ") {
                        peer_id = Some(p.to_owned());
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let log = std::fs::read_to_string(data_dir.with_extension("log")).unwrap_or_default();
                    panic!("node did not print its API address within 30 s; log:\n{log}");
                }
            }
        }
        NodeProc { child, api: api.unwrap(), peer_id: peer_id.unwrap(), data_dir: data_dir.to_owned() }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends SIGTERM and waits (with a deadline) for the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(std::time::Instant::now() < deadline, "node did not exit within 30 s of SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.with_extension("log")).unwrap_or_default()
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a CLI command of the binary and returns (success, stdout, stderr).
pub fn cli(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `GET /v1/status` through the CLI, parsed.
pub fn status(api: &str) -> serde_json::Value {
    let (ok, out, err) = cli(&["status", "--api", api]);
    assert!(ok, "status failed: {err}");
    serde_json::from_str(&out).unwrap()
}

/// The address a peer can bootstrap from, read from the node's status.
pub fn bootstrap_addr(node: &NodeProc) -> String {
    let mut addr = None;
    super::wait_sync("a listen address in status", Duration::from_secs(60), || {
        let s = status(&node.api);
        addr = s["listen_addrs"].as_array().and_then(|a| a.first()).and_then(|a| a.as_str()).map(str::to_owned);
        addr.as_ref().map(|_| ()).ok_or_else(|| s.to_string())
    });
    format!("{}/p2p/{}", addr.unwrap(), node.peer_id)
}

/// Writes `batches` batches of 500 values of 1000 pseudo-random letters into register `data`
/// (keys `k{batch}-{i}`): incompressible enough that a snapshot's bytes are about the values'.
pub fn fill_random(api: &str, batches: usize) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let http = reqwest::Client::new();
    let mut x = 0x2545f4914f6cdd1du64;
    for batch in 0..batches {
        let entries: Vec<serde_json::Value> = (0..500)
            .map(|i| {
                let value: String = (0..1000)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        (b'a' + (x % 26) as u8) as char
                    })
                    .collect();
                serde_json::json!({"key": format!("k{batch}-{i}"), "value": value})
            })
            .collect();
        let body = serde_json::json!({ "entries": entries }).to_string();
        let resp = rt.block_on(http.post(format!("{api}/v1/registers/data")).body(body).send()).unwrap();
        assert_eq!(resp.status(), 200);
    }
}
