//! A running node: opens the store, starts the writer, and hands out a [`NodeHandle`].
//!
//! This is the only module that joins the layers: store, sync and net meet here. Everything else
//! talks to the node through the cloneable handle.

mod config;
mod error;
mod events;
mod handle;
pub mod identity;
mod metrics;
pub(crate) mod validate;

use std::sync::Arc;

use tokio::sync::broadcast;

use crate::op::Signer;
use crate::store::Store;

pub use config::{ConfigError, Limits, NodeConfig, Role};
pub use error::NodeError;
pub use events::NodeEvent;
pub use handle::{LeaseInfo, NodeHandle, Status, SyncState, WriteReceipt};
pub use metrics::Metrics;

/// File name of the database inside the data dir.
pub const DATABASE_FILE: &str = "state.redb";

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// A started node. Dropping it without [`Node::shutdown`] leaves the writer to stop once every
/// handle is gone.
pub struct Node {
    handle: NodeHandle,
    writer_thread: std::thread::JoinHandle<()>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Node {
    /// Opens the data dir and starts the node. Must be called within a tokio runtime.
    pub async fn start(config: NodeConfig) -> Result<Node, StartError> {
        config.validate()?;
        let keypair = identity::load_or_create(&config.data_dir)?;
        let path = config.data_dir.join(DATABASE_FILE);
        let store = tokio::task::spawn_blocking(move || Store::open(&path)).await.expect("store open task")?;
        let signer = Signer::new(keypair.clone());
        let peer_id = signer.origin();

        let (commit_tx, commit_rx) = broadcast::channel(1024);
        let (writer, writer_thread) = store.spawn_writer(signer, config.writer.clone(), commit_tx);
        let (events, _) = broadcast::channel(4096);
        let metrics = Arc::new(Metrics::default());
        metrics.applied_total.set(store.version_vector().total() as i64);
        let tasks = vec![tokio::spawn(events::forward(commit_rx, events.clone(), metrics.clone()))];

        tracing::info!(%peer_id, role = %config.role, cluster = %config.cluster, data_dir = %config.data_dir.display(), "node started");
        let inner = handle::Inner { peer_id, config, store, writer, events, metrics };
        Ok(Node { handle: NodeHandle { inner: Arc::new(inner) }, writer_thread, tasks })
    }

    pub fn handle(&self) -> NodeHandle {
        self.handle.clone()
    }

    /// Commits every write already queued, stops the writer and the node's tasks. The database file
    /// closes once the last [`NodeHandle`] is dropped too.
    pub async fn shutdown(self) {
        self.handle.inner.writer.stop().await;
        let join = self.writer_thread;
        let _ = tokio::task::spawn_blocking(move || join.join()).await;
        for t in self.tasks {
            t.abort();
        }
        tracing::info!(peer_id = %self.handle.inner.peer_id, "node stopped");
    }
}
