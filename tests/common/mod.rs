//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::future::Future;
use std::time::Duration;

use peersync::node::{Node, NodeConfig};

/// Logs to the test output when `PEERSYNC_TEST_LOG` holds a tracing filter (e.g. `debug`).
pub fn init_tracing() {
    if let Ok(filter) = std::env::var("PEERSYNC_TEST_LOG") {
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
    }
}

/// A node on a fresh temp data dir, with small limits so tests can exceed them cheaply.
pub async fn start_node(configure: impl FnOnce(&mut NodeConfig)) -> (Node, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = NodeConfig::local(dir.path());
    config.limits.max_value_bytes = 64 * 1024;
    config.limits.max_body_bytes = 256 * 1024;
    configure(&mut config);
    (Node::start(config).await.unwrap(), dir)
}

/// Polls `check` until it returns `Some`, failing with `what` and the last observation at the deadline.
pub async fn eventually<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let start = tokio::time::Instant::now();
    loop {
        let last = match check().await {
            Ok(v) => return v,
            Err(seen) => seen,
        };
        if start.elapsed() > deadline {
            panic!("timed out after {deadline:?} waiting for {what}; last seen: {last}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub mod members;
pub mod process;
pub mod raw;

/// The address other nodes can dial to reach `node` (its first listen address plus `/p2p/`).
pub async fn dial_addr(node: &peersync::node::NodeHandle) -> libp2p::Multiaddr {
    let listen = eventually("a listen address", Duration::from_secs(30), || async {
        let s = node.net_status().await.map_err(|e| e.to_string())?;
        s.listen_addrs.first().cloned().ok_or_else(|| "none yet".to_string())
    })
    .await;
    format!("{listen}/p2p/{}", node.peer_id()).parse().unwrap()
}

/// Blocking variant of [`eventually`] for tests without a runtime.
pub fn wait_sync(what: &str, deadline: Duration, mut check: impl FnMut() -> Result<(), String>) {
    let start = std::time::Instant::now();
    loop {
        let seen = match check() {
            Ok(()) => return,
            Err(seen) => seen,
        };
        assert!(start.elapsed() < deadline, "timed out after {deadline:?} waiting for {what}; last seen: {seen}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether `node` holds `key` in register `r`.
pub async fn holds(node: &peersync::node::NodeHandle, key: &[u8]) -> bool {
    node.get("r", key).await.unwrap().is_some()
}

/// Waits (with a deadline) until `node` holds `key` in register `r`.
pub async fn wait_holds(node: &peersync::node::NodeHandle, key: &[u8], what: &str) {
    eventually(what, Duration::from_secs(30), || async {
        if holds(node, key).await {
            Ok(())
        } else {
            Err(format!("{:?}", node.store().version_vector()))
        }
    })
    .await;
}
