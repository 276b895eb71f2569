//! The bounded cache and `keep` with real CUDA results, between two processes: this test
//! process is the client of an `endpoint_server` in the server role whose cache may hold
//! 10 MiB (`SHARED_TENSOR_CACHE_BYTES`). Run in the GPU bundle.

#[path = "endpoints.rs"]
mod endpoints;

use std::sync::{Mutex, OnceLock};

use shared_tensor::config::{Config, Role};
use shared_tensor::server::CacheEntryInfo;
use shared_tensor::Managed;
use shared_tensor_tests::{free_port, helper_bin, require_gpu, Peer};
use tch::Tensor;

const BUDGET: u64 = 10 << 20;
const BLOCK: u64 = 4 << 20;

/// Starts the server once; the returned guard keeps this binary's tests one at a time
/// (they read the server's global counters).
fn setup() -> std::sync::MutexGuard<'static, ()> {
    static SERVER: OnceLock<Mutex<Peer>> = OnceLock::new();
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    require_gpu();
    SERVER.get_or_init(|| {
        let port = free_port().to_string();
        let budget = BUDGET.to_string();
        let exe = helper_bin("endpoint_server", env!("CARGO_BIN_EXE_endpoint_server"));
        let mut peer = Peer::spawn(
            &exe,
            &[
                ("ST_TEST_SERVER", "role"),
                ("SHARED_TENSOR_ROLE", "server"),
                ("SHARED_TENSOR_BASE_PORT", &port),
                ("SHARED_TENSOR_CACHE_BYTES", &budget),
            ],
        );
        assert_eq!(peer.expect_line("READY"), port);
        shared_tensor::configure(Config::default().role(Role::Client).base_port(port.parse().unwrap())).unwrap();
        Mutex::new(peer)
    });
    guard
}

fn entries(endpoint: &str) -> Vec<CacheEntryInfo> {
    shared_tensor::server_info().unwrap().cache.into_iter().filter(|e| e.endpoint == endpoint).collect()
}

fn print_cache() {
    let info = shared_tensor::server_info().unwrap();
    println!("cache (budget {:?} bytes):", info.cache_budget_bytes);
    for e in &info.cache {
        println!(
            "  {} {} : {} bytes, {} hits, managed {}, kept {}",
            e.endpoint, e.key, e.bytes, e.hits, e.managed, e.kept
        );
    }
}

#[test]
#[ignore = "GPU: runs in the GPU bundle (cargo xtask gpu-bundle)"]
fn gpu_results_are_evicted_by_bytes_least_recently_used_first() {
    let _one = setup();
    let info = shared_tensor::server_info().unwrap();
    assert_eq!(info.cache_budget_bytes, Some(BUDGET));
    for n in 0..4i64 {
        let t: Tensor = endpoints::cached_block(n).unwrap();
        assert_eq!(t.double_value(&[0]), n as f64);
    }
    print_cache();
    let blocks = entries("cached_block");
    let total: u64 = blocks.iter().map(|e| e.bytes).sum();
    assert!(blocks.iter().all(|e| e.bytes == BLOCK), "each entry holds its 4 MiB: {blocks:?}");
    assert_eq!(blocks.len(), 2, "10 MiB hold two 4 MiB results: {blocks:?}");
    assert!(total <= BUDGET);
    let before = shared_tensor::server_info().unwrap().counters;
    // The two most recent stayed: hits, no body.
    let three: Tensor = endpoints::cached_block(3).unwrap();
    assert_eq!(three.double_value(&[0]), 3.0);
    let two: Tensor = endpoints::cached_block(2).unwrap();
    assert_eq!(two.double_value(&[1 << 19]), 2.0);
    let mid = shared_tensor::server_info().unwrap().counters;
    assert_eq!((mid.cache_hits - before.cache_hits, mid.cache_misses - before.cache_misses), (2, 0));
    // The oldest went: computed again, right value (a tensor a client still holds stays valid).
    let zero: Tensor = endpoints::cached_block(0).unwrap();
    assert_eq!(zero.double_value(&[0]), 0.0);
    let after = shared_tensor::server_info().unwrap().counters;
    assert_eq!(after.cache_misses - mid.cache_misses, 1, "cached_block(0) was evicted and rebuilt");
    assert_eq!(three.double_value(&[7]), 3.0, "an evicted entry's tensor held by a client is still valid");
    println!(
        "eviction: 4 results of {BLOCK} bytes under a {BUDGET}-byte budget kept {} entries ({total} bytes); \
         hits on the 2 most recent, the oldest rebuilt",
        blocks.len()
    );
}

#[test]
#[ignore = "GPU: runs in the GPU bundle (cargo xtask gpu-bundle)"]
fn a_kept_model_survives_every_handle_and_is_not_rebuilt() {
    let _one = setup();
    let width = 256i64;
    let first: Managed<Vec<tch::nn::Linear>> = endpoints::kept_model(width).unwrap();
    let id = first.object_id();
    let x = Tensor::ones([1, width], (tch::Kind::Float, tch::Device::Cuda(0)));
    let y0 = tch::nn::Module::forward(&first[0], &x);
    drop(first);
    let misses = shared_tensor::server_info().unwrap().counters.cache_misses;
    for _ in 0..10 {
        let m: Managed<Vec<tch::nn::Linear>> = endpoints::kept_model(width).unwrap();
        assert_eq!(m.object_id(), id, "the same model, handed out again");
        assert!(tch::nn::Module::forward(&m[0], &x).equal(&y0), "the same weights");
    }
    let info = shared_tensor::server_info().unwrap();
    assert_eq!(info.counters.cache_misses, misses, "10 calls after every handle dropped: no rebuild");
    let entry = entries("kept_model").pop().expect("listed");
    print_cache();
    assert!(entry.kept && entry.managed && entry.hits >= 10, "{entry:?}");
    assert!(entry.bytes >= (2 * width * width * 4) as u64, "{entry:?}");
    let objects = shared_tensor::list_objects().unwrap();
    let kept = objects.iter().find(|o| o.object_id == id).expect("alive with no handles");
    assert_eq!(kept.refcount, 1, "only the cache's keep reference is left");
    assert!(endpoints::kept_model::invalidate(width).unwrap());
    assert!(shared_tensor::object_info(id).unwrap().is_none(), "invalidate lets it go");
    println!(
        "keep: kept model object {id} ({} bytes) handed out 10 times after its handles dropped, built once",
        entry.bytes
    );
}
