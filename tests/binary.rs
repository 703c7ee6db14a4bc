//! The real binary as separate processes: identity, restart, crash safety, flags, CLI client.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use common::process::{bootstrap_addr, cli, fill_random, status, NodeProc};
use peersync::ids::Seq;
use peersync::store::Store;
use serde_json::Value;

#[test]
fn id_is_stable_and_matches_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("n");
    let (ok, first, _) = cli(&["id", "--data-dir", data.to_str().unwrap()]);
    assert!(ok);
    let (_, second, _) = cli(&["id", "--data-dir", data.to_str().unwrap()]);
    assert_eq!(first, second);
    assert!(first.trim().starts_with("12D3KooW"), "{first}");
    let node = NodeProc::start(&data, &[]);
    assert_eq!(node.peer_id, first.trim());
}

#[test]
fn sigterm_stops_cleanly_and_restart_keeps_data_and_peer_id() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("n");
    let node = NodeProc::start(&data, &[]);
    let (ok, out, err) = cli(&["put", "docs", "readme", "hello world", "--api", &node.api]);
    assert!(ok, "{err}");
    let token = serde_json::from_str::<Value>(&out).unwrap()["token"].as_str().unwrap().to_owned();
    let (ok, out, _) = cli(&["incr", "hits", "home", "-4", "--api", &node.api]);
    assert!(ok);
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["value"], -4);
    let (ok, out, err) =
        cli(&["lease", "acquire", "locks", "db", "--holder", "w1", "--ttl-ms", "60000", "--api", &node.api]);
    assert!(ok, "{err}");
    assert!(serde_json::from_str::<Value>(&out).unwrap()["token"].as_u64().is_some_and(|t| t > 0), "{out}");
    let (ok, _, err) = cli(&["lease", "acquire", "locks", "db", "--holder", "w2", "--api", &node.api]);
    assert!(!ok);
    assert!(err.contains("lease_held") && err.contains("w1"), "{err}");
    let peer = node.peer_id.clone();
    let root = status(&node.api)["state_root"].clone();

    let exit = node.terminate();
    assert!(exit.success(), "SIGTERM must shut down cleanly, got {exit:?}");

    let node = NodeProc::start(&data, &[]);
    assert_eq!(node.peer_id, peer, "the PeerId survives a restart");
    let (ok, out, _) = cli(&["get", "docs", "readme", "--after", &token, "--api", &node.api]);
    assert!(ok);
    assert_eq!(out, "hello world\n");
    let s = status(&node.api);
    assert_eq!(s["state_root"], root);
    assert_eq!(s["version_vector"][&peer], 3);
    let (ok, _, _) = cli(&["del", "docs", "readme", "--api", &node.api]);
    assert!(ok);
    let (ok, _, err) = cli(&["get", "docs", "readme", "--api", &node.api]);
    assert!(!ok && err.contains("not_found"), "{err}");
    assert!(node.terminate().success());
}

#[test]
fn kill_9_during_writes_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("n");
    let node = NodeProc::start(&data, &[]);
    let api = node.api.clone();
    let acked: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let (api, acked) = (api.clone(), acked.clone());
            rt.spawn(async move {
                let http = reqwest::Client::new();
                for i in 0.. {
                    let key = format!("w{w}-{i}");
                    let resp = http.put(format!("{api}/v1/registers/crash/{key}")).body(key.clone()).send().await;
                    let Ok(resp) = resp else { return };
                    let Ok(body) = resp.json::<Value>().await else {
                        return;
                    };
                    acked.lock().unwrap().insert(key, body["seq"].as_u64().unwrap());
                }
            })
        })
        .collect();
    common::wait_sync("300 acknowledged writes", std::time::Duration::from_secs(60), || {
        let n = acked.lock().unwrap().len();
        if n >= 300 {
            Ok(())
        } else {
            Err(format!("{n} acknowledged"))
        }
    });
    node.kill9();
    let acked = acked.lock().unwrap().clone();
    rt.block_on(async {
        for w in writers {
            let _ = w.await;
        }
    });
    let max_seq = *acked.values().max().unwrap();

    let node = NodeProc::start(&data, &[]);
    rt.block_on(async {
        let http = reqwest::Client::new();
        for key in acked.keys() {
            let resp = http.get(format!("{}/v1/registers/crash/{key}", node.api)).send().await.unwrap();
            assert_eq!(resp.status(), 200, "acknowledged write {key} lost after kill -9");
            assert_eq!(resp.text().await.unwrap(), *key);
        }
    });
    let s = status(&node.api);
    let vv = s["version_vector"][&node.peer_id].as_u64().unwrap();
    assert!(vv >= max_seq, "version vector {vv} below an acknowledged seq {max_seq}");
    assert_eq!(s["log_ops"].as_u64().unwrap(), vv, "the log holds exactly the ops the version vector covers");
    assert!(node.terminate().success());

    let store = Store::open(&data.join(peersync::node::DATABASE_FILE)).unwrap();
    let report = store.check_log().unwrap();
    assert!(report.problems.is_empty(), "log inconsistent after kill -9: {:?}", report.problems);
    assert_eq!(report.ops, vv);
}

/// Short gossip, discovery and digest intervals, for tests that wait on the cluster.
const FAST: [&str; 6] = ["--gossip-heartbeat-ms", "100", "--discovery-interval-ms", "300", "--digest-min-ms", "100"];
/// Small snapshot chunks, and a log compacted right after each snapshot.
const SMALL_SNAPSHOTS: [&str; 6] =
    ["--snapshot-chunk-bytes", "4096", "--log-retention-ops", "10", "--log-retention-bytes", "1"];

/// A random number below its argument, from a seed taken from the clock and printed (to replay a run).
fn seeded_random() -> impl FnMut(u64) -> u64 {
    let mut seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    println!("seed {seed}");
    move |below| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % below
    }
}

/// Opens the stopped node's database: its log is sound, and its state hashes to its stored root
/// (making a snapshot recomputes the root from every entry and refuses a state that differs).
fn assert_store_whole(node_dir: &std::path::Path, when: &str) {
    let store = Store::open(&node_dir.join(peersync::node::DATABASE_FILE)).unwrap();
    let report = store.check_log().unwrap();
    assert!(report.problems.is_empty(), "log {when}: {:?}", report.problems);
    let signer = peersync::op::Signer::new(libp2p::identity::Keypair::generate_ed25519());
    store.create_snapshot(&signer, "test", 1 << 20).unwrap_or_else(|e| panic!("state {when}: {e}"));
}

