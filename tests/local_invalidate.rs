//! Invalidation in the local role (the call runs in this process, no server): an unknown
//! endpoint name is an error naming the known ones, as over a connection, not a silent
//! "no such entry". No GPU needed.

#[path = "endpoints.rs"]
mod endpoints;

use shared_tensor::config::{Config, Role};
use shared_tensor::Error;

#[test]
fn invalidating_a_key_of_an_unknown_endpoint_is_an_error_in_the_local_role() {
    shared_tensor::configure(Config::default().role(Role::Local).device_index(0)).unwrap();
    endpoints::default_key(7).unwrap();
    let mut key = shared_tensor::endpoint::CallKey::new("default_key");
    key.part(&7i64);
    let key = key.finish().unwrap();
    assert!(shared_tensor::invalidate_cache_key("default_key", &key).unwrap(), "the entry existed");
    assert!(!shared_tensor::invalidate_cache_key("default_key", &key).unwrap(), "already gone");
    match shared_tensor::invalidate_cache_key("default_kye", &key) {
        Err(Error::UnknownEndpoint { name, .. }) => assert_eq!(name, "default_kye"),
        other => panic!("a misspelt endpoint gave {other:?}"),
    }
    assert!(matches!(shared_tensor::invalidate_endpoint_cache("default_kye"), Err(Error::UnknownEndpoint { .. })));
}
