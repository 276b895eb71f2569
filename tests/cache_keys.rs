//! Keys from the arguments: with no `cache_key`, an endpoint's cache and singleflight key
//! is its name plus every argument's value, so calls with different arguments never share
//! a result. Over a real loopback server (this process is a client of a server it runs in
//! the background); no GPU needed.

#[path = "endpoints.rs"]
mod endpoints;

use std::thread;

use shared_tensor::endpoint::CallKey;
use shared_tensor::Error;
use shared_tensor_tests::{serve_here, wait_until as until};

fn setup() {
    serve_here(|c| c);
}

#[test]
fn two_values_are_two_entries_and_one_value_is_one() {
    setup();
    let before = shared_tensor::server_info().unwrap().counters;
    endpoints::default_key(1).unwrap();
    endpoints::default_key(2).unwrap();
    endpoints::default_key(1).unwrap();
    endpoints::default_key(2).unwrap();
    let after = shared_tensor::server_info().unwrap().counters;
    assert_eq!(endpoints::runs("default_key", Some(1)).len(), 1, "default_key(1) ran once");
    assert_eq!(endpoints::runs("default_key", Some(2)).len(), 1, "default_key(2) ran once, not answered by (1)");
    assert_eq!(after.cache_misses - before.cache_misses, 2);
    assert_eq!(after.cache_hits - before.cache_hits, 2);

    // Every argument is part of the key, not only the first.
    endpoints::pair_key(1, "a".into()).unwrap();
    endpoints::pair_key(1, "b".into()).unwrap();
    endpoints::pair_key(1, "a".into()).unwrap();
    assert_eq!(endpoints::runs("pair_key", Some(1)).len(), 2);

    // invalidate takes every argument too, and drops only that entry.
    assert!(endpoints::default_key::invalidate(1).unwrap());
    assert!(!endpoints::default_key::invalidate(1).unwrap(), "already gone");
    endpoints::default_key(2).unwrap();
    assert_eq!(endpoints::runs("default_key", Some(2)).len(), 1, "(2) still cached");
    endpoints::default_key(1).unwrap();
    assert_eq!(endpoints::runs("default_key", Some(1)).len(), 2, "(1) recomputed");
}

#[test]
fn the_default_key_is_the_documented_encoding() {
    // MessagePack of each argument in order, as hex, after the endpoint's name.
    let mut key = CallKey::new("pair_key");
    key.part(&1i64).part("a");
    assert_eq!(key.finish().unwrap(), "pair_key:01a161");
    let mut long = CallKey::new("pair_key");
    long.part(&1i64).part(&"x".repeat(100));
    let long = long.finish().unwrap();
    assert!(long.starts_with("pair_key:sha256:") && long.len() == "pair_key:sha256:".len() + 64, "{long}");
}

#[test]
fn singleflight_never_joins_calls_with_different_arguments() {
    setup();
    let before = shared_tensor::server_info().unwrap().counters.singleflight_joins;
    let callers: Vec<_> = (0..32i64)
        .map(|i| {
            thread::spawn(move || {
                let n = i % 2;
                (n, endpoints::echo_sf(n))
            })
        })
        .collect();
    // The two leaders are inside their bodies and the other 30 calls have joined one of
    // them: only then may the bodies finish.
    until("2 executions and 30 joins", || {
        let joins = shared_tensor::server_info().unwrap().counters.singleflight_joins - before;
        endpoints::runs("echo_sf", None).len() >= 2 && joins >= 30
    });
    endpoints::ECHO_GATE.open();
    for caller in callers {
        let (n, result) = caller.join().unwrap();
        match result {
            Err(Error::Endpoint { message, .. }) => assert_eq!(message, format!("echo {n}"), "a call of echo_sf({n})"),
            other => panic!("echo_sf({n}) returned {other:?}"),
        }
    }
    let runs = endpoints::runs("echo_sf", None);
    assert_eq!(runs.len(), 2, "32 calls with 2 distinct arguments ran exactly twice: {runs:?}");
    assert_eq!(endpoints::runs("echo_sf", Some(0)).len(), 1);
    assert_eq!(endpoints::runs("echo_sf", Some(1)).len(), 1);
    assert_eq!(shared_tensor::server_info().unwrap().counters.singleflight_joins - before, 30);
}
