//! The sync engine, structure-aware: `arbitrary` builds a configuration, a starting store and a
//! sequence of inputs, and this target plays the executor. It hands the engine what peers could
//! send (well-formed digests, genuine and forged op batches, manifests and chunks of fixture
//! snapshots, CBOR-decoded arbitrary requests and responses, arbitrary gossip bytes), answers the
//! engine's own requests (or ones it never made), reports applies, stages and installs (as a real
//! executor would judge them, or not), and moves time by small and huge steps. After every input it
//! drains `poll_action()` and checks:
//!
//! - nothing panics;
//! - the engine's queues stay within the bounds the simulator checks (`tests/sim/cluster.rs`):
//!   requests out, requests being served, apply tickets, and the gap buffer;
//! - every inbound request is answered at most once (`Reply` or `Serve`), every gossip message gets
//!   at most one verdict, and only for ids it was given;
//! - what it publishes decodes; what it asks to apply are contiguous batches of one origin.
//!
//! Both open mode and membership mode (`EngineConfig.membership`) are covered.
#![no_main]

use libfuzzer_sys::fuzz_target;
use peersync_fuzz::engine::{run, Scenario};

fuzz_target!(|scenario: Scenario| run(&scenario));
