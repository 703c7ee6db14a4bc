//! Node configuration: every knob with its default and a `validate()`. The CLI maps onto it one to one.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::store::WriterConfig;

/// What a node does in its cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Accepts writes; the origin of ops.
    Primary,
    /// Read-only; keeps and serves the op log so other replicas can sync from it.
    Replica,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Primary => "primary",
            Role::Replica => "replica",
        })
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "primary" => Ok(Role::Primary),
            "replica" => Ok(Role::Replica),
            other => Err(format!("unknown role {other:?}: expected primary or replica")),
        }
    }
}

/// Sizes of what clients may send. Bigger input is refused with a clear error, never truncated.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest register value in bytes. Default 1 MiB.
    pub max_value_bytes: usize,
    /// Largest key in bytes. Default 1 KiB.
    pub max_key_bytes: usize,
    /// Largest HTTP request body (a batch write) in bytes. Default 16 MiB.
    pub max_body_bytes: usize,
    /// Most entries in one batch write. Default 10 000.
    pub max_batch_entries: usize,
    /// Most entries in one listing page. Default 1 000.
    pub max_list_limit: usize,
    /// Longest a read may wait for `after` tokens, in ms. Default 60 000.
    pub max_wait_ms: u64,
    /// Longest lease TTL in ms. Default one day.
    pub max_lease_ttl_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_value_bytes: 1 << 20,
            max_key_bytes: 1024,
            max_body_bytes: 16 << 20,
            max_batch_entries: 10_000,
            max_list_limit: 1_000,
            max_wait_ms: 60_000,
            max_lease_ttl_ms: 24 * 3600 * 1000,
        }
    }
}

/// Everything a node needs to start.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Holds the identity key (`identity.key`) and the database (`state.redb`). Default `./peersync-data`.
    pub data_dir: PathBuf,
    /// Address of the HTTP API. Default `127.0.0.1:7700`; port 0 picks a free port.
    pub api_addr: SocketAddr,
    /// Default primary.
    pub role: Role,
    /// Nodes only sync with nodes of the same cluster. Default `default`.
    pub cluster: String,
    pub limits: Limits,
    pub writer: WriterConfig,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            data_dir: PathBuf::from("./peersync-data"),
            api_addr: SocketAddr::from(([127, 0, 0, 1], 7700)),
            role: Role::Primary,
            cluster: "default".into(),
            limits: Limits::default(),
            writer: WriterConfig::default(),
        }
    }
}

/// A configuration value that cannot work.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

impl NodeConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        crate::node::validate::name("cluster", &self.cluster).map_err(|e| ConfigError(e.to_string()))?;
        let l = &self.limits;
        if l.max_value_bytes == 0 || l.max_key_bytes == 0 || l.max_batch_entries == 0 || l.max_list_limit == 0 {
            return Err(ConfigError("limits must be greater than zero".into()));
        }
        if l.max_body_bytes < l.max_value_bytes {
            return Err(ConfigError(format!(
                "max_body_bytes ({}) must be at least max_value_bytes ({})",
                l.max_body_bytes, l.max_value_bytes
            )));
        }
        let w = &self.writer;
        if w.queue == 0 || w.max_group_ops == 0 || w.batch_max_ops == 0 || w.batch_max_bytes == 0 {
            return Err(ConfigError("writer limits must be greater than zero".into()));
        }
        Ok(())
    }
}
