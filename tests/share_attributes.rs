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

/// A type that exists only where `cached_configured_out` does.
#[cfg(any())]
struct OnlyWhenConfigured;

/// Cached, so it has a key function: that too must be configured out (its parameter's
/// type does not exist here, so a key function left behind would not compile; rustc
/// strips a configured-out item before `#[share]` sees it, and the key function carries
/// the `cfg`s as well).
#[share(execution = "direct")]
#[cfg(any())] // never compiled
fn cached_configured_out(n: OnlyWhenConfigured) {
    let _ = n;
}

/// Cached with eight key parameters: the `allow` must reach the key function too, or
/// `cargo clippy --all-targets` flags `too_many_arguments` on it (this file denies
/// warnings; the check is clippy's, `cargo test` alone cannot see it).
#[share(execution = "direct")]
#[allow(clippy::too_many_arguments)]
fn cached_eight(a: i64, b: i64, c: i64, d: i64, e: i64, f: i64, g: i64, h: i64) {
    let _ = a + b + c + d + e + f + g + h;
}

/// A crate that re-exports shared-tensor to its users, as an SDK would.
mod sdk {
    pub use ::shared_tensor as st;
}

/// Generated code reaches the runtime through the re-export (`crate = ...`); a path
/// that does not lead to it is a compile error (`ui/crate_path.rs`).
#[share(crate = "crate::sdk::st", execution = "direct", cache = false)]
fn through_a_reexport(n: i64) {
    let _ = n;
}

/// The derive takes the same option.
#[derive(shared_tensor::Payload)]
#[payload(container, crate = "crate::sdk::st")]
struct Reexported {
    weights: Vec<tch::Tensor>,
    steps: i64,
}

#[test]
fn the_crate_option_names_the_runtime_by_a_reexport() {
    assert_eq!(through_a_reexport::endpoint().params, &["n"]);
    fn is_payload<P: sdk::st::Payload>() {}
    is_payload::<Reexported>();
    let r = Reexported { weights: Vec::new(), steps: 3 };
    let _ = (r.weights.len(), r.steps);
}

#[test]
fn a_configured_out_endpoint_is_not_registered_and_a_configured_in_one_is() {
    let names = shared_tensor::endpoint::Registry::linked().unwrap().names();
    assert!(names.contains(&"annotated") && names.contains(&"configured_in"), "{names:?}");
    assert!(!names.contains(&"configured_out") && !names.contains(&"cached_configured_out"), "{names:?}");
    assert!(names.contains(&"cached_eight"), "{names:?}");
    assert_eq!(cached_eight::endpoint().params.len(), 8);
    // The companions exist (and carry the lint levels: this file denies warnings).
    assert_eq!(annotated::endpoint().name, "annotated");
    assert_eq!(configured_in::endpoint().params, &[] as &[&str]);
}
