//! A cache hit is answered on the server's connection task, without running the body or
//! handing the call to another thread: it must count exactly like any other hit (one
//! request, one hit, no miss), and a managed hit must still add the caller's reference.
//! No GPU needed: this process is a client of a server it runs in the background.

#[path = "endpoints.rs"]
mod endpoints;

use std::time::Duration;

use shared_tensor::config::{Config, Role};
use shared_tensor::Managed;
use shared_tensor_tests::free_port;

#[test]
fn hits_count_once_run_nothing_and_managed_hits_add_a_reference() {
    let port = free_port();
    let config = Config::default().base_port(port).device_index(0).connect_timeout(Duration::from_secs(5));
    shared_tensor::configure(config.role(Role::Client)).unwrap();
    shared_tensor::serve_in_background(None).unwrap();

    endpoints::keyed(7).unwrap(); // a miss: runs the body and fills the cache
    let before = shared_tensor::server_info().unwrap().counters;
    for _ in 0..10 {
        endpoints::keyed(7).unwrap();
    }
    let after = shared_tensor::server_info().unwrap().counters;
    assert_eq!(after.requests - before.requests, 10, "one request per hit");
    assert_eq!(after.cache_hits - before.cache_hits, 10, "one hit per hit");
    assert_eq!(after.cache_misses, before.cache_misses, "a hit is never also a miss");
    assert_eq!(endpoints::runs("keyed", Some(7)).len(), 1, "the body ran once");

    let first: Managed<()> = endpoints::make_object(5).unwrap();
    let second: Managed<()> = endpoints::make_object(5).unwrap(); // a hit
    assert_eq!(first.object_id(), second.object_id());
    assert_eq!(shared_tensor::object_info(first.object_id()).unwrap().unwrap().refcount, 2);
    assert!(second.release());
    assert_eq!(shared_tensor::object_info(first.object_id()).unwrap().unwrap().refcount, 1);
    assert!(first.release());
    assert!(shared_tensor::object_info(first.object_id()).unwrap().is_none(), "destroyed at 0");
}
