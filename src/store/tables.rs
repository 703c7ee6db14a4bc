//! Every redb table peersync keeps, in one place. Each name carries a format version (`_v1`) so a
//! later format can migrate table by table. Byte layouts are described beside each constant; integers
//! inside values are big-endian.

use redb::TableDefinition;

use crate::crdt::Hlc;
use crate::snapshot::Kind;

/// Op log, one row per signed batch (see `log.rs`). Key: (origin peer id bytes, seq of the batch's
/// last op, which has a signed head in `HEADS`). Value: the batch's ops in order, each as the 32-byte
/// chain hash after it, a 4-byte length and its canonical bytes. The rows of an origin hold seqs
/// `floor+1 ..= vv[origin]`, contiguous.
pub(crate) const OPLOG: TableDefinition<(&[u8], u64), &[u8]> = TableDefinition::new("oplog_v2");

/// The op log of format v1: one row per op. Key: (origin peer id bytes, seq). Value: 32-byte chain
/// hash after the op, then the op's bytes. Moved into `OPLOG` at open.
pub(crate) const OPLOG_V1: TableDefinition<(&[u8], u64), &[u8]> = TableDefinition::new("oplog_v1");

/// Ops held in `OPLOG` per origin. Key: origin peer id bytes. Value: count.
pub(crate) const LOG_COUNTS: TableDefinition<&[u8], u64> = TableDefinition::new("log_counts_v1");

/// Signed heads. Key: (origin peer id bytes, seq). Value: the origin's 64-byte ed25519 signature over
/// its chain hash at that seq (the chain hash itself is in `OPLOG`). One per batch the origin signed.
pub(crate) const HEADS: TableDefinition<(&[u8], u64), &[u8]> = TableDefinition::new("signed_heads_v1");

/// Register state. Key: (register name, key bytes). Value: postcard `crdt::RegisterValue`.
pub(crate) const REGISTERS: TableDefinition<(&str, &[u8]), &[u8]> = TableDefinition::new("registers_v1");

/// Counter state. Key: (counter name, key bytes). Value: postcard `crdt::PnCounter`.
pub(crate) const COUNTERS: TableDefinition<(&str, &[u8]), &[u8]> = TableDefinition::new("counters_v1");

/// Lease state. Key: (lease name, key bytes). Value: postcard `crdt::LeaseState`.
pub(crate) const LEASES: TableDefinition<(&str, &[u8]), &[u8]> = TableDefinition::new("leases_v1");

/// Version vector. Key: origin peer id bytes. Value: 8-byte highest contiguous seq applied, then the
/// 32-byte chain hash at that seq.
pub(crate) const VERSION_VECTOR: TableDefinition<&[u8], &[u8]> = TableDefinition::new("version_vector_v1");

/// Log floors. Key: origin peer id bytes. Value: highest seq compacted out of `OPLOG` (0 = none).
pub(crate) const LOG_FLOORS: TableDefinition<&[u8], u64> = TableDefinition::new("log_floors_v1");

/// Index of register tombstones by stamp, so collecting those up to a stamp is a range scan. Key:
/// (HLC wall ms, HLC logical, register name, key bytes) of each tombstone in `REGISTERS`. Value: none.
pub(crate) const TOMBSTONES: TableDefinition<(u64, u32, &str, &[u8]), ()> = TableDefinition::new("tombstones_v1");

/// The key of a tombstone in `TOMBSTONES` (and `STAGE_TOMBSTONES`): its stamp, then its register
/// and key.
pub(crate) fn tombstone_key<'a>(stamp: Hlc, register: &'a str, key: &'a [u8]) -> (u64, u32, &'a str, &'a [u8]) {
    (stamp.wall_ms, stamp.logical, register, key)
}

/// State-root buckets (see `buckets.rs`). Key: row index, 0..64. Value: the 32-byte hashes of the
/// row's 64 buckets in order, each the XOR of the entry hashes in the bucket.
pub(crate) const BUCKET_ROWS: TableDefinition<u32, &[u8]> = TableDefinition::new("state_bucket_rows_v3");

/// State-root buckets of formats 1 and 2, one per row. Key: bucket index. Value: 32-byte hash. Moved
/// into `BUCKET_ROWS` at open.
pub(crate) const BUCKETS_V1: TableDefinition<u32, &[u8]> = TableDefinition::new("state_buckets_v1");

/// Where older builds kept snapshot chunks (in the state database, then in a chunk database of
/// their own). Key: chunk CID bytes. Value: the compressed chunk. Read only to move them into files
/// at open (see `chunk_files.rs`).
pub(crate) const SNAPSHOT_CHUNKS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("snapshot_chunks_v1");

/// Snapshots held. Key: manifest CID bytes. Value: postcard `snapshot::SignedManifest`, verified before
/// it was stored. Every chunk a held manifest lists is held as a file (see `chunk_files.rs`).
pub(crate) const SNAPSHOTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("snapshots_v1");

