//! `keep`: a cached managed object survives every handle dropping and is handed out
//! again without a rebuild, until `NAME::invalidate(..)` drops it; cache entries are
//! listed by `server_info` with their key, bytes, hits and last use. Over a real loopback
//! server (this process is a client of a server it runs in the background); no GPU needed.

#[path = "endpoints.rs"]
mod endpoints;

use std::time::{Duration, SystemTime};

use shared_tensor::config::{Config, Role};
use shared_tensor::Managed;
use shared_tensor_tests::free_port;

fn objects_of(endpoint: &str) -> Vec<shared_tensor::managed::ObjectInfo> {
    shared_tensor::list_objects().unwrap().into_iter().filter(|o| o.endpoint == endpoint).collect()
}

#[test]
fn a_kept_object_outlives_its_handles_until_invalidated() {
    let port = free_port();
    let config = Config::default().base_port(port).device_index(0).connect_timeout(Duration::from_secs(5));
    shared_tensor::configure(config.role(Role::Client)).unwrap();
    shared_tensor::serve_in_background(None).unwrap();
    let before = SystemTime::now();

    let first: Managed<()> = endpoints::kept_object(1).unwrap();
    let id = first.object_id();
    assert!(first.release());
    for _ in 0..5 {
        let again: Managed<()> = endpoints::kept_object(1).unwrap();
        assert_eq!(again.object_id(), id, "the same object, handed out again");
        drop(again); // released without waiting
    }
    assert_eq!(endpoints::runs("kept_object", Some(1)).len(), 1, "built once");
    let objects = objects_of("kept_object");
    assert_eq!(objects.len(), 1);
    assert_eq!(objects[0].refcount, 1, "only the cache's keep reference is left");

    let info = shared_tensor::server_info().unwrap();
    let entry = info.cache.iter().find(|e| e.endpoint == "kept_object").expect("listed");
    assert_eq!((entry.key.as_str(), entry.hits, entry.bytes), ("kept:1", 5, 0));
    assert!(entry.managed && entry.kept && entry.last_used >= before, "{entry:?}");
    assert_eq!(info.cache_budget_bytes, None, "unlimited unless SHARED_TENSOR_CACHE_BYTES is set");
    assert!(info.endpoints.iter().any(|e| e.name == "kept_object" && e.keep));

    assert!(endpoints::kept_object::invalidate(1).unwrap());
    assert!(objects_of("kept_object").is_empty(), "dropping the entry lets the object go");
    let rebuilt: Managed<()> = endpoints::kept_object(1).unwrap();
    assert_ne!(rebuilt.object_id(), id);
    assert_eq!(endpoints::runs("kept_object", Some(1)).len(), 2, "built again after invalidate");
}
