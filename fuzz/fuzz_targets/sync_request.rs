//! Repair-plane requests as they come off a stream: the libp2p request-response CBOR codec the
//! node uses (1 MiB limit), then the checks of a digest's certificates and revocations.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = peersync_fuzz::read_request(data) {
        peersync_fuzz::check_request(&request);
        // What decodes re-encodes to the same request.
        let again = peersync_fuzz::write_request(request.clone());
        let back = peersync_fuzz::read_request(&again).expect("a re-encoded request decodes");
        assert_eq!(back, request, "request changed through the codec");
    }
});
