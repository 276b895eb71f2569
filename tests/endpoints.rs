//! Endpoints of the integration tests, compiled into each test binary and helper binary
//! that needs them (`#[path = "endpoints.rs"] mod endpoints;`), so that every binary
//! registers them itself.
//!
//! CPU endpoints return `()` (a payload that carries no GPU memory) and record what their
//! bodies did in [`LOG`], which in-process tests read. Tensor endpoints need a GPU.
#![allow(dead_code)]

use std::sync::Mutex;
use std::time::{Duration, Instant};

use shared_tensor::share;
use tch::Tensor;

/// One body execution: endpoint, argument tag, start, end.
#[derive(Debug, Clone)]
pub struct Run {
    pub endpoint: &'static str,
    pub tag: i64,
    pub start: Instant,
    pub end: Instant,
}

pub static LOG: Mutex<Vec<Run>> = Mutex::new(Vec::new());

fn record(endpoint: &'static str, tag: i64, busy: Duration) {
    let start = Instant::now();
    std::thread::sleep(busy);
    LOG.lock().unwrap().push(Run { endpoint, tag, start, end: Instant::now() });
}

/// Runs of one endpoint (optionally one tag).
pub fn runs(endpoint: &str, tag: Option<i64>) -> Vec<Run> {
    LOG.lock().unwrap().iter().filter(|r| r.endpoint == endpoint && tag.is_none_or(|t| r.tag == t)).cloned().collect()
}

// ---- tensor endpoints (GPU) ----

#[share(cache = false)]
pub fn identity(tensor: Tensor) -> Tensor {
    tensor
}

#[share(execution = "direct", cache = false)]
pub fn scale_tensor(tensor: Tensor, factor: Tensor) -> Tensor {
    &tensor * &factor
}

#[share(execution = "direct", cache = false)]
pub fn identity_ref(tensor: &Tensor) -> Tensor {
    tensor.shallow_clone()
}

/// For the client-side check: a CPU tensor never leaves the client.
#[share(execution = "direct", cache = false)]
pub fn takes_tensor(tensor: Tensor) {
    let _ = tensor;
}

// ---- CPU endpoints ----

#[share(execution = "direct", cache = false)]
pub fn noop() {}

#[share(execution = "direct", cache = false)]
pub fn fails(message: String) -> Result<(), String> {
    Err(message)
}

#[share(execution = "direct", cache = false)]
pub fn panics(message: String) {
    panic!("{message}");
}

#[share(execution = "direct", cache = false)]
pub fn sleepy(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

#[share(execution = "direct", cache = false)]
pub fn parallel_work(tag: i64) {
    record("parallel_work", tag, Duration::from_millis(100));
}

#[share(execution = "direct", concurrency = "serialized", cache = false)]
pub fn serialized_work(tag: i64) {
    record("serialized_work", tag, Duration::from_millis(40));
}

#[share(cache_key = "sf:{tag}")]
pub fn singleflight_on(tag: i64) {
    record("singleflight_on", tag, Duration::from_millis(300));
}

#[share(singleflight = false, cache_key = "sf:{tag}")]
pub fn singleflight_off(tag: i64) {
    record("singleflight_off", tag, Duration::from_millis(300));
}

#[share(execution = "direct", cache_key = "k:<n>")]
pub fn keyed(n: i64) {
    record("keyed", n, Duration::ZERO);
}

#[share(execution = "direct")]
pub fn default_key(n: i64) {
    record("default_key", n, Duration::ZERO);
}

#[share(managed, cache_key = "m:{n}")]
pub fn make_object(n: i64) {
    record("make_object", n, Duration::from_millis(150));
}

#[share(managed, cache = false)]
pub fn make_uncached_object(n: i64) {
    record("make_uncached_object", n, Duration::ZERO);
}

#[share(execution = "task", cache = false)]
pub fn slow_task(ms: u64) {
    shared_tensor::report_progress(0.5, "half way");
    record("slow_task", ms as i64, Duration::from_millis(ms));
}

#[share(execution = "task", concurrency = "serialized", cache = false, singleflight = false)]
pub fn serialized_task(tag: i64) {
    record("serialized_task", tag, Duration::from_millis(300));
}

#[share(execution = "task", managed, cache_key = "tm:{n}")]
pub fn managed_task(n: i64) {
    record("managed_task", n, Duration::from_millis(50));
}

// ---- benchmark endpoints (GPU) ----

/// Many tensors in one call (scaling in tensor count).
#[share(execution = "direct", cache = false)]
pub fn identity_many(tensors: Vec<Tensor>) -> Vec<Tensor> {
    tensors
}

/// A cached 4 MiB result.
#[share(execution = "direct")]
pub fn cached_tensor() -> Tensor {
    Tensor::ones([1 << 20], (tch::Kind::Float, tch::Device::Cuda(0)))
}

/// A cached managed 1.6 GB model: 24 × Linear 4096×4096.
#[share(execution = "task", managed, concurrency = "serialized", cache_key = "model:{layers}x{width}")]
pub fn big_model(layers: i64, width: i64) -> Vec<tch::nn::Linear> {
    let vs = tch::nn::VarStore::new(tch::Device::Cuda(0));
    (0..layers).map(|i| tch::nn::linear(vs.root() / i, width, width, Default::default())).collect()
}

/// A task that does nothing.
#[share(execution = "task", cache = false)]
pub fn trivial_task() {}

/// A fresh 4 MiB tensor filled with `value` (the allocator reuses freed blocks).
#[share(execution = "direct", cache = false)]
pub fn filled(value: f64) -> Tensor {
    Tensor::full([1 << 20], value, (tch::Kind::Float, tch::Device::Cuda(0)))
}
