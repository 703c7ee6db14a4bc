//! Membership certificates and revocations, in their wire form (digests, gossip) and their text
//! form (files the operator hands in): decoded, then verified against the fixtures' authority and
//! the authority they name.
#![no_main]

use libfuzzer_sys::fuzz_target;
use peersync::cert::{Certificate, Revocation};

fuzz_target!(|data: &[u8]| {
    peersync_fuzz::check_cert_bytes(data);
    peersync_fuzz::check_revocation_bytes(data);
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(cert) = Certificate::from_text(text) {
            peersync_fuzz::check_cert(&cert);
        }
        if let Ok(r) = Revocation::from_text(text) {
            peersync_fuzz::check_revocation(&r);
        }
    }
});