fn post_snapshot(node: &NodeProc) -> Value {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let resp = rt.block_on(reqwest::Client::new().post(format!("{}/v1/snapshots", node.api)).send()).unwrap();
    assert_eq!(resp.status(), 200);
    rt.block_on(resp.json()).unwrap()
}

fn wait_equal_roots(a: &NodeProc, b: &NodeProc) {
    common::wait_sync("equal roots", std::time::Duration::from_secs(30), || {
        let (ra, rb) = (status(&a.api)["state_root"].clone(), status(&b.api)["state_root"].clone());
        if ra == rb {
            Ok(())
        } else {
            Err(format!("{ra} vs {rb}"))
        }
    });
}

/// A primary `a` and a replica `b` bootstrapped to it, with short gossip and discovery intervals:
/// (a, b's data dir, b's flags to restart it with, b).
fn primary_and_replica(dir: &tempfile::TempDir) -> (NodeProc, std::path::PathBuf, Vec<String>, NodeProc) {
    let fast = ["--gossip-heartbeat-ms", "100", "--discovery-interval-ms", "300"];
    let a = NodeProc::start(&dir.path().join("a"), &fast);
    let b_dir = dir.path().join("b");
    let b_args: Vec<String> = fast
        .iter()
        .map(|s| s.to_string())
        .chain(["--bootstrap".into(), bootstrap_addr(&a), "--role".into(), "replica".into()])
        .collect();
    let b = NodeProc::start(&b_dir, &b_args.iter().map(String::as_str).collect::<Vec<_>>());
    (a, b_dir, b_args, b)
}

/// A replica applies peers' ops in its memtable and writes them to redb on a 100 ms tick, so a
/// kill -9 lands before, during or after a flush. Killed five times at random points while a
/// primary takes puts, deletes and counter adds, the replica comes back every time with a log that
/// matches its version vector and a state that matches its root, and ends with every write.
#[test]
fn a_replica_killed_9_in_a_loop_keeps_log_vector_and_root_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b_dir, b_args, mut b) = primary_and_replica(&dir);
    let b_args: Vec<&str> = b_args.iter().map(String::as_str).collect();
    let mut random = seeded_random();

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (api, stop) = (a.api.clone(), stop.clone());
            rt.spawn(async move {
                let http = reqwest::Client::new();
                let mut i = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let url = match i % 10 {
                        // Deletes of keys written before (tombstones in the memtable) and counter adds.
                        7 => format!("{api}/v1/registers/crash/w{w}-{}", i - 7),
                        8 => format!("{api}/v1/counters/hits/w{w}"),
                        _ => format!("{api}/v1/registers/crash/w{w}-{i}"),
                    };
                    let resp = match i % 10 {
                        7 => http.delete(url).send().await,
                        8 => http.post(url).body(r#"{"delta":1}"#).send().await,
                        _ => http.put(url).body(format!("v{i}")).send().await,
                    };
                    assert_eq!(resp.unwrap().status(), 200);
                    i += 1;
                }
                i
            })
        })
        .collect();
    let applied_from_a = |node: &NodeProc| status(&node.api)["version_vector"][&a.peer_id].as_u64().unwrap_or(0);
    for round in 0..5 {
        let from = applied_from_a(&b);
        let more = 50 + random(400);
        common::wait_sync("the replica to apply more of A's ops", std::time::Duration::from_secs(60), || {
            let now = applied_from_a(&b);
            if now >= from + more {
                Ok(())
            } else {
                Err(format!("{now} applied, waiting for {}", from + more))
            }
        });
        println!("round {round}: kill -9 after {} of A's ops applied", applied_from_a(&b));
        b.kill9();
        let store = Store::open(&b_dir.join(peersync::node::DATABASE_FILE)).unwrap();
        let report = store.check_log().unwrap();
        assert!(report.problems.is_empty(), "round {round}: log after kill -9: {:?}", report.problems);
        let (_, vv) = store.state_root();
        assert_eq!(report.ops, vv.total(), "round {round}: the log holds exactly the ops of the vector");
        drop(store);
        b = NodeProc::start(&b_dir, &b_args);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written: u64 = rt.block_on(async {
        let mut n = 0;
        for w in writers {
            n += w.await.unwrap();
        }
        n
    });
    common::wait_sync("the replica to catch up with A", std::time::Duration::from_secs(60), || {
        let (sa, sb) = (status(&a.api), status(&b.api));
        if sa["version_vector"] == sb["version_vector"] && sa["state_root"] == sb["state_root"] {
            Ok(())
        } else {
            Err(format!(
                "A {} {} / B {} {}",
                sa["version_vector"], sa["state_root"], sb["version_vector"], sb["state_root"]
            ))
        }
    });
    for w in 0..4 {
        let (ok, a_hits, _) = cli(&["get", "crash", &format!("w{w}-1"), "--api", &a.api]);
        let (ok_b, b_hits, _) = cli(&["get", "crash", &format!("w{w}-1"), "--api", &b.api]);
        assert_eq!((ok, a_hits), (ok_b, b_hits));
    }
    let s = status(&b.api);
    assert_eq!(s["log_ops"].as_u64().unwrap(), written, "B's log holds every op A acknowledged");
    assert!(a.terminate().success());
    assert!(b.terminate().success());
    assert_store_whole(&b_dir, "at the end");
}

