//! The HTTP API of DESIGN.md on axum: a thin adapter over [`NodeHandle`].
//!
//! Every handler parses its own input so that every bad input gets a JSON error with a 4xx status
//! (axum's default rejections are plain text).

use std::collections::HashMap;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::serve::ListenerExt;
use axum::{Extension, Json, Router};
use base64::Engine;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::json;

use super::error::ApiError;
use super::progress::{self, Streams};
use crate::crdt::LeaseRequest;
use crate::ids::Token;
use crate::node::{NodeError, NodeHandle, SyncState};
use crate::sync::AckWanted;

/// Default wait for `?after=` when `timeout_ms` is not given.
const DEFAULT_WAIT_MS: u64 = 5_000;
/// Default page size of a listing.
const DEFAULT_LIST_LIMIT: usize = 100;
/// Default lease TTL when a request names none.
const DEFAULT_LEASE_TTL_MS: u64 = 10_000;

pub(super) type Params = Result<Query<HashMap<String, String>>, QueryRejection>;
type Body = Result<Bytes, BytesRejection>;

/// The API's routes over a node.
pub fn router(node: NodeHandle) -> Router {
    routes(node, None)
}

/// The routes; `closing` turns true when the server starts to shut down (see [`Streams`]).
fn routes(node: NodeHandle, closing: Option<tokio::sync::watch::Receiver<bool>>) -> Router {
    let body_limit = node.config().limits.max_body_bytes;
    let streams = Streams::new(node.config().limits.max_progress_streams, closing);
    Router::new()
        .route("/v1/registers/{reg}", post(batch_write).get(list_register))
        .route("/v1/registers/{reg}/{*key}", put(put_register).get(get_register).delete(delete_register))
        .route("/v1/counters/{ctr}/{key}", post(counter_add).get(counter_get))
        .route("/v1/leases/{lease}/{key}", get(lease_get))
        .route("/v1/leases/{lease}/{key}/{verb}", post(lease_verb))
        .route("/v1/snapshots", post(snapshot_create).get(snapshot_list))
        .route("/v1/status", get(status))
        .route("/v1/progress", get(progress::progress))
        .route("/v1/sync/serve-alone", post(serve_alone))
        .route("/v1/cluster/members", get(members))
        .route("/v1/cluster/revocations", post(revoke))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint; see the HTTP API in README.md")
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this endpoint does not take that method",
            )
        })
        .layer(Extension(streams))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(middleware::from_fn_with_state(node.clone(), authorize))
        .with_state(node)
}

/// With an API token configured, lets a request through only with `Authorization: Bearer TOKEN`
/// (`/metrics` too, unless it is public). Compared in constant time.
async fn authorize(State(node): State<NodeHandle>, request: axum::extract::Request, next: Next) -> Response {
    let config = node.config();
    let Some(token) = config.api_token.as_deref() else { return next.run(request).await };
    if config.metrics_public && request.uri().path() == "/metrics" {
        return next.run(request).await;
    }
    if bearer(request.headers()).is_some_and(|given| constant_time_eq(given.as_bytes(), token.as_bytes())) {
        return next.run(request).await;
    }
    let mut response = ApiError::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "this node's API needs `Authorization: Bearer TOKEN` (the CLI reads PEERSYNC_API_TOKEN)",
    )
    .into_response();
    response.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
    response
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token.trim())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Serves the API on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    node: NodeHandle,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // Progress streams never end by themselves: they end when the server starts to shut down, so
    // that the graceful shutdown does not wait for them.
    let (closing_tx, closing) = tokio::sync::watch::channel(false);
    let shutdown = async move {
        shutdown.await;
        let _ = closing_tx.send(true);
    };
    // No Nagle delay: a progress stream's small lines would otherwise wait for the client's delayed
    // ACK (up to 40 ms on Linux) whenever an earlier line is unacknowledged.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY on an API connection");
        }
    });
    axum::serve(listener, routes(node, Some(closing))).with_graceful_shutdown(shutdown).await
}

fn path<T>(p: Result<Path<T>, PathRejection>) -> Result<T, ApiError> {
    p.map(|Path(t)| t).map_err(|e| ApiError::bad_request("invalid_path", e.body_text()))
}

