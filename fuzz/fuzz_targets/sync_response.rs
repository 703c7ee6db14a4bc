//! Repair-plane responses as they come off a stream: the libp2p request-response CBOR codec the
//! node uses (16 MiB limit), then what the engine does with each kind: batches verified, manifests
//! decoded and verified, state entries decoded, a digest's certificates and revocations decoded.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(response) = peersync_fuzz::read_response(data) {
        peersync_fuzz::check_response(&response);
        let again = peersync_fuzz::write_response(response.clone());
        let back = peersync_fuzz::read_response(&again).expect("a re-encoded response decodes");
        assert_eq!(back, response, "response changed through the codec");
    }
});
