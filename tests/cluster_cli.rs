//! The cluster authority through the real binary: `peersync cluster init|admit|revoke|handover`
//! and nodes run with `--authority --cert`. A provider moves from OLD to NEW while writes go on;
//! nothing acknowledged is lost, and OLD's writes after the revocation appear nowhere.

mod common;

use std::path::Path;
use std::time::Duration;

use common::process::{bootstrap_addr, cli, status, NodeProc};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(60);

/// Makes the node's identity and a primary certificate for it; returns the node's flags.
fn admit(key: &Path, data: &Path, authority: &str) -> Vec<String> {
    let (ok, peer, err) = cli(&["id", "--data-dir", data.to_str().unwrap()]);
    assert!(ok, "{err}");
    let cert = data.with_extension("cert");
    let (ok, _, err) = cli(&[
        "cluster",
        "admit",
        "--key",
        key.to_str().unwrap(),
        peer.trim(),
        "--role",
        "primary",
        "--valid-for",
        "1h",
        "--out",
        cert.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let fast = ["--gossip-heartbeat-ms", "100", "--discovery-interval-ms", "300", "--digest-min-ms", "100"];
    let mut flags: Vec<String> = fast.iter().map(|s| s.to_string()).collect();
    flags.extend(["--authority".into(), authority.to_owned(), "--cert".into(), cert.to_str().unwrap().to_owned()]);
    flags
}

fn start(data: &Path, flags: &[String], bootstrap: Option<&str>) -> NodeProc {
    let mut args: Vec<&str> = flags.iter().map(String::as_str).collect();
    if let Some(b) = bootstrap {
        args.extend(["--bootstrap", b]);
    }
    NodeProc::start(data, &args)
}

fn put(node: &NodeProc, key: &str) {
    let (ok, _, err) = cli(&["put", "moves", key, &format!("value of {key}"), "--api", &node.api]);
    assert!(ok, "put {key} on {}: {err}", node.api);
}

fn holds(node: &NodeProc, key: &str) -> bool {
    cli(&["get", "moves", key, "--stale", "--api", &node.api]).0
}

#[test]
fn handover_moves_a_provider_without_losing_a_write_and_cuts_the_old_one_off() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("authority.key");
    let (ok, out, err) = cli(&["cluster", "init", "--key", key.to_str().unwrap()]);
    assert!(ok, "{err}");
    let authority = out.trim().strip_prefix("authority: ").expect("prints the authority").to_owned();
    let (again, _, err) = cli(&["cluster", "init", "--key", key.to_str().unwrap()]);
    assert!(!again && err.contains("never overwritten"), "{err}");

    let (da, dold, dnew) = (dir.path().join("a"), dir.path().join("old"), dir.path().join("new"));
    let a = start(&da, &admit(&key, &da, &authority), None);
    let a_addr = bootstrap_addr(&a);
    let old = start(&dold, &admit(&key, &dold, &authority), Some(&a_addr));
    let new = start(&dnew, &admit(&key, &dnew, &authority), Some(&a_addr));

    // The certified primaries are the lease group's voters.
    let voters = |node: &NodeProc| -> Vec<String> {
        let v = status(&node.api)["sync"]["leases"]["voters"].clone();
        v.as_array().map(|a| a.iter().filter_map(|p| p.as_str().map(str::to_owned)).collect()).unwrap_or_default()
    };
    common::wait_sync("three voters in the lease group", DEADLINE, || {
        let v = voters(&a);
        if v.len() == 3 && v.contains(&old.peer_id) {
            Ok(())
        } else {
            Err(format!("{v:?}"))
        }
    });

    let mut written = Vec::new();
    for i in 0..20 {
        let k = format!("old-{i}");
        put(&old, &k);
        written.push(k);
    }
    // Writers move to NEW; the handover runs while they write.
    let handover = {
        let (key, api, o, n) = (key.clone(), a.api.clone(), old.peer_id.clone(), new.peer_id.clone());
        std::thread::spawn(move || {
            cli(&["cluster", "handover", "--key", key.to_str().unwrap(), &o, &n, "--timeout", "1m", "--api", &api])
        })
    };
    for i in 0..20 {
        let k = format!("new-{i}");
        put(&new, &k);
        written.push(k);
    }
    let (ok, out, err) = handover.join().unwrap();
    assert!(ok, "handover failed: {err}");
    assert!(out.contains(&old.peer_id), "{out}");
    for i in 20..30 {
        let k = format!("new-{i}");
        put(&new, &k);
        written.push(k);
    }
    for node in [&a, &new] {
        common::wait_sync("every acknowledged write on the members", DEADLINE, || {
            let missing: Vec<&String> = written.iter().filter(|k| !holds(node, k)).collect();
            if missing.is_empty() {
                Ok(())
            } else {
                Err(format!("{} missing on {}, e.g. {}", missing.len(), node.api, missing[0]))
            }
        });
    }
    // OLD is revoked everywhere and cut off; what it writes now reaches no member.
    let members = |node: &NodeProc| -> Value {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            reqwest::get(format!("{}/v1/cluster/members", node.api)).await.unwrap().json::<Value>().await.unwrap()
        })
    };
    for node in [&a, &new] {
        common::wait_sync("OLD to show as revoked", DEADLINE, || {
            let m = members(node);
            let entry = m["members"].as_array().unwrap().iter().find(|e| e["peer_id"] == old.peer_id.as_str()).cloned();
            match entry {
                Some(e) if e["revoked"] == true && e["connected"] == false => Ok(()),
                other => {
                    let log = node.log();
                    let lines: Vec<&str> =
                        log.lines().filter(|l| l.contains("revok") || l.contains("digest")).collect();
                    Err(format!("on {}: {other:?}\n{}", node.api, lines.join("\n")))
                }
            }
        });
    }
    // Revoked, OLD is no longer a voter; the two left are a majority and grant leases.
    for node in [&a, &new] {
        common::wait_sync("OLD removed from the lease group's voters", DEADLINE, || {
            let v = voters(node);
            if v.len() == 2 && !v.contains(&old.peer_id) {
                Ok(())
            } else {
                Err(format!("{v:?}"))
            }
        });
    }
    let (ok, out, err) = cli(&["lease", "acquire", "locks", "db", "--holder", "w1", "--api", &new.api]);
    assert!(ok, "the remaining voters grant: {err}");
    assert!(out.contains("\"token\""), "{out}");
    put(&old, "after-revocation");
    // Let the cluster run: NEW writes, and A must apply NEW's write but never OLD's.
    put(&new, "marker");
    common::wait_sync("the marker on A", DEADLINE, || if holds(&a, "marker") { Ok(()) } else { Err("no".into()) });
    assert!(!holds(&a, "after-revocation") && !holds(&new, "after-revocation"), "a revoked origin's write arrived");
    for n in [a, old, new] {
        assert!(n.terminate().success());
    }
}
