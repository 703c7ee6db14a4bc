//! `GET /v1/progress`: a stream of what this node has applied, one JSON line per origin each time
//! that origin's applied seq advances (the push counterpart of a read's `?after=` long-poll, as
//! etcd's watch or Redis's keyspace notifications are to polling).
//!
//! A line `{"origin":O,"seq":N,"token":"O:N"}` says that every op of `O` up to `N` is applied here
//! and readable. The first lines give each origin's current seq. Lines are coalesced, never
//! queued: a reader slower than the commits sees seq jump, so an open stream holds one version
//! vector whatever the write rate. At most `limits.max_progress_streams` are open at once; the
//! stream ends when the server shuts down.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use super::error::ApiError;
use super::http::{params, Params};
use crate::ids::Origin;
use crate::node::NodeHandle;
use crate::store::VersionVector;

/// What the progress handler shares across requests: the stream permits (one more stream than
/// `limits.max_progress_streams` is refused with 503 `too_many_streams`), and the server's
/// shutdown (`None` for a router served without one).
#[derive(Clone)]
pub(super) struct Streams {
    permits: Arc<Semaphore>,
    closing: Option<watch::Receiver<bool>>,
}

impl Streams {
    pub fn new(max: usize, closing: Option<watch::Receiver<bool>>) -> Self {
        Streams { permits: Arc::new(Semaphore::new(max)), closing }
    }
}

pub(super) async fn progress(
    State(node): State<NodeHandle>,
    Extension(streams): Extension<Streams>,
    q: Params,
) -> Result<Response, ApiError> {
    let q = params(q)?;
    let only = match q.get("origin") {
        None => None,
        Some(o) => Some(
            o.parse::<Origin>()
                .map_err(|_| ApiError::bad_request("invalid_query", format!("origin={o:?} is not a valid peer id")))?,
        ),
    };
    let permit = streams.permits.clone().try_acquire_owned().map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_streams",
            format!("{} progress streams are open already", node.config().limits.max_progress_streams),
        )
    })?;
    let feed = Feed {
        applied: node.store().watch_version_vector(),
        sent: VersionVector::default(),
        names: HashMap::new(),
        only,
        closing: streams.closing,
        _permit: permit,
    };
    let lines = futures::stream::unfold(feed, |mut feed| async move {
        let chunk = feed.next().await?;
        Some((Ok::<_, Infallible>(chunk), feed))
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson"), (header::CACHE_CONTROL, "no-cache")],
        Body::from_stream(lines),
    )
        .into_response())
}

/// One open stream: what it has sent so far and what it follows.
struct Feed {
    applied: watch::Receiver<VersionVector>,
    sent: VersionVector,
    /// Each origin's peer id as text, as written so far (one per origin in the version vector).
    names: HashMap<Origin, String>,
    only: Option<Origin>,
    closing: Option<watch::Receiver<bool>>,
    _permit: OwnedSemaphorePermit,
}

impl Feed {
    /// The lines of the origins that advanced since the last call, once there are any; `None`
    /// once the server shuts down or the node's store is gone.
    async fn next(&mut self) -> Option<Bytes> {
        loop {
            let lines = {
                let now = self.applied.borrow_and_update();
                let mut lines = String::new();
                for (origin, seq) in now.advanced_since(&self.sent) {
                    if self.only.is_none_or(|o| o == *origin) {
                        // Base58 is costly enough to show in a profile at a line per op: once per origin.
                        let name = self.names.entry(*origin).or_insert_with(|| origin.to_string());
                        let _ = writeln!(lines, r#"{{"origin":"{name}","seq":{seq},"token":"{name}:{seq}"}}"#);
                    }
                }
                self.sent = now.clone();
                lines
            };
            if !lines.is_empty() {
                return Some(Bytes::from(lines));
            }
            let closing_rx = &mut self.closing;
            let closing = async {
                match closing_rx {
                    Some(rx) => {
                        let _ = rx.wait_for(|closing| *closing).await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                changed = self.applied.changed() => changed.ok()?,
                () = closing => return None,
            }
        }
    }
}
