//! The HTTP API against a node on port 0: every endpoint, and every kind of bad input gets a JSON
//! error with a 4xx status.

mod common;

use peersync::node::{Node, Role};
use reqwest::{Client, Method, StatusCode};
use serde_json::{json, Value};

struct Api {
    base: String,
    http: Client,
    _node: Node,
    _dir: tempfile::TempDir,
}

async fn api(role: Role) -> Api {
    let (node, dir) = common::start_node(|c| c.net.role = role).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(peersync::api::serve(listener, node.handle(), std::future::pending()));
    Api { base, http: Client::new(), _node: node, _dir: dir }
}

impl Api {
    async fn call(&self, method: Method, path: &str, body: impl Into<reqwest::Body>) -> (StatusCode, Vec<u8>) {
        let resp = self.http.request(method, format!("{}{path}", self.base)).body(body).send().await.unwrap();
        (resp.status(), resp.bytes().await.unwrap().to_vec())
    }

    async fn json(&self, method: Method, path: &str, body: impl Into<reqwest::Body>) -> (StatusCode, Value) {
        let (status, bytes) = self.call(method, path, body).await;
        let value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| panic!("{path}: not JSON: {:?}", String::from_utf8_lossy(&bytes)));
        (status, value)
    }

    /// Asserts a JSON error with `status` and `code`.
    async fn expect_error(
        &self,
        method: Method,
        path: &str,
        body: impl Into<reqwest::Body>,
        status: StatusCode,
        code: &str,
    ) -> Value {
        let (got, value) = self.json(method.clone(), path, body).await;
        assert_eq!((got, value["error"].as_str()), (status, Some(code)), "{method} {path}: {value}");
        assert!(value["message"].as_str().is_some_and(|m| !m.is_empty()), "{path}: error without a message: {value}");
        value
    }
}

