//! The frame reader and the message decoders on arbitrary bytes: errors, never panics.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    shared_tensor_runtime::payload::fuzz_decode(data);
});