/// `?ack=1` answers once the other node holds the write on its disk, not only in memory: a
/// replica killed -9 right after the acknowledgement finds every acknowledged op in its database.
/// (A replica applies peers' ops in its memtable first and writes them to disk within 100 ms; an
/// acknowledgement asks it to do so at once.)
#[test]
fn an_acknowledged_write_survives_a_kill_9_of_the_node_that_acknowledged_it() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b_dir, b_args, mut b) = primary_and_replica(&dir);
    let b_args: Vec<&str> = b_args.iter().map(String::as_str).collect();
    wait_active(&b);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let http = reqwest::Client::new();
    for round in 0..3 {
        let mut acked = Seq(0);
        for i in 0..20 {
            let url = format!("{}/v1/registers/acked/r{round}-{i}?ack=1&timeout_ms=10000", a.api);
            let resp = rt.block_on(http.put(url).body("v").send()).unwrap();
            assert_eq!(resp.status(), 200, "round {round} write {i}");
            let body: Value = rt.block_on(resp.json()).unwrap();
            assert_eq!(body["acked"], 1, "{body}");
            acked = Seq(body["seq"].as_u64().unwrap());
        }
        b.kill9();
        let store = Store::open(&b_dir.join(peersync::node::DATABASE_FILE)).unwrap();
        let origin: peersync::ids::Origin = a.peer_id.parse().unwrap();
        let held = store.version_vector().get(&origin);
        assert!(held >= acked, "round {round}: B acknowledged seq {acked} of A but kept {held} after kill -9");
        assert!(store.check_log().unwrap().problems.is_empty());
        drop(store);
        b = NodeProc::start(&b_dir, &b_args);
        wait_active(&b);
    }
    assert!(a.terminate().success());
    assert!(b.terminate().success());
}

#[test]
fn invalid_flags_exit_non_zero_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("n");
    let d = data.to_str().unwrap();
    for (args, needle) in [
        (vec!["node", "--data-dir", d, "--listen", "not-a-multiaddr"], "--listen"),
        (vec!["node", "--data-dir", d, "--bootstrap", "/ip4/1.2.3/tcp/1"], "--bootstrap"),
        (vec!["node", "--data-dir", d, "--role", "boss"], "--role"),
        (vec!["node", "--data-dir", d, "--api", "nowhere"], "--api"),
        (vec!["node", "--data-dir", d, "--cluster", "bad name", "--api", "127.0.0.1:0"], "cluster"),
        (vec!["status", "--api", "ftp://x"], "--api"),
    ] {
        let (ok, _, err) = cli(&args);
        assert!(!ok, "{args:?} should fail");
        assert!(err.contains(needle), "{args:?}: error should name {needle}: {err}");
    }
    let (ok, _, err) = cli(&["status", "--api", "http://127.0.0.1:1"]);
    assert!(!ok && err.contains("cannot reach"), "{err}");
}

/// The address a peer can bootstrap from, read from the node's status.
#[test]
fn three_processes_in_a_chain_replicate_writes() {
    let dir = tempfile::tempdir().unwrap();
    let fast = ["--gossip-heartbeat-ms", "100", "--discovery-interval-ms", "300"];
    let a = NodeProc::start(&dir.path().join("a"), &fast);
    let a_addr = bootstrap_addr(&a);
    let b = NodeProc::start(&dir.path().join("b"), &[&fast[..], &["--bootstrap", &a_addr]].concat());
    let b_addr = bootstrap_addr(&b);
    let c =
        NodeProc::start(&dir.path().join("c"), &[&fast[..], &["--bootstrap", &b_addr, "--role", "replica"]].concat());

    let put = |node: &NodeProc, key: &str, value: &str| -> String {
        let (ok, out, err) = cli(&["put", "docs", key, value, "--api", &node.api]);
        assert!(ok, "put on {}: {err}", node.api);
        serde_json::from_str::<Value>(&out).unwrap()["token"].as_str().unwrap().to_owned()
    };
    let from_a = put(&a, "from-a", "written on A");
    let from_b = put(&b, "from-b", "written on B");
    wait_active(&c);
    // `--after` makes C wait until both writes are applied there (read-your-writes across nodes).
    let after = format!("{from_a},{from_b}");
    let (ok, out, err) = cli(&["get", "docs", "from-a", "--after", &after, "--api", &c.api]);
    assert!(ok, "C never applied A's and B's writes: {err}\nC's log:\n{}", c.log());
    assert_eq!(out, "written on A\n");
    let (ok, out, _) = cli(&["get", "docs", "from-b", "--api", &c.api]);
    assert!(ok);
    assert_eq!(out, "written on B\n");

    let (ok, _, err) = cli(&["put", "docs", "nope", "x", "--api", &c.api]);
    assert!(!ok && err.contains("read_only_replica"), "a replica must refuse writes: {err}");
    let s = status(&c.api);
    assert_eq!(s["role"], "replica");
    assert!(s["peers"].as_array().unwrap().iter().any(|p| p["peer_id"] == b.peer_id.as_str()), "{s}");
    for node in [a, b, c] {
        assert!(node.terminate().success());
    }
}

/// Two primaries form the lease group; with one of them down the other cannot reach a majority
/// and answers 503 `no_quorum` instead of granting; restarted, the group (persisted in
/// `leases.redb`) grants again, with a larger fencing token.
#[test]
fn leases_need_a_majority_of_the_primaries_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let fast = ["--gossip-heartbeat-ms", "100", "--discovery-interval-ms", "300"];
    let a = NodeProc::start(&dir.path().join("a"), &fast);
    let a_addr = bootstrap_addr(&a);
    let b_args = [&fast[..], &["--bootstrap", &a_addr]].concat();
    let b = NodeProc::start(&dir.path().join("b"), &b_args);
    let voters = |node: &NodeProc| status(&node.api)["sync"]["leases"]["voters"].as_array().map_or(0, Vec::len);
    common::wait_sync("both primaries vote in the lease group", std::time::Duration::from_secs(60), || {
        if voters(&a) == 2 && voters(&b) == 2 {
            Ok(())
        } else {
            Err(format!("{} and {}", status(&a.api)["sync"]["leases"], status(&b.api)["sync"]["leases"]))
        }
    });
    let acquire = |node: &NodeProc, key: &str, holder: &str| {
        cli(&["lease", "acquire", "locks", key, "--holder", holder, "--ttl-ms", "60000", "--api", &node.api])
    };
    let (ok, out, err) = acquire(&b, "db", "w1");
    assert!(ok, "{err}");
    let first = serde_json::from_str::<Value>(&out).unwrap()["token"].as_u64().unwrap();

    let b_data = dir.path().join("b");
    assert!(b.terminate().success());
    let (ok, _, err) = acquire(&a, "cache", "w2");
    assert!(!ok && err.contains("no_quorum"), "one primary of two is no majority: {err}");

    let b = NodeProc::start(&b_data, &b_args);
    let mut second = 0;
    common::wait_sync("a grant once the group has its majority again", std::time::Duration::from_secs(60), || {
        let (ok, out, err) = acquire(&a, "cache", "w2");
        if !ok {
            return Err(err);
        }
        second = serde_json::from_str::<Value>(&out).unwrap()["token"].as_u64().unwrap();
        Ok(())
    });
    assert!(second > first, "fencing tokens grow: {first} then {second}");
    // The first grant survived both restarts: another holder is still refused.
    let (ok, _, err) = acquire(&a, "db", "w3");
    assert!(!ok && err.contains("lease_held") && err.contains("w1"), "{err}");
    for node in [a, b] {
        assert!(node.terminate().success());
    }
}

