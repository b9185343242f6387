//! cargo-fuzz target: `metastore::fuzzing::requests` (its doc says what the input is and which
//! properties are checked); CI replays `fuzz/corpus/requests/` through the same function.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| metastore::fuzzing::requests(data));
