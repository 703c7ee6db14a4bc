//! The lease service's log writer: a thread that commits each [`LeaseLogWrite`] the engine asks
//! for, in order, and reports back, so the event loop never waits on the disk. Raft messages the
//! engine sends after a write are held by the event loop until that write is reported durable.

use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};

use tokio::sync::mpsc;

use super::event_loop::Command;
use crate::store::{LeaseLog, LeaseLogWrite};

/// Writes queued at most; a disk that falls this far behind stops the lease group on this node.
const QUEUE: usize = 4096;

/// Hands writes to the thread.
pub(crate) struct LeaseLogWriter {
    tx: SyncSender<(u64, LeaseLogWrite)>,
}

impl LeaseLogWriter {
    /// Starts the thread; it reports [`Command::LeasePersisted`] after each write.
    pub fn spawn(log: LeaseLog, commands: mpsc::Sender<Command>) -> LeaseLogWriter {
        let (tx, rx) = sync_channel::<(u64, LeaseLogWrite)>(QUEUE);
        std::thread::Builder::new()
            .name("lease-log".into())
            .spawn(move || {
                while let Ok((seq, write)) = rx.recv() {
                    let result = log.write(&write).map_err(|e| e.to_string());
                    let failed = result.is_err();
                    if commands.blocking_send(Command::LeasePersisted { seq, result }).is_err() || failed {
                        break;
                    }
                }
            })
            .expect("spawn the lease log thread");
        LeaseLogWriter { tx }
    }

    /// Queues a write; an error means it will never be written.
    pub fn write(&self, seq: u64, write: LeaseLogWrite) -> Result<(), String> {
        self.tx.try_send((seq, write)).map_err(|e| match e {
            TrySendError::Full(_) => format!("{QUEUE} lease log writes are queued: the disk is not keeping up"),
            TrySendError::Disconnected(_) => "the lease log writer stopped after an error".to_owned(),
        })
    }
}