fn wait_active(node: &NodeProc) {
    common::wait_sync("the node to become active", std::time::Duration::from_secs(60), || {
        let s = status(&node.api);
        if s["state"] == "active" {
            Ok(())
        } else {
            Err(s["sync"].to_string())
        }
    });
}

/// The stale-rejoin timeline: a node that was down while writes landed never answers "not found"
/// for them after it restarts: 503 while syncing, then the value.
#[test]
fn a_restarted_node_never_answers_stale_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let fast = ["--gossip-heartbeat-ms", "100", "--discovery-interval-ms", "300"];
    let n1 = NodeProc::start(&dir.path().join("n1"), &fast);
    let n1_addr = bootstrap_addr(&n1);
    let n2 = NodeProc::start(&dir.path().join("n2"), &[&fast[..], &["--bootstrap", &n1_addr]].concat());
    let n3_dir = dir.path().join("n3");
    let n3_args: Vec<&str> = [&fast[..], &["--bootstrap", &n1_addr, "--role", "replica"]].concat();
    let n3 = NodeProc::start(&n3_dir, &n3_args);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let http = reqwest::Client::new();
    let put_range = |range: std::ops::RangeInclusive<u32>| {
        let mut last = String::new();
        for i in range {
            let node = if i % 2 == 0 { &n1 } else { &n2 };
            let resp = rt
                .block_on(http.put(format!("{}/v1/registers/keys/key-{i}", node.api)).body(format!("value-{i}")).send())
                .unwrap();
            assert_eq!(resp.status(), 200);
            last = rt.block_on(resp.json::<Value>()).unwrap()["token"].as_str().unwrap().to_owned();
        }
        last
    };
    let last = put_range(1..=100);
    wait_active(&n3);
    let (ok, _, err) = cli(&["get", "keys", "key-100", "--after", &last, "--api", &n3.api]);
    assert!(ok, "n3 has the first 100 keys before it goes down: {err}");

    n3.kill9();
    put_range(101..=150);

    let n3 = NodeProc::start(&n3_dir, &n3_args);
    let mut seen = BTreeMap::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let resp = rt.block_on(http.get(format!("{}/v1/registers/keys/key-125", n3.api)).send()).unwrap();
        let code = resp.status().as_u16();
        *seen.entry(code).or_insert(0u32) += 1;
        assert_ne!(code, 404, "a rejoining node answered 404 for a key written while it was away; seen {seen:?}");
        if code == 200 {
            assert_eq!(rt.block_on(resp.text()).unwrap(), "value-125");
            break;
        }
        assert_eq!(code, 503, "while syncing the answer is 503; seen {seen:?}");
        assert!(std::time::Instant::now() < deadline, "n3 never served key-125; seen {seen:?}\n{}", n3.log());
    }
    wait_active(&n3);
    common::wait_sync("equal state roots", std::time::Duration::from_secs(30), || {
        let roots: Vec<Value> = [&n1, &n2, &n3].iter().map(|n| status(&n.api)["state_root"].clone()).collect();
        if roots.windows(2).all(|w| w[0] == w[1]) {
            Ok(())
        } else {
            Err(format!("{roots:?}"))
        }
    });
    let s = status(&n3.api);
    assert_eq!(s["state"], "active");
    println!("stale-rejoin: reads of key-125 on the restarted node: {seen:?} (HTTP status -> count)");
    for node in [n1, n2, n3] {
        assert!(node.terminate().success());
    }
}

fn metric_value(api: &str, line_prefix: &str) -> u64 {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let text = rt.block_on(async { reqwest::get(format!("{api}/metrics")).await.unwrap().text().await.unwrap() });
    text.lines().find_map(|l| l.strip_prefix(line_prefix).and_then(|r| r.trim().parse().ok())).unwrap_or(0)
}

/// A replica killed with SIGKILL a third of the way through a snapshot resumes after a restart
/// with only the missing chunks: the source serves the snapshot's bytes about once in total.
#[test]
fn a_snapshot_pull_resumes_after_sigkill_without_refetching() {
    let dir = tempfile::tempdir().unwrap();
    let a = NodeProc::start(&dir.path().join("a"), &[&FAST[..], &SMALL_SNAPSHOTS[..]].concat());
    fill_random(&a.api, 4);
    let snap = post_snapshot(&a);
    let total = snap["bytes"].as_u64().unwrap();
    assert!(snap["chunks"].as_u64().unwrap() > 300, "{snap}");

    let a_addr = bootstrap_addr(&a);
    let b_dir = dir.path().join("b");
    let b_args: Vec<&str> =
        [&FAST[..], &["--bootstrap", &a_addr, "--role", "replica", "--snapshot-chunks-per-source", "1"]].concat();
    let b = NodeProc::start(&b_dir, &b_args);
    let mut killed_at = 0;
    common::wait_sync("the pull to pass 30%", std::time::Duration::from_secs(60), || {
        let s = status(&b.api);
        let have = s["sync"]["snapshot"]["bytes_have"].as_u64().unwrap_or(0);
        killed_at = have;
        if have * 10 >= total * 3 {
            Ok(())
        } else {
            Err(s["sync"].to_string())
        }
    });
    b.kill9();
    assert!(killed_at < total, "killed before the pull finished");

    let b = NodeProc::start(&b_dir, &b_args);
    wait_active(&b);
    wait_equal_roots(&a, &b);
    let served = metric_value(&a.api, "peersync_bytes_sent_total{protocol=\"snapshot\"}");
    println!(
        "snapshot {total} B; killed B at {killed_at} B; A served {served} B in all ({:.3}x)",
        served as f64 / total as f64
    );
    assert!(
        served as f64 <= 1.1 * total as f64,
        "resumed pull refetched too much: {served} B served for a {total} B snapshot"
    );
    for node in [a, b] {
        assert!(node.terminate().success());
    }
}

