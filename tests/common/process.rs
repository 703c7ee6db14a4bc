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
