//! cargo-fuzz target: `metastore::fuzzing::snapshot` (its doc says what the input is and which
//! properties are checked); CI replays `fuzz/corpus/snapshot/` through the same function.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| metastore::fuzzing::snapshot(data));