pub(super) fn params(q: Params) -> Result<HashMap<String, String>, ApiError> {
    q.map(|Query(m)| m).map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))
}

fn body(b: Body) -> Result<Bytes, ApiError> {
    b.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "request body exceeds the configured maximum",
            )
        } else {
            ApiError::bad_request("invalid_body", e.body_text())
        }
    })
}

fn json_body<T: DeserializeOwned>(b: Body) -> Result<T, ApiError> {
    let bytes = body(b)?;
    serde_json::from_slice(&bytes).map_err(|e| ApiError::bad_request("invalid_json", format!("request body: {e}")))
}

fn number<T: std::str::FromStr>(q: &HashMap<String, String>, name: &str) -> Result<Option<T>, ApiError> {
    q.get(name)
        .map(|v| {
            v.parse().map_err(|_| ApiError::bad_request("invalid_query", format!("{name}={v:?} is not a valid number")))
        })
        .transpose()
}

fn flag(q: &HashMap<String, String>, name: &str) -> Result<bool, ApiError> {
    match q.get(name).map(String::as_str) {
        None | Some("false") | Some("0") => Ok(false),
        Some("true") | Some("1") | Some("") => Ok(true),
        Some(v) => Err(ApiError::bad_request("invalid_query", format!("{name}={v:?} must be true or false"))),
    }
}

/// `?ack=N|majority|all&timeout_ms=T` of a write (as Redis `WAIT`). Parsed before the write, so
/// a bad one writes nothing.
struct AckParam {
    wanted: AckWanted,
    timeout: Duration,
}

fn ack_param(node: &NodeHandle, q: Params) -> Result<Option<AckParam>, ApiError> {
    let q = params(q)?;
    let Some(ack) = q.get("ack") else {
        if q.contains_key("timeout_ms") {
            return Err(ApiError::bad_request("invalid_query", "timeout_ms on a write needs ack=N|majority|all"));
        }
        return Ok(None);
    };
    let wanted = ack.parse::<AckWanted>().map_err(|e| ApiError::bad_request("invalid_query", e))?;
    let timeout_ms: u64 = number(&q, "timeout_ms")?.unwrap_or(DEFAULT_WAIT_MS);
    let max = node.config().limits.max_wait_ms;
    if timeout_ms > max {
        return Err(ApiError::bad_request("invalid_query", format!("timeout_ms must be at most {max}")));
    }
    Ok(Some(AckParam { wanted, timeout: Duration::from_millis(timeout_ms) }))
}

/// A write's answer: `body`, with `acked` once as many other nodes as asked have applied the write
/// up to `seq`; 504 `timeout` with `acked` when they have not by the deadline.
async fn with_acks(
    node: &NodeHandle,
    body: impl serde::Serialize,
    seq: u64,
    ack: Option<AckParam>,
) -> Result<Response, ApiError> {
    let mut body = serde_json::to_value(body)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    if let Some(a) = ack {
        let acked = node.wait_for_acks(seq, a.wanted, a.timeout).await?;
        body["acked"] = acked.into();
    }
    Ok(Json(body).into_response())
}

/// JSON for a stored value: `value` when it is UTF-8, `value_base64` otherwise.
fn value_json(value: &[u8]) -> (&'static str, String) {
    match std::str::from_utf8(value) {
        Ok(s) => ("value", s.to_owned()),
        Err(_) => ("value_base64", base64::engine::general_purpose::STANDARD.encode(value)),
    }
}

async fn put_register(
    State(node): State<NodeHandle>,
    p: Result<Path<(String, String)>, PathRejection>,
    q: Params,
    b: Body,
) -> Result<Response, ApiError> {
    let (reg, key) = path(p)?;
    let ack = ack_param(&node, q)?;
    let value = body(b)?;
    let receipt = node.put(&reg, key, value.to_vec()).await?;
    let seq = receipt.seq;
    with_acks(&node, receipt, seq, ack).await
}

async fn delete_register(
    State(node): State<NodeHandle>,
    p: Result<Path<(String, String)>, PathRejection>,
    q: Params,
) -> Result<Response, ApiError> {
    let (reg, key) = path(p)?;
    let ack = ack_param(&node, q)?;
    let receipt = node.delete(&reg, key).await?;
    let seq = receipt.seq;
    with_acks(&node, receipt, seq, ack).await
}