/// A replica killed -9 again and again while it pulls, stages and installs a snapshot (a primary's
/// registers, some of them deleted) keeps a database that is whole at every kill: its log is sound,
/// and its state hashes to its stored root. Once let run, it installs the snapshot and ends with
/// the primary's root and the primary's tombstones indexed.
#[test]
fn a_replica_killed_9_while_it_stages_and_installs_a_snapshot_stays_whole() {
    let dir = tempfile::tempdir().unwrap();
    let a = NodeProc::start(&dir.path().join("a"), &[&FAST[..], &SMALL_SNAPSHOTS[..]].concat());
    fill_random(&a.api, 3);
    // Tombstones in the snapshot: deletes of keys held, and of keys never written.
    let deletes: Vec<Value> =
        (0..400).map(|i| serde_json::json!({"key": format!("k{}-{}", i % 4, i), "delete": true})).collect();
    let body = serde_json::json!({ "entries": deletes }).to_string();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let http = reqwest::Client::new();
    let resp = rt.block_on(http.post(format!("{}/v1/registers/data", a.api)).body(body).send()).unwrap();
    assert_eq!(resp.status(), 200);
    let snap = post_snapshot(&a);
    let total = snap["bytes"].as_u64().unwrap();
    assert!(snap["chunks"].as_u64().unwrap() > 200, "{snap}");

    let a_addr = bootstrap_addr(&a);
    let b_dir = dir.path().join("b");
    let b_args: Vec<&str> = [&FAST[..], &["--bootstrap", &a_addr, "--role", "replica"]].concat();
    let mut random = seeded_random();
    // Kills part way through the pull (each one resumes where the last stopped), then as soon as
    // every chunk is held, while the install runs or just after it.
    for round in 0..4 {
        let b = NodeProc::start(&b_dir, &b_args);
        let target = match round {
            3 => total,
            _ => total * (round as u64 * 25 + 10 + random(20)) / 100,
        };
        let mut have = 0;
        common::wait_sync("the pull to reach its kill point", std::time::Duration::from_secs(60), || {
            let s = status(&b.api);
            have = s["sync"]["snapshot"]["bytes_have"].as_u64().unwrap_or(0);
            if have >= target || s["state"] == "active" {
                Ok(())
            } else {
                Err(s["sync"].to_string())
            }
        });
        println!("round {round}: kill -9 with {have} of {total} snapshot bytes held");
        b.kill9();
        assert_store_whole(&b_dir, &format!("after kill -9 {round}"));
    }

    let b = NodeProc::start(&b_dir, &b_args);
    wait_active(&b);
    wait_equal_roots(&a, &b);
    assert!(a.terminate().success());
    assert!(b.terminate().success());
    assert_store_whole(&b_dir, "at the end");
    let tombstones = |node: &str| {
        Store::open(&dir.path().join(node).join(peersync::node::DATABASE_FILE)).unwrap().tombstones().unwrap()
    };
    assert!(tombstones("a") >= 100, "A holds the deletes as tombstones");
    assert_eq!(tombstones("b"), tombstones("a"), "B indexed the snapshot's tombstones");
}

/// A tmpfs mounted for one test, unmounted when dropped. Mounting needs root: `None` otherwise.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(size_mib: u64) -> Option<Tmpfs> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "tmpfs"])
            .arg(dir.path())
            .status();
        status.is_ok_and(|s| s.success()).then_some(Tmpfs(dir))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(self.0.path()).status();
    }
}

#[test]
fn a_full_disk_answers_507_loses_no_acknowledged_write_and_writes_resume_once_space_is_freed() {
    let Some(fs) = Tmpfs::mount(48) else {
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    };
    let filler = fs.0.path().join("filler");
    std::fs::write(&filler, vec![0u8; 16 << 20]).unwrap();
    let data = fs.0.path().join("n");
    let node = NodeProc::start(&data, &["--disk-reserve-mb", "4"]);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let http = reqwest::Client::new();
    let value = |i: usize| vec![i as u8; 200_000];
    let put = |i: usize| {
        let req = http.put(format!("{}/v1/registers/big/k{i}", node.api)).body(value(i));
        rt.block_on(async { req.send().await.unwrap() })
    };
    let mut acked = Vec::new();
    let refusal = loop {
        assert!(acked.len() < 400, "48 MiB cannot hold {} values of 200 kB", acked.len());
        let resp = put(acked.len());
        if resp.status() != 200 {
            break (resp.status(), rt.block_on(resp.json::<Value>()).unwrap());
        }
        acked.push(acked.len());
    };
    assert_eq!(refusal.0, 507, "{refusal:?}");
    assert_eq!(refusal.1["error"], "disk_full", "{refusal:?}");
    assert!(refusal.1["message"].as_str().unwrap().contains("free space"), "{refusal:?}");
    assert!(acked.len() >= 20, "only {} writes fit before the reserve", acked.len());
    let get = |api: &str, i: usize| {
        let req = http.get(format!("{api}/v1/registers/big/k{i}"));
        rt.block_on(async {
            let resp = req.send().await.unwrap();
            (resp.status().as_u16(), resp.bytes().await.unwrap())
        })
    };
    for &i in &acked {
        let (code, body) = get(&node.api, i);
        assert_eq!((code, body.len()), (200, 200_000), "acknowledged write k{i} unreadable on a full disk");
    }
    assert_eq!(get(&node.api, acked.len()).0, 404, "the refused write was not applied");
    assert_eq!(status(&node.api)["state"], "active");

    // Space freed: writes go through again, with no restart.
    std::fs::remove_file(&filler).unwrap();
    let resp = put(acked.len());
    assert_eq!(resp.status(), 200, "{:?}", rt.block_on(resp.text()));
    acked.push(acked.len());
    assert!(!node.log().contains("Previous I/O error"), "redb hit the full disk:\n{}", node.log());

    assert!(node.terminate().success());
    let node = NodeProc::start(&data, &["--disk-reserve-mb", "4"]);
    for &i in &acked {
        let (code, body) = get(&node.api, i);
        assert_eq!((code, body.to_vec()), (200, value(i)), "acknowledged write k{i} lost across the restart");
    }
    drop(node);
}

