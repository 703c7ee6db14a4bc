//! Gossip payloads (the control plane): any bytes a peer publishes on the cluster topic.
//! `decode_gossip` with the node's 64 KiB limit, then the checks of what the message carries: a
//! batch's signed head and its whole chain, an attestation's signature, a revocation's encoding.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    peersync_fuzz::check_gossip(data);
});
