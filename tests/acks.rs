//! Writes acknowledged by other nodes (`?ack=N|majority|all&timeout_ms=T`, as Redis `WAIT`),
//! over HTTP and the library, with real nodes on loopback: the answer comes once that many other
//! nodes hold the write (checked on them the moment it comes), a 504 with `acked` at the deadline
//! leaves the write in place, and bad parameters write nothing.

mod common;

use std::time::Duration;

use common::{dial_addr, eventually, holds};
use peersync::node::{Node, NodeConfig, Role};
use peersync::sync::AckWanted;
use reqwest::{Client, StatusCode};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(30);

/// A primary with an HTTP API and two replicas bootstrapped to it.
async fn star() -> (Vec<Node>, Vec<tempfile::TempDir>, String) {
    common::init_tracing();
    let mut nodes: Vec<Node> = Vec::new();
    let mut dirs = Vec::new();
    for role in [Role::Primary, Role::Replica, Role::Replica] {
        let dir = tempfile::tempdir().unwrap();
        let mut config = NodeConfig::local(dir.path());
        config.net.role = role;
        if let Some(first) = nodes.first() {
            config.net.bootstrap = vec![dial_addr(&first.handle()).await];
        }
        nodes.push(Node::start(config).await.unwrap());
        dirs.push(dir);
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(peersync::api::serve(listener, nodes[0].handle(), std::future::pending()));
    let a = nodes[0].handle();
    eventually("the primary to see both replicas", DEADLINE, || async {
        let s = a.net_status().await.map_err(|e| e.to_string())?;
        let n = s.peers.iter().filter(|p| p.connected && p.role.is_some()).count();
        if n >= 2 {
            Ok(())
        } else {
            Err(format!("{n} identified peers"))
        }
    })
    .await;
    (nodes, dirs, base)
}

async fn call(method: reqwest::Method, url: String, body: &str) -> (StatusCode, Value) {
    let resp = Client::new().request(method, url).body(body.to_owned()).send().await.unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_with_ack_answers_once_that_many_other_nodes_hold_it() {
    let (nodes, _dirs, base) = star().await;
    let (b, c) = (nodes[1].handle(), nodes[2].handle());
    for i in 0..20 {
        let (status, body) =
            call(reqwest::Method::PUT, format!("{base}/v1/registers/r/all{i}?ack=all&timeout_ms=10000"), "v").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["acked"], 2, "{body}");
        // At the moment of the answer, not eventually.
        let key = format!("all{i}");
        assert!(holds(&b, key.as_bytes()).await && holds(&c, key.as_bytes()).await, "acknowledged before it was held");
    }
    let (status, body) =
        call(reqwest::Method::POST, format!("{base}/v1/counters/c/k?ack=majority"), r#"{"delta": 5}"#).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["acked"].as_u64().is_some_and(|n| n >= 1), "{body}");
    assert_eq!(body["value"], 5);
    let (status, body) = call(
        reqwest::Method::POST,
        format!("{base}/v1/leases/l/k/acquire?ack=1&timeout_ms=10000"),
        r#"{"holder": "h", "ttl_ms": 60000}"#,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["acked"].as_u64().is_some_and(|n| n >= 1), "{body}");
    let (status, body) = call(reqwest::Method::DELETE, format!("{base}/v1/registers/r/all0?ack=2"), "").await;
    assert_eq!((status, body["acked"].as_u64()), (StatusCode::OK, Some(2)), "{body}");
    let (status, body) = call(
        reqwest::Method::POST,
        format!("{base}/v1/registers/r?ack=all"),
        r#"{"entries": [{"key": "b1", "value": "x"}, {"key": "b2", "value": "y"}]}"#,
    )
    .await;
    assert_eq!((status, body["acked"].as_u64()), (StatusCode::OK, Some(2)), "{body}");
    assert!(holds(&b, b"b2").await && holds(&c, b"b2").await);

    // The library's form.
    let a = nodes[0].handle();
    let receipt = a.put("r", b"lib".to_vec(), b"v".to_vec()).await.unwrap();
    assert_eq!(a.wait_for_acks(receipt.seq, AckWanted::Peers(2), DEADLINE).await.unwrap(), 2);
    assert!(holds(&b, b"lib").await && holds(&c, b"lib").await);
    for n in nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_deadline_the_answer_is_504_with_acked_and_the_write_stays() {
    let (nodes, _dirs, base) = star().await;
    let a = nodes[0].handle();
    // Three other nodes asked, two exist.
    let (status, body) =
        call(reqwest::Method::PUT, format!("{base}/v1/registers/r/short?ack=3&timeout_ms=300"), "v").await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert_eq!(body["error"], "timeout", "{body}");
    assert_eq!(body["acked"], 2, "{body}");
    assert!(holds(&a, b"short").await, "the write was lost on a timeout");
    // A replica gone: `all` then counts the one left (open mode counts connected peers), and an
    // explicit 2 times out with 1.
    let mut nodes = nodes;
    nodes.pop().unwrap().shutdown().await;
    eventually("the primary to see one replica", DEADLINE, || async {
        let s = a.net_status().await.map_err(|e| e.to_string())?;
        let n = s.peers.iter().filter(|p| p.connected).count();
        if n == 1 {
            Ok(())
        } else {
            Err(format!("{n} connected"))
        }
    })
    .await;
    let (status, body) =
        call(reqwest::Method::PUT, format!("{base}/v1/registers/r/two?ack=2&timeout_ms=300"), "v").await;
    assert_eq!((status, body["acked"].as_u64()), (StatusCode::GATEWAY_TIMEOUT, Some(1)), "{body}");
    let (status, body) = call(reqwest::Method::PUT, format!("{base}/v1/registers/r/all?ack=all"), "v").await;
    assert_eq!((status, body["acked"].as_u64()), (StatusCode::OK, Some(1)), "{body}");
    for n in nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_ack_parameters_are_refused_and_write_nothing() {
    let (nodes, _dirs, base) = star().await;
    let a = nodes[0].handle();
    for query in ["ack=some", "ack=-1", "timeout_ms=100", "ack=1&timeout_ms=soon", "ack=1&timeout_ms=99999999"] {
        let (status, body) = call(reqwest::Method::PUT, format!("{base}/v1/registers/r/bad?{query}"), "v").await;
        assert_eq!(
            (status, body["error"].as_str()),
            (StatusCode::BAD_REQUEST, Some("invalid_query")),
            "{query}: {body}"
        );
    }
    assert!(!holds(&a, b"bad").await, "a refused write was written");
    for n in nodes {
        n.shutdown().await;
    }
}