/// Order in which snapshots were stored here (created or installed). Key: increasing number. Value:
/// manifest CID bytes. The last entry is the latest snapshot.
pub(crate) const SNAPSHOT_ORDER: TableDefinition<u64, &[u8]> = TableDefinition::new("snapshot_order_v1");

/// Node metadata. Key: one of the `META_*` names. Value: as described at each name.
pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta_v1");

/// 8-byte on-disk format version; see [`FORMAT_VERSION`].
pub(crate) const META_FORMAT: &str = "format_version";
/// The greatest HLC issued or observed: 8-byte wall ms, 4-byte logical. Keeps the clock monotonic
/// across restarts even if the wall clock went back.
pub(crate) const META_HLC: &str = "hlc";

/// The greatest stamp up to which this node collected tombstones (12 bytes as `META_HLC`); absent
/// before the first collection.
pub(crate) const META_COLLECTED: &str = "tombstones_collected";

/// The number of the last memtable flush (8 bytes; absent before the first): readers pair the
/// memtable with a read transaction by it (see `memtable.rs`).
pub(crate) const META_FLUSH: &str = "memtable_flush";

/// Format version written by this build. Versions 1 (register tombstones counted in the state root,
/// no tombstone index) and 2 (one row per state-root bucket) are migrated at open; any other version
/// is refused.
pub(crate) const FORMAT_VERSION: u64 = 3;

/// A state table's definition: (collection name, key bytes) -> postcard value.
pub(crate) type StateTableDef = TableDefinition<'static, (&'static str, &'static [u8]), &'static [u8]>;

/// Each kind's state table and the staging table that becomes it at install, in the order of
/// `Kind`'s variants (so a kind, as an index, picks its row).
pub(crate) const STATE_TABLES: [(Kind, StateTableDef, StateTableDef); 3] = [
    (Kind::Register, REGISTERS, STAGE_REGISTERS),
    (Kind::Counter, COUNTERS, STAGE_COUNTERS),
    (Kind::Lease, LEASES, STAGE_LEASES),
];
const _: () =
    assert!(STATE_TABLES[0].0 as usize == 0 && STATE_TABLES[1].0 as usize == 1 && STATE_TABLES[2].0 as usize == 2);

/// Staging of the snapshot being pulled (see `staging.rs`): its entries, written as each verified
/// chunk arrives, in tables shaped like the state tables, so an install into an empty state renames
/// them. Same keys and values as `REGISTERS`, `COUNTERS` and `LEASES`.
pub(crate) const STAGE_REGISTERS: TableDefinition<(&str, &[u8]), &[u8]> = TableDefinition::new("stage_registers_v1");
pub(crate) const STAGE_COUNTERS: TableDefinition<(&str, &[u8]), &[u8]> = TableDefinition::new("stage_counters_v1");
pub(crate) const STAGE_LEASES: TableDefinition<(&str, &[u8]), &[u8]> = TableDefinition::new("stage_leases_v1");

/// The staged register tombstones, indexed as `TOMBSTONES` indexes the live ones, so an install
/// into an empty state renames this table too instead of scanning every register.
pub(crate) const STAGE_TOMBSTONES: TableDefinition<(u64, u32, &str, &[u8]), ()> =
    TableDefinition::new("stage_tombstones_v1");

/// Chunks whose entries are staged. Key: chunk CID bytes. Every one is also held as a file, unless a
/// crash lost the file before it was synced.
pub(crate) const STAGE_CHUNKS: TableDefinition<&[u8], ()> = TableDefinition::new("stage_chunks_v1");

/// What the staged entries add up to. Key: one of the `STAGE_*` names below.
pub(crate) const STAGE_META: TableDefinition<&str, &[u8]> = TableDefinition::new("stage_meta_v1");

/// Manifest CID bytes of the snapshot staged.
pub(crate) const STAGE_MANIFEST: &str = "manifest";
/// The staged entries' bucket hashes: 4096 x 32 bytes, bucket 0 first.
pub(crate) const STAGE_BUCKETS: &str = "buckets";
/// Postcard map of (kind, collection name) to entries staged.
pub(crate) const STAGE_COUNTS: &str = "counts";
/// Present (empty value) when the staging began with `STAGE_TOMBSTONES` kept in step; a staging
/// begun by an older build lacks it, and its install indexes the tombstones by a scan instead.
pub(crate) const STAGE_TOMBSTONES_KEPT: &str = "tombstones_kept";
/// The greatest HLC of a staged register or lease (not ahead of the wall clock), 12 bytes as `META_HLC`.
pub(crate) const STAGE_HLC: &str = "hlc";

/// The lease service's Raft log, in its own database (`leases.redb`, see `lease_log.rs`). Key: log
/// index. Value: a protobuf `eraftpb::Entry`. Holds the indexes after `RAFT_META`'s snapshot,
/// contiguous.
pub(crate) const RAFT_ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_entries_v1");

/// The lease service's Raft hard state and snapshot. Key: `"hard_state"` (protobuf
/// `eraftpb::HardState`) or `"snapshot"` (protobuf `eraftpb::Snapshot`, whose data is the lease
/// table at its index).
pub(crate) const RAFT_META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta_v1");
