//! Attributes on a `#[share]` function reach every item it generates: lint levels (this
//! file denies every warning, so a lint that escaped to a companion, or an `expect` left
//! unfulfilled on one, fails the build), doc comments, and `cfg` (a configured-out
//! endpoint generates nothing and is not registered). No GPU needed.
#![deny(warnings)]

use shared_tensor::share;

/// Does nothing with its arguments.
#[share(execution = "direct", cache = false)]
#[expect(unused_variables, reason = "the body keeps the expectation; the companions get an allow")]
fn annotated(n: i64, unused: String) {
    let ignored = n;
}

#[share(execution = "direct", cache = false)]
#[cfg(any())] // never compiled
fn configured_out() {}

#[share(execution = "direct", cache = false)]
#[cfg(target_os = "linux")] // compiled (shared-tensor is Linux only)
fn configured_in() {}

#[test]
fn a_configured_out_endpoint_is_not_registered_and_a_configured_in_one_is() {
    let names = shared_tensor::endpoint::Registry::linked().unwrap().names();
    assert!(names.contains(&"annotated") && names.contains(&"configured_in"), "{names:?}");
    assert!(!names.contains(&"configured_out"), "{names:?}");
    // The companions exist (and carry the lint levels: this file denies warnings).
    assert_eq!(annotated::endpoint().name, "annotated");
    assert_eq!(configured_in::endpoint().params, &[] as &[&str]);
}