#[test]
fn compact_shrinks_the_files_of_a_stopped_node_and_refuses_a_running_one() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("n");
    let retention = ["--log-retention-ops", "1", "--log-retention-bytes", "1"];
    let node = NodeProc::start(&data, &retention);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let http = reqwest::Client::new();
    rt.block_on(async {
        for i in 0..600u32 {
            let url = format!("{}/v1/registers/big/k{i}", node.api);
            let resp = http.put(url).body(vec![(i % 251) as u8; 8192]).send().await.unwrap();
            assert_eq!(resp.status(), 200);
        }
    });
    // The snapshot compacts the log down to the retention: its pages are free but the file keeps them.
    let (ok, _, err) = cli(&["snapshot", "create", "--api", &node.api]);
    assert!(ok, "{err}");
    let (ok, _, err) = cli(&["compact", "--data-dir", data.to_str().unwrap()]);
    assert!(!ok && err.contains("another peersync process"), "compact must refuse files in use: {err}");
    let root = status(&node.api)["state_root"].clone();
    assert!(node.terminate().success());

    let file = data.join(peersync::node::DATABASE_FILE);
    let before = std::fs::metadata(&file).unwrap().len();
    let (ok, out, err) = cli(&["compact", "--data-dir", data.to_str().unwrap()]);
    assert!(ok, "{err}");
    let after = std::fs::metadata(&file).unwrap().len();
    assert!(out.contains(&format!("{before} -> {after} bytes")), "{out}");
    assert!(after < before * 3 / 4, "compaction gave back the log's pages: {before} -> {after} bytes");

    let node = NodeProc::start(&data, &retention);
    assert_eq!(status(&node.api)["state_root"], root, "the same state after compaction");
    let (ok, out, _) = cli(&["get", "big", "k599", "--api", &node.api]);
    assert!(ok && out.len() >= 8192, "{}", out.len());
    assert!(node.terminate().success());
}

/// `--api-token-file`: the CLI without the token is refused with `unauthorized` and exits non-zero;
/// with `PEERSYNC_API_TOKEN` it works. An empty token file stops the node at start, naming it.
#[test]
fn the_api_token_file_protects_the_api_and_the_cli_sends_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("api-token");
    std::fs::write(&token_file, "tok-123\n").unwrap();
    let data = dir.path().join("node");
    let node = NodeProc::start(&data, &["--api-token-file", token_file.to_str().unwrap()]);
    let run = |token: Option<&str>, args: &[&str]| {
        let mut cmd = std::process::Command::new(common::process::BIN);
        cmd.args(args).env_remove("PEERSYNC_API_TOKEN");
        if let Some(t) = token {
            cmd.env("PEERSYNC_API_TOKEN", t);
        }
        cmd.output().unwrap()
    };
    let denied = run(None, &["put", "r", "k", "v", "--api", &node.api]);
    assert!(!denied.status.success());
    assert!(String::from_utf8_lossy(&denied.stderr).contains("unauthorized"), "{denied:?}");
    let wrong = run(Some("nope"), &["status", "--api", &node.api]);
    assert!(!wrong.status.success());
    let put = run(Some("tok-123"), &["put", "r", "k", "v", "--api", &node.api]);
    assert!(put.status.success(), "{put:?}");
    let got = run(Some("tok-123"), &["get", "r", "k", "--api", &node.api]);
    assert_eq!(String::from_utf8_lossy(&got.stdout).trim(), "v");
    drop(node);

    std::fs::write(&token_file, "  \n").unwrap();
    let out = std::process::Command::new(common::process::BIN)
        .args(["node", "--data-dir"])
        .arg(dir.path().join("other"))
        .args(["--api", "127.0.0.1:0", "--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns", "--api-token-file"])
        .arg(&token_file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("api-token-file"), "{out:?}");
}

#[test]
fn log_format_json_writes_one_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("n");
    let node = NodeProc::start(&data, &["--log-format", "json"]);
    let (ok, _, err) = cli(&["put", "docs", "readme", "hello", "--api", &node.api]);
    assert!(ok, "{err}");
    common::wait_sync("the phase change to be logged", std::time::Duration::from_secs(30), || {
        let log = node.log();
        if log.contains("phase changed") {
            Ok(())
        } else {
            Err(log)
        }
    });
    let log_file = node.data_dir.with_extension("log");
    assert!(node.terminate().success());
    let log = std::fs::read_to_string(log_file).unwrap();
    let lines: Vec<Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect();
    for l in &lines {
        // (Some of libp2p's events carry fields and no message.)
        assert!(l["level"].is_string() && l["timestamp"].is_string() && l["target"].is_string(), "{l}");
    }
    let phase = lines.iter().find(|l| l["message"] == "phase changed").expect("a phase change");
    assert_eq!(phase["to"], "Active", "{phase}");
    let (ok, _, err) = cli(&["node", "--log-format", "xml"]);
    assert!(!ok && err.contains("xml"), "{err}");
}

#[test]
fn config_file_sets_flags_the_command_line_overrides_and_bad_keys_stop_the_node() {
    let dir = tempfile::tempdir().unwrap();
    // The example, every line with a default uncommented, is a valid file.
    let (ok, example, err) = cli(&["config", "example"]);
    assert!(ok, "{err}");
    let full: String = example
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(kv) if kv.contains(" = ") && !kv.contains("# no default") => format!("{kv}\n"),
            _ => format!("{l}\n"),
        })
        .collect();
    assert!(full.contains("\nmax-value-bytes = 1048576\n"), "{full}");
    let cfg = dir.path().join("full.toml");
    // Its data dir, API and listen addresses are overridden below; the cluster comes from the file.
    std::fs::write(&cfg, full.replace("cluster = \"default\"", "cluster = \"blue\"")).unwrap();
    let data = dir.path().join("a");
    let node = NodeProc::start(&data, &["--config", cfg.to_str().unwrap(), "--role", "replica"]);
    let s = status(&node.api);
    assert_eq!((s["cluster"].as_str(), s["role"].as_str()), (Some("blue"), Some("replica")), "{s}");
    drop(node);

    // A file's role, overridden on the command line; its value limit applies.
    let cfg = dir.path().join("small.toml");
    std::fs::write(&cfg, "role = \"replica\"\nmax-value-bytes = 8\nno-mdns = true\n").unwrap();
    let node = NodeProc::start(&dir.path().join("b"), &["--config", cfg.to_str().unwrap(), "--role", "primary"]);
    assert_eq!(status(&node.api)["role"], "primary");
    let (ok, _, err) = cli(&["put", "r", "k", "more than eight bytes", "--api", &node.api]);
    assert!(!ok && err.contains("value_too_large"), "{err}");
    drop(node);

    // Unknown keys and bad values stop the node, naming them.
    for (text, named) in [
        ("max-value-byte = 8\n", "max-value-byte"),
        ("max-value-bytes = \"lots\"\n", "max-value-bytes"),
        ("no-mdns = \"yes\"\n", "no-mdns"),
        ("listen = 4001\n", "listen"),
        ("role = [\"primary\"]\n", "role"),
        ("not toml at all", "not valid TOML"),
    ] {
        std::fs::write(&cfg, text).unwrap();
        let data = dir.path().join("c");
        let (ok, _, err) = cli(&["node", "--data-dir", data.to_str().unwrap(), "--config", cfg.to_str().unwrap()]);
        assert!(!ok && err.contains(named), "{text:?}: {err}");
    }
    let (ok, _, err) = cli(&["node", "--config", "/nonexistent/peersync.toml"]);
    assert!(!ok && err.contains("/nonexistent/peersync.toml"), "{err}");
}