#[tokio::test]
async fn registers_round_trip_over_http() {
    let api = api(Role::Primary).await;
    let (status, put) = api.json(Method::PUT, "/v1/registers/users/alice", "hello").await;
    assert_eq!(status, StatusCode::OK);
    for field in ["origin", "seq", "cid", "token"] {
        assert!(!put[field].is_null(), "PUT answer lacks {field}: {put}");
    }
    let token = put["token"].as_str().unwrap().to_owned();
    assert_eq!(token, format!("{}:{}", put["origin"].as_str().unwrap(), put["seq"]));

    let (status, body) = api.call(Method::GET, "/v1/registers/users/alice", "").await;
    assert_eq!((status, body.as_slice()), (StatusCode::OK, &b"hello"[..]));
    let (status, body) =
        api.call(Method::GET, &format!("/v1/registers/users/alice?after={token}&timeout_ms=1000"), "").await;
    assert_eq!((status, body.as_slice()), (StatusCode::OK, &b"hello"[..]));
    // Keys may hold slashes and escapes.
    api.json(Method::PUT, "/v1/registers/users/a%2Fb/c", "slashed").await;
    assert_eq!(api.call(Method::GET, "/v1/registers/users/a%2Fb/c", "").await.1, b"slashed");

    let (status, del) = api.json(Method::DELETE, "/v1/registers/users/alice", "").await;
    assert_eq!(status, StatusCode::OK);
    assert!(del["token"].is_string());
    api.expect_error(Method::GET, "/v1/registers/users/alice", "", StatusCode::NOT_FOUND, "not_found").await;

    let batch = json!({"entries": [{"key": "k1", "value": "v1"}, {"key": "k2", "value_base64": "/wA="}, {"key": "k3", "value": "v3"}]});
    let (status, last) = api.json(Method::POST, "/v1/registers/users", batch.to_string()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(last["seq"], json!(put["seq"].as_u64().unwrap() + 5), "the token of the batch's last op");
    assert_eq!(api.call(Method::GET, "/v1/registers/users/k2", "").await.1, vec![0xff, 0x00]);

    let (_, page) = api.json(Method::GET, "/v1/registers/users?prefix=k&limit=2", "").await;
    assert_eq!(page["entries"], json!([{"key": "k1", "value": "v1"}, {"key": "k2", "value_base64": "/wA="}]));
    assert_eq!(page["next_after"], json!("k2"));
    let (_, page) = api.json(Method::GET, "/v1/registers/users?prefix=k&limit=2&after=k2", "").await;
    assert_eq!(page["entries"], json!([{"key": "k3", "value": "v3"}]));
    assert_eq!(page["next_after"], Value::Null);
}

#[tokio::test]
async fn counters_leases_status_and_metrics_over_http() {
    let api = api(Role::Primary).await;
    let (_, c) = api.json(Method::POST, "/v1/counters/hits/home", r#"{"delta": 5}"#).await;
    assert_eq!(c["value"], json!(5));
    api.json(Method::POST, "/v1/counters/hits/home", r#"{"delta": -2}"#).await;
    assert_eq!(api.json(Method::GET, "/v1/counters/hits/home", "").await.1, json!({"value": 3}));

    let (status, l) =
        api.json(Method::POST, "/v1/leases/locks/db/acquire", r#"{"holder": "w1", "ttl_ms": 60000}"#).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(l["holder"].as_str(), Some("w1"));
    let token = l["token"].as_u64().expect("a fencing token");
    assert!(l["expires_at_ms"].as_u64().unwrap() > 0);
    let held = api
        .expect_error(
            Method::POST,
            "/v1/leases/locks/db/acquire",
            r#"{"holder": "w2"}"#,
            StatusCode::CONFLICT,
            "lease_held",
        )
        .await;
    // The grantors hold the lease a little longer than its holder is told it lasts.
    let grantors = l["expires_at_ms"].as_u64().unwrap() + peersync::sync::leases::LEASE_CLOCK_DRIFT_MS;
    assert_eq!((held["holder"].as_str(), held["expires_at_ms"].as_u64()), (Some("w1"), Some(grantors)));
    assert!(held["message"].as_str().unwrap().contains("w1"), "{held}");
    let (status, _) = api.json(Method::POST, "/v1/leases/locks/db/renew", r#"{"holder": "w1", "ttl_ms": 1000}"#).await;
    assert_eq!(status, StatusCode::OK);
    api.expect_error(
        Method::POST,
        "/v1/leases/locks/db/release",
        r#"{"holder": "w2"}"#,
        StatusCode::CONFLICT,
        "not_holder",
    )
    .await;
    let (_, rel) = api.json(Method::POST, "/v1/leases/locks/db/release", r#"{"holder": "w1"}"#).await;
    assert_eq!(rel["holder"], Value::Null);
    let (_, state) = api.json(Method::GET, "/v1/leases/locks/db", "").await;
    assert_eq!((state["holder"].clone(), state["token"].clone()), (Value::Null, json!(token)));

    let (status, s) = api.json(Method::GET, "/v1/status", "").await;
    assert_eq!(status, StatusCode::OK);
    for field in
        ["peer_id", "role", "state", "cluster", "listen_addrs", "version_vector", "state_root", "peers", "sync"]
    {
        assert!(s.get(field).is_some(), "status lacks {field}: {s}");
    }
    assert_eq!(s["version_vector"][s["peer_id"].as_str().unwrap()], json!(5));
    assert_eq!(s["state"], json!("active"));
    assert_eq!(s["state_root"].as_str().unwrap().len(), 64);

    let (status, metrics) = api.call(Method::GET, "/metrics", "").await;
    assert_eq!(status, StatusCode::OK);
    let text = String::from_utf8(metrics).unwrap();
    assert!(text.contains("peersync_ops_local_total"), "{text}");
}

#[tokio::test]
async fn every_bad_input_gets_a_json_4xx() {
    let api = api(Role::Primary).await;
    let bad = StatusCode::BAD_REQUEST;
    // Invalid JSON and wrong types.
    api.expect_error(Method::POST, "/v1/registers/r", "{not json", bad, "invalid_json").await;
    api.expect_error(Method::POST, "/v1/registers/r", r#"{"entries": "x"}"#, bad, "invalid_json").await;
    api.expect_error(Method::POST, "/v1/registers/r", r#"{"entries": [{"key": "k"}]}"#, bad, "invalid_json").await;
    api.expect_error(
        Method::POST,
        "/v1/registers/r",
        r#"{"entries": [{"key": "k", "value": "v", "value_base64": "dg=="}]}"#,
        bad,
        "invalid_json",
    )
    .await;
    api.expect_error(
        Method::POST,
        "/v1/registers/r",
        r#"{"entries": [{"key": "k", "value_base64": "%%%"}]}"#,
        bad,
        "invalid_json",
    )
    .await;
    api.expect_error(Method::POST, "/v1/registers/r", r#"{"entries": []}"#, bad, "invalid_input").await;
    api.expect_error(Method::POST, "/v1/counters/c/k", r#"{"delta": "five"}"#, bad, "invalid_json").await;
    api.expect_error(Method::POST, "/v1/counters/c/k", r#"{"delta": 1.5}"#, bad, "invalid_json").await;
    api.expect_error(Method::POST, "/v1/counters/c/k", "", bad, "invalid_json").await;
    api.expect_error(Method::POST, "/v1/leases/l/k/acquire", r#"{"holder": 7}"#, bad, "invalid_json").await;
    api.expect_error(Method::POST, "/v1/leases/l/k/acquire", r#"{"holder": "h", "ttl_ms": -1}"#, bad, "invalid_json")
        .await;
    api.expect_error(Method::POST, "/v1/leases/l/k/acquire", r#"{"holder": "h", "ttl_ms": 0}"#, bad, "invalid_input")
        .await;
    // Unknown lease verb.
    api.expect_error(Method::POST, "/v1/leases/l/k/steal", r#"{"holder": "h"}"#, bad, "unknown_lease_verb").await;
    // Malformed tokens and query values.
    api.expect_error(Method::GET, "/v1/registers/r/k?after=nonsense", "", bad, "invalid_token").await;
    api.expect_error(Method::GET, "/v1/registers/r/k?after=12D3KooWabc:1", "", bad, "invalid_token").await;
    let me = api.json(Method::GET, "/v1/status", "").await.1["peer_id"].as_str().unwrap().to_owned();
    api.expect_error(Method::GET, &format!("/v1/registers/r/k?after={me}:0"), "", bad, "invalid_token").await;
    api.expect_error(Method::GET, &format!("/v1/registers/r/k?after={me}:1,junk"), "", bad, "invalid_token").await;
    api.expect_error(Method::GET, "/v1/registers/r/k?timeout_ms=soon", "", bad, "invalid_query").await;
    api.expect_error(Method::GET, "/v1/registers/r/k?stale=maybe", "", bad, "invalid_query").await;
    api.expect_error(Method::GET, "/v1/registers/r?limit=0", "", bad, "invalid_input").await;
    api.expect_error(Method::GET, "/v1/registers/r?limit=many", "", bad, "invalid_query").await;
    // A write that never comes: 504 at the deadline, naming what is missing.
    let missing = api
        .expect_error(
            Method::GET,
            &format!("/v1/registers/r/k?after={me}:99&timeout_ms=50"),
            "",
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
        )
        .await;
    assert_eq!(missing["missing"], json!([format!("{me}:99")]));
    // Names, oversized values and bodies.
    api.expect_error(Method::PUT, "/v1/registers/bad%20name/k", "v", bad, "invalid_input").await;
    api.expect_error(Method::PUT, &format!("/v1/registers/r/{}", "k".repeat(2000)), "v", bad, "invalid_input").await;
    api.expect_error(
        Method::PUT,
        "/v1/registers/r/big",
        vec![0u8; 64 * 1024 + 1],
        StatusCode::PAYLOAD_TOO_LARGE,
        "value_too_large",
    )
    .await;
    api.expect_error(
        Method::PUT,
        "/v1/registers/r/huge",
        vec![0u8; 256 * 1024 + 1],
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    )
    .await;
    let big_batch = json!({"entries": [{"key": "k", "value": "x".repeat(300 * 1024)}]}).to_string();
    api.expect_error(Method::POST, "/v1/registers/r", big_batch, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
        .await;
    // Unknown endpoints and methods.
    api.expect_error(Method::GET, "/v2/nothing", "", StatusCode::NOT_FOUND, "not_found").await;
    api.expect_error(Method::PATCH, "/v1/status", "", StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed").await;
    api.expect_error(Method::GET, "/v1/leases/l/none", "", StatusCode::NOT_FOUND, "not_found").await;
    // None of it wrote anything.
    assert_eq!(api.json(Method::GET, "/v1/status", "").await.1["version_vector"], json!({}));
}

#[tokio::test]
async fn replica_refuses_writes_over_http() {
    let api = api(Role::Replica).await;
    let e = api.expect_error(Method::PUT, "/v1/registers/r/k", "v", StatusCode::FORBIDDEN, "read_only_replica").await;
    assert!(e["primaries"].is_array(), "{e}");
    api.expect_error(Method::POST, "/v1/counters/c/k", r#"{"delta": 1}"#, StatusCode::FORBIDDEN, "read_only_replica")
        .await;
}

/// With an API token every endpoint answers 401 `unauthorized` without `Authorization: Bearer`,
/// `/metrics` included unless it is public; the right token gets through.
#[tokio::test]
async fn an_api_token_guards_every_endpoint() {
    for metrics_public in [false, true] {
        let (node, _dir) = common::start_node(|c| {
            c.api_token = Some("s3cret-token".into());
            c.metrics_public = metrics_public;
        })
        .await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(peersync::api::serve(listener, node.handle(), std::future::pending()));
        let http = Client::new();
        let paths = [
            (Method::PUT, "/v1/registers/r/k"),
            (Method::GET, "/v1/registers/r/k"),
            (Method::GET, "/v1/status"),
            (Method::POST, "/v1/snapshots"),
            (Method::GET, "/no/such/endpoint"),
        ];
        for (method, path) in &paths {
            for auth in [None, Some("Bearer wrong-token"), Some("Basic s3cret-token")] {
                let mut req = http.request(method.clone(), format!("{base}{path}")).body("v");
                if let Some(a) = auth {
                    req = req.header("authorization", a);
                }
                let resp = req.send().await.unwrap();
                assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{method} {path} with {auth:?}");
                let body: Value = resp.json().await.unwrap();
                assert_eq!(body["error"], "unauthorized", "{body}");
            }
        }
        let ok = http.put(format!("{base}/v1/registers/r/k")).bearer_auth("s3cret-token").body("v").send().await;
        assert_eq!(ok.unwrap().status(), StatusCode::OK);
        let got = http.get(format!("{base}/v1/registers/r/k")).bearer_auth("s3cret-token").send().await.unwrap();
        assert_eq!(got.bytes().await.unwrap().as_ref(), b"v");
        let metrics = http.get(format!("{base}/metrics")).send().await.unwrap().status();
        let want = if metrics_public { StatusCode::OK } else { StatusCode::UNAUTHORIZED };
        assert_eq!(metrics, want, "metrics_public = {metrics_public}");
        node.shutdown().await;
    }
}

/// The next complete line of an NDJSON stream, as JSON; `None` once the stream ends. Fails after 10 s.
async fn next_line(resp: &mut reqwest::Response, buf: &mut Vec<u8>) -> Option<Value> {
    let deadline = std::time::Duration::from_secs(10);
    loop {
        if let Some(end) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=end).collect();
            return Some(serde_json::from_slice(&line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?}")));
        }
        match tokio::time::timeout(deadline, resp.chunk()).await.expect("a progress line within 10 s") {
            Ok(Some(chunk)) => buf.extend_from_slice(&chunk),
            Ok(None) | Err(_) => {
                assert!(buf.is_empty(), "stream ended inside a line: {buf:?}");
                return None;
            }
        }
    }
}

#[tokio::test]
async fn progress_streams_each_origins_applied_seq_and_ends_at_shutdown() {
    let (node, _dir) = common::start_node(|c| c.limits.max_progress_streams = 2).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(peersync::api::serve(listener, node.handle(), async {
        let _ = stopped.await;
    }));
    let http = Client::new();
    let put = |key: &'static str| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            let resp = http.put(format!("{base}/v1/registers/r/{key}")).body("v").send().await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            resp.json::<Value>().await.unwrap()
        }
    };
    let first = put("a").await;
    let origin = first["origin"].as_str().unwrap().to_owned();

    let mut all = http.get(format!("{base}/v1/progress")).send().await.unwrap();
    assert_eq!(all.status(), StatusCode::OK);
    assert_eq!(all.headers()["content-type"], "application/x-ndjson");
    let mut buf = Vec::new();
    // The first line is where the origin stands now.
    let line = next_line(&mut all, &mut buf).await.expect("a first line");
    assert_eq!(line, json!({"origin": origin, "seq": first["seq"], "token": first["token"]}));

    // Later writes show up in order (consecutive ones may be coalesced into one line), and what a
    // line names is readable at once.
    put("b").await;
    let last = put("c").await;
    let mut seq = first["seq"].as_u64().unwrap();
    while seq < last["seq"].as_u64().unwrap() {
        let line = next_line(&mut all, &mut buf).await.expect("a line per advance");
        assert_eq!(line["origin"], origin.as_str());
        let now = line["seq"].as_u64().unwrap();
        assert!(now > seq, "seq went from {seq} to {now}");
        seq = now;
        let token = line["token"].as_str().unwrap();
        let read = http.get(format!("{base}/v1/registers/r/a?after={token}&timeout_ms=0")).send().await.unwrap();
        assert_eq!(read.status(), StatusCode::OK, "{token} was announced but is not readable");
    }
    assert_eq!(seq, last["seq"].as_u64().unwrap());

    // `origin=` follows one origin; a bad one is refused before any stream is opened.
    let mut mine = http.get(format!("{base}/v1/progress?origin={origin}")).send().await.unwrap();
    let mut mine_buf = Vec::new();
    assert_eq!(next_line(&mut mine, &mut mine_buf).await.unwrap()["seq"], last["seq"]);
    let bad = http.get(format!("{base}/v1/progress?origin=nope")).send().await.unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    assert_eq!(bad.json::<Value>().await.unwrap()["error"], "invalid_query");

    // Two streams are the configured most; a third is refused until one of them goes away.
    let third = http.get(format!("{base}/v1/progress")).send().await.unwrap();
    assert_eq!(third.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(third.json::<Value>().await.unwrap()["error"], "too_many_streams");
    drop(mine);
    let mut again =
        common::eventually("a stream slot freed by a client that left", std::time::Duration::from_secs(10), || {
            let (http, base) = (http.clone(), base.clone());
            async move {
                let resp = http.get(format!("{base}/v1/progress")).send().await.unwrap();
                if resp.status() == StatusCode::OK {
                    Ok(resp)
                } else {
                    Err(resp.status().to_string())
                }
            }
        })
        .await;
    assert_eq!(next_line(&mut again, &mut Vec::new()).await.unwrap()["seq"], last["seq"]);

    // Shutting the server down ends open streams, so the graceful shutdown does not wait on them.
    stop.send(()).unwrap();
    assert_eq!(next_line(&mut all, &mut buf).await, None);
    tokio::time::timeout(std::time::Duration::from_secs(10), server)
        .await
        .expect("the server stops with streams open")
        .unwrap()
        .unwrap();
}
