//! Adapters over [`crate::node::NodeHandle`]: the HTTP API (server) and the client the CLI uses.
//!
//! Must never depend on: the store's or the network's internals; only on the node's handle.

pub mod client;
mod error;
mod http;
mod progress;

pub use error::ApiError;
pub use http::{router, serve};
