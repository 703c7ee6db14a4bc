//! Signed snapshot manifests (answers to `GetManifest`, and what a store keeps): decode, verify,
//! and `validate` on arbitrary manifests through re-signing (see `check_manifest_bytes`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    peersync_fuzz::check_manifest_bytes(data);
});
