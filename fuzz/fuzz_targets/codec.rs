//! The TLV codec on any bytes: never panics, bounded, re-encodes
//! consistently (see `check_codec`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    quiet_fuzz::check_codec(data);
});