async fn get_register(
    State(node): State<NodeHandle>,
    p: Result<Path<(String, String)>, PathRejection>,
    q: Params,
) -> Result<Response, ApiError> {
    let (reg, key) = path(p)?;
    let q = params(q)?;
    let stale = flag(&q, "stale")?;
    let timeout_ms: Option<u64> = number(&q, "timeout_ms")?;
    let max_wait = node.config().limits.max_wait_ms;
    if timeout_ms.is_some_and(|t| t > max_wait) {
        return Err(ApiError::bad_request("invalid_query", format!("timeout_ms must be at most {max_wait}")));
    }
    if let Some(after) = q.get("after") {
        let tokens = after
            .split(',')
            .map(|t| t.parse::<Token>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ApiError::bad_request("invalid_token", e.to_string()))?;
        node.wait_applied(&tokens, Duration::from_millis(timeout_ms.unwrap_or(DEFAULT_WAIT_MS))).await?;
    }
    if !stale && node.sync_state() == SyncState::Syncing {
        return Err(NodeError::Syncing.into());
    }
    match node.get(&reg, key.as_bytes()).await? {
        Some(v) => Ok(([(header::CONTENT_TYPE, "application/octet-stream")], v).into_response()),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no value for key {key:?} in register {reg:?}"),
        )),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchBody {
    entries: Vec<BatchEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchEntry {
    key: String,
    value: Option<String>,
    value_base64: Option<String>,
    /// `true`: delete the key (with neither value field).
    #[serde(default)]
    delete: bool,
}

async fn batch_write(
    State(node): State<NodeHandle>,
    p: Result<Path<String>, PathRejection>,
    q: Params,
    b: Body,
) -> Result<Response, ApiError> {
    let reg = path(p)?;
    let ack = ack_param(&node, q)?;
    let batch: BatchBody = json_body(b)?;
    let mut entries = Vec::with_capacity(batch.entries.len());
    for (i, e) in batch.entries.into_iter().enumerate() {
        let value = match (e.value, e.value_base64, e.delete) {
            (Some(v), None, false) => Some(v.into_bytes()),
            (None, Some(b64), false) => {
                Some(base64::engine::general_purpose::STANDARD.decode(b64).map_err(|err| {
                    ApiError::bad_request("invalid_json", format!("entries[{i}].value_base64: {err}"))
                })?)
            }
            (None, None, true) => None,
            _ => {
                return Err(ApiError::bad_request(
                    "invalid_json",
                    format!("entries[{i}] needs exactly one of value, value_base64 and \"delete\": true"),
                ))
            }
        };
        entries.push((e.key.into_bytes(), value));
    }
    let receipt = node.write_batch(&reg, entries).await?;
    let seq = receipt.seq;
    with_acks(&node, receipt, seq, ack).await
}

async fn list_register(
    State(node): State<NodeHandle>,
    p: Result<Path<String>, PathRejection>,
    q: Params,
) -> Result<Response, ApiError> {
    let reg = path(p)?;
    let q = params(q)?;
    let limit = number(&q, "limit")?.unwrap_or(DEFAULT_LIST_LIMIT);
    let prefix = q.get("prefix").map(String::as_bytes).unwrap_or_default();
    let after = q.get("after").map(String::as_bytes);
    let page = node.list(&reg, prefix, after, limit).await?;
    let entries: Vec<_> = page
        .entries
        .iter()
        .map(|(k, v)| {
            let (field, value) = value_json(v);
            json!({ "key": String::from_utf8_lossy(k), field: value })
        })
        .collect();
    let next_after = page.next_after.map(|k| String::from_utf8_lossy(&k).into_owned());
    Ok(Json(json!({ "entries": entries, "next_after": next_after })).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CounterBody {
    delta: i64,
}

async fn counter_add(
    State(node): State<NodeHandle>,
    p: Result<Path<(String, String)>, PathRejection>,
    q: Params,
    b: Body,
) -> Result<Response, ApiError> {
    let (ctr, key) = path(p)?;
    let ack = ack_param(&node, q)?;
    let CounterBody { delta } = json_body(b)?;
    let (value, write) = node.counter_add(&ctr, key, delta).await?;
    let body =
        json!({ "value": value, "origin": write.origin, "seq": write.seq, "cid": write.cid, "token": write.token });
    with_acks(&node, body, write.seq, ack).await
}

async fn counter_get(
    State(node): State<NodeHandle>,
    p: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, ApiError> {
    let (ctr, key) = path(p)?;
    Ok(Json(json!({ "value": node.counter_get(&ctr, key.as_bytes()).await? })).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LeaseBody {
    holder: String,
    ttl_ms: Option<u64>,
}

async fn lease_verb(
    State(node): State<NodeHandle>,
    p: Result<Path<(String, String, String)>, PathRejection>,
    q: Params,
    b: Body,
) -> Result<Response, ApiError> {
    let (lease, key, verb) = path(p)?;
    let ack = ack_param(&node, q)?;
    if !matches!(verb.as_str(), "acquire" | "renew" | "release") {
        return Err(ApiError::bad_request(
            "unknown_lease_verb",
            format!("unknown lease verb {verb:?}: use acquire, renew or release"),
        ));
    }
    let LeaseBody { holder, ttl_ms } = json_body(b)?;
    let ttl_ms = ttl_ms.unwrap_or(DEFAULT_LEASE_TTL_MS);
    let request = match verb.as_str() {
        "acquire" => LeaseRequest::Acquire { holder, ttl_ms },
        "renew" => LeaseRequest::Renew { holder, ttl_ms },
        _ => LeaseRequest::Release { holder },
    };
    let info = node.lease(&lease, key, request).await?;
    let seq = info.write.seq;
    let body = json!({
        "holder": info.holder,
        "token": info.token,
        "expires_at_ms": info.expires_at_ms,
        "write": info.write,
    });
    with_acks(&node, body, seq, ack).await
}

async fn lease_get(
    State(node): State<NodeHandle>,
    p: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, ApiError> {
    let (lease, key) = path(p)?;
    match node.lease_state(&lease, key.as_bytes()).await? {
        Some(s) => {
            Ok(Json(json!({ "holder": s.holder, "token": s.token, "expires_at_ms": s.expires_at_ms })).into_response())
        }
        None => Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("lease {lease:?} has no key {key:?}"))),
    }
}

async fn snapshot_create(State(node): State<NodeHandle>) -> Result<Response, ApiError> {
    Ok(Json(node.create_snapshot().await?).into_response())
}

async fn snapshot_list(State(node): State<NodeHandle>) -> Result<Response, ApiError> {
    Ok(Json(json!({ "snapshots": node.list_snapshots().await? })).into_response())
}

async fn members(State(node): State<NodeHandle>) -> Result<Response, ApiError> {
    let members = node.net_status().await?.members;
    Ok(Json(match members {
        Some(m) => json!(m),
        // Open mode: no authority, and no member list to speak of.
        None => json!({ "authority": null, "members": [] }),
    })
    .into_response())
}

/// Body: a revocation in its text form (`peersync cluster revoke` makes and posts it).
async fn revoke(State(node): State<NodeHandle>, b: Body) -> Result<Response, ApiError> {
    let text = String::from_utf8(body(b)?.to_vec())
        .map_err(|_| ApiError::bad_request("invalid_revocation", "the body is not UTF-8 text"))?;
    let revocation = crate::cert::Revocation::from_text(&text)
        .map_err(|e| ApiError::bad_request("invalid_revocation", format!("not a revocation: {e}")))?;
    let peer = revocation.peer.to_string();
    let last_seq = revocation.last_seq.0;
    node.revoke(revocation).await?;
    Ok(Json(json!({ "revoked": peer, "last_seq": last_seq })).into_response())
}

async fn serve_alone(State(node): State<NodeHandle>) -> Result<Response, ApiError> {
    node.serve_alone().await?;
    Ok(Json(json!({ "state": node.sync_state() })).into_response())
}

async fn status(State(node): State<NodeHandle>) -> Result<Response, ApiError> {
    Ok(Json(node.status().await?).into_response())
}

async fn metrics(State(node): State<NodeHandle>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], node.metrics().render()).into_response()
}
