//! How the lease group's Raft node is configured, and where raft-rs's log records go.

use super::{ELECTION_TICKS, HEARTBEAT_TICKS, MAX_MSG_BYTES};

pub(super) fn config(id: u64, applied: u64) -> raft::Config {
    raft::Config {
        id,
        applied,
        heartbeat_tick: HEARTBEAT_TICKS,
        election_tick: ELECTION_TICKS,
        check_quorum: true,
        pre_vote: true,
        max_size_per_msg: MAX_MSG_BYTES,
        max_inflight_msgs: 64,
        ..raft::Config::default()
    }
}

pub(super) fn logger() -> slog::Logger {
    slog::Logger::root(TracingDrain, slog::o!())
}

/// Sends raft-rs's log records to `tracing`, a level lower: its info is our debug.
struct TracingDrain;

impl slog::Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &slog::Record<'_>, _: &slog::OwnedKVList) -> Result<(), slog::Never> {
        match record.level() {
            slog::Level::Critical | slog::Level::Error => tracing::warn!(target: "peersync::raft", "{}", record.msg()),
            slog::Level::Warning => tracing::info!(target: "peersync::raft", "{}", record.msg()),
            slog::Level::Info => tracing::debug!(target: "peersync::raft", "{}", record.msg()),
            _ => tracing::trace!(target: "peersync::raft", "{}", record.msg()),
        }
        Ok(())
    }
}