/// Short gossip, discovery and attestation intervals, and the tombstone horizon given (ms).
fn gc_flags(horizon_ms: &str) -> [&str; 8] {
    [
        "--gossip-heartbeat-ms",
        "100",
        "--discovery-interval-ms",
        "300",
        "--attest-interval-ms",
        "200",
        "--tombstone-horizon-ms",
        horizon_ms,
    ]
}

/// Posts one batch of register writes (`Some(value)`) and deletes (`None`) of `keys` to `node`.
fn write_batch(node: &NodeProc, keys: impl Iterator<Item = u32>, value: Option<&str>) {
    let entries: Vec<Value> = keys
        .map(|i| match value {
            Some(v) => serde_json::json!({"key": format!("k{i}"), "value": v}),
            None => serde_json::json!({"key": format!("k{i}"), "delete": true}),
        })
        .collect();
    let body = serde_json::json!({ "entries": entries }).to_string();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let resp =
        rt.block_on(reqwest::Client::new().post(format!("{}/v1/registers/gc", node.api)).body(body).send()).unwrap();
    let code = resp.status();
    assert_eq!(code, 200, "{}", rt.block_on(resp.text()).unwrap());
}

/// Waits until every node holds the same version vector (of `ops` ops) and state root, and holds no
/// tombstone: every delete was collected.
fn wait_collected_everywhere(nodes: &[&NodeProc], ops: u64, deadline: std::time::Duration) {
    common::wait_sync("equal vectors and roots, and no tombstone left", deadline, || {
        let s: Vec<Value> = nodes.iter().map(|n| status(&n.api)).collect();
        let total =
            |s: &Value| s["version_vector"].as_object().unwrap().values().filter_map(Value::as_u64).sum::<u64>();
        let summary = || {
            s.iter()
                .map(|s| {
                    format!(
                        "{} ops, {} tombstones, root {}, held back: {}",
                        total(s),
                        s["tombstones"],
                        s["state_root"],
                        s["sync"]["tombstone_holdback"]
                    )
                })
                .collect::<Vec<_>>()
                .join("; ")
        };
        let equal = s.windows(2).all(|w| w[0]["version_vector"] == w[1]["version_vector"]);
        let roots = s.windows(2).all(|w| w[0]["state_root"] == w[1]["state_root"]);
        if equal && roots && total(&s[0]) == ops && s.iter().all(|s| s["tombstones"] == 0) {
            Ok(())
        } else {
            Err(summary())
        }
    });
}

/// The number of live keys in register `gc` on `node` (up to 100).
fn live_keys(node: &NodeProc) -> usize {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let page: Value = rt
        .block_on(async { reqwest::get(format!("{}/v1/registers/gc?limit=100", node.api)).await.unwrap().json().await })
        .unwrap();
    page["entries"].as_array().unwrap().len()
}

/// 100,000 keys written, then deleted on two primaries: every node collects every tombstone, and the
/// three roots stay equal throughout the collection.
#[test]
fn tombstones_of_100k_deletes_are_collected_on_every_node() {
    let dir = tempfile::tempdir().unwrap();
    let fast = gc_flags("600000");
    let a = NodeProc::start(&dir.path().join("a"), &fast);
    let a_addr = bootstrap_addr(&a);
    let b = NodeProc::start(&dir.path().join("b"), &[&fast[..], &["--bootstrap", &a_addr]].concat());
    let c =
        NodeProc::start(&dir.path().join("c"), &[&fast[..], &["--bootstrap", &a_addr, "--role", "replica"]].concat());
    wait_active(&c);
    const KEYS: u32 = 100_000;
    const BATCH: u32 = 10_000;
    for start in (0..KEYS).step_by(BATCH as usize) {
        write_batch(&a, start..start + BATCH, Some("v"));
    }
    // Deletes on B stamp after the writes only once B holds them.
    common::wait_sync("B holds A's writes", std::time::Duration::from_secs(120), || {
        let (sa, sb) = (status(&a.api), status(&b.api));
        if sa["version_vector"] == sb["version_vector"] {
            Ok(())
        } else {
            Err(format!("{} against {}", sa["version_vector"], sb["version_vector"]))
        }
    });
    let started = std::time::Instant::now();
    for start in (0..KEYS).step_by(BATCH as usize) {
        let node = if start % (2 * BATCH) == 0 { &a } else { &b };
        write_batch(node, start..start + BATCH, None);
    }
    wait_collected_everywhere(&[&a, &b, &c], 2 * KEYS as u64, std::time::Duration::from_secs(180));
    println!("100k deletes collected on 3 nodes {:.1} s after the first delete", started.elapsed().as_secs_f64());
    for node in [&a, &b, &c] {
        assert_eq!(live_keys(node), 0);
        let s = status(&node.api);
        assert_ne!(s["sync"]["tombstones_collected_through"], "0.0", "{s}");
        // The gauge follows the store on the node's next tick.
        common::wait_sync("peersync_tombstones at 0", std::time::Duration::from_secs(30), || {
            match metric_value(&node.api, "peersync_tombstones ") {
                0 => Ok(()),
                n => Err(n.to_string()),
            }
        });
    }
    for node in [a, b, c] {
        assert!(node.terminate().success());
    }
}

/// A primary away for longer than the tombstone horizon while keys were deleted and collected comes
/// back: the deletes reach it, no deleted key comes back anywhere, its own write survives, and the
/// three roots agree with no tombstone left.
#[test]
fn a_node_back_after_the_horizon_brings_no_deleted_key_back() {
    let dir = tempfile::tempdir().unwrap();
    let fast = gc_flags("2000");
    let a = NodeProc::start(&dir.path().join("a"), &fast);
    let a_addr = bootstrap_addr(&a);
    let b = NodeProc::start(&dir.path().join("b"), &[&fast[..], &["--bootstrap", &a_addr]].concat());
    let c_dir = dir.path().join("c");
    let c_args: Vec<&str> = [&fast[..], &["--bootstrap", &a_addr]].concat();
    let c = NodeProc::start(&c_dir, &c_args);
    wait_active(&c);
    write_batch(&a, 0..1_000, Some("v"));
    write_batch(&c, 5_000..5_001, Some("c's own"));
    wait_collected_everywhere(&[&a, &b, &c], 1_001, std::time::Duration::from_secs(60));

    assert!(c.terminate().success());
    write_batch(&a, 0..500, None);
    // A and B collect without C once C has been silent for the horizon.
    wait_collected_everywhere(&[&a, &b], 1_501, std::time::Duration::from_secs(60));

    let c = NodeProc::start(&c_dir, &c_args);
    wait_collected_everywhere(&[&a, &b, &c], 1_501, std::time::Duration::from_secs(60));
    for node in [&a, &b, &c] {
        let (ok, _, err) = cli(&["get", "gc", "k0", "--api", &node.api]);
        assert!(!ok && err.contains("not_found"), "a deleted key came back on {}: {err}", node.api);
        let (ok, out, err) = cli(&["get", "gc", "k999", "--api", &node.api]);
        assert!(ok && out == "v\n", "{err}");
        let (ok, out, err) = cli(&["get", "gc", "k5000", "--api", &node.api]);
        assert!(ok && out == "c's own\n", "{err}");
    }
    for node in [a, b, c] {
        assert!(node.terminate().success());
    }
}

/// The binary has its allocator commit memory as it uses it, so that what a burst freed goes back
/// to the kernel (an idle node's RSS), unless `MIMALLOC_ARENA_EAGER_COMMIT` says otherwise.
/// mimalloc lists the options it runs with on a verbose start.
#[test]
fn the_allocator_commits_its_arena_on_demand_unless_the_environment_says_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let eager_commit = |env: &[(&str, &str)]| {
        let out = std::process::Command::new(common::process::BIN)
            .args(["id", "--data-dir"])
            .arg(dir.path())
            .env("MIMALLOC_VERBOSE", "1")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let line = stderr.lines().find(|l| l.contains("option 'arena_eager_commit'"));
        line.unwrap_or_else(|| panic!("no arena_eager_commit in mimalloc's options:\n{stderr}")).trim().to_owned()
    };
    assert_eq!(eager_commit(&[]), "option 'arena_eager_commit': 0");
    assert_eq!(eager_commit(&[("MIMALLOC_ARENA_EAGER_COMMIT", "2")]), "option 'arena_eager_commit': 2");
}

#[test]
fn progress_follows_an_origin_until_a_seq_and_ends_when_the_node_stops() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    use std::sync::mpsc;
    use std::time::Duration;

    let dir = tempfile::tempdir().unwrap();
    let node = NodeProc::start(&dir.path().join("n"), &[]);
    let put = |key: &str| -> u64 {
        let (ok, out, err) = cli(&["put", "docs", key, "v", "--api", &node.api]);
        assert!(ok, "{err}");
        serde_json::from_str::<Value>(&out).unwrap()["seq"].as_u64().unwrap()
    };
    // Lines of a follower, read on a thread so that every wait has a deadline.
    let follow = |args: &[&str]| {
        let mut child = Command::new(common::process::BIN)
            .arg("progress")
            .args(args)
            .args(["--api", &node.api])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let _ = tx.send(serde_json::from_str::<Value>(&line.unwrap()).expect("a JSON line"));
            }
        });
        (child, rx)
    };
    let exit_of = |child: &mut std::process::Child| {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                let mut err = String::new();
                std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
                return (status, err);
            }
            assert!(std::time::Instant::now() < deadline, "the follower did not exit within 30 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let first = put("a");

    // Started before the seq it waits for exists: it prints where the origin stands, then each advance.
    let until = (first + 2).to_string();
    let (mut waiter, lines) = follow(&["--origin", &node.peer_id, "--until", &until]);
    let line = lines.recv_timeout(Duration::from_secs(30)).expect("the current seq at once");
    assert_eq!((line["origin"].as_str(), line["seq"].as_u64()), (Some(node.peer_id.as_str()), Some(first)));
    put("b");
    put("c");
    let (status, err) = exit_of(&mut waiter);
    assert!(status.success(), "{err}");
    let seqs: Vec<u64> = lines.try_iter().map(|l| l["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]) && seqs.last() == Some(&(first + 2)), "{seqs:?}");

    // --until needs --origin; a bad origin is the node's 400.
    let (ok, _, err) = cli(&["progress", "--until", "3", "--api", &node.api]);
    assert!(!ok && err.contains("--origin"), "{err}");
    let (ok, _, err) = cli(&["progress", "--origin", "nope", "--api", &node.api]);
    assert!(!ok && err.contains("invalid_query"), "{err}");

    // A follower without --until runs until the node stops, which does not wait for it.
    let (mut open, lines) = follow(&[]);
    lines.recv_timeout(Duration::from_secs(30)).expect("a first line");
    let log = node.data_dir.with_extension("log");
    let exit = node.terminate();
    assert!(exit.success(), "SIGTERM must shut down cleanly, got {exit:?}");
    let log = std::fs::read_to_string(log).unwrap();
    assert!(!log.contains("did not stop"), "the server waited on the stream: {log}");
    let (status, err) = exit_of(&mut open);
    assert!(!status.success() && err.contains("ended the progress stream"), "{status:?}: {err}");
}
