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

// ---- data plane (GPU) ----

use shared_tensor::payload::nn::{Gru, Lstm};
use shared_tensor::{Managed, Payload};
use tch::nn::{self, ModuleT, RNN};

/// A derived model three levels deep, with configuration fields.
#[derive(Debug, Payload)]
pub struct Mlp3 {
    pub blocks: Vec<Block>,
    pub name: String,
}

#[derive(Debug, Payload)]
pub struct Block {
    pub layers: Vec<Layer>,
    pub scale: f64,
}

#[derive(Debug, Payload)]
pub struct Layer {
    pub linear: nn::Linear,
    #[payload(skip)]
    pub calls: u64,
}

impl nn::Module for Mlp3 {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let mut x = xs.shallow_clone();
        for b in &self.blocks {
            for l in &b.layers {
                x = l.linear.forward(&x).relu() * b.scale;
            }
        }
        x
    }
}

/// Every tch nn module type, the shareable recurrent layers, and a derived model.
#[derive(Payload)]
pub struct Zoo {
    pub linear: nn::Linear,
    pub conv1: nn::Conv1D,
    pub conv2: nn::Conv2D,
    pub conv3: nn::Conv3D,
    pub tconv1: nn::ConvTranspose1D,
    pub tconv2: nn::ConvTranspose2D,
    pub tconv3: nn::ConvTranspose3D,
    pub embedding: nn::Embedding,
    pub layer_norm: nn::LayerNorm,
    pub batch_norm: nn::BatchNorm,
    pub group_norm: nn::GroupNorm,
    pub lstm: Lstm,
    pub gru: Gru,
    pub mlp: Mlp3,
    pub store: nn::VarStore,
}

impl Zoo {
    /// Each module's forward on its input (batch norm in eval mode).
    pub fn outputs(&self, inputs: &[Tensor]) -> Vec<Tensor> {
        use tch::nn::Module;
        vec![
            self.linear.forward(&inputs[0]),
            self.conv1.forward(&inputs[1]),
            self.conv2.forward(&inputs[2]),
            self.conv3.forward(&inputs[3]),
            self.tconv1.forward(&inputs[1]),
            self.tconv2.forward(&inputs[2]),
            self.tconv3.forward(&inputs[3]),
            self.embedding.forward(&inputs[4]),
            self.layer_norm.forward(&inputs[0]),
            self.batch_norm.forward_t(&inputs[2], false),
            self.group_norm.forward(&inputs[2]),
            self.lstm.seq(&inputs[5]).0,
            self.gru.seq(&inputs[5]).0,
            self.mlp.forward(&inputs[0]),
        ]
    }
}

/// The zoo, inputs for each module, and the server's outputs.
#[share(execution = "direct", cache = false)]
pub fn module_zoo(seed: i64) -> (Zoo, Vec<Tensor>, Vec<Tensor>) {
    tch::manual_seed(seed);
    let dev = tch::Device::Cuda(0);
    let store = nn::VarStore::new(dev);
    let r = store.root();
    let zoo = Zoo {
        linear: nn::linear(&r / "linear", 8, 8, Default::default()),
        conv1: nn::conv1d(&r / "c1", 4, 6, 3, nn::ConvConfig { padding: 1, ..Default::default() }),
        conv2: nn::conv2d(&r / "c2", 4, 4, 3, nn::ConvConfig { stride: 2, groups: 2, ..Default::default() }),
        conv3: nn::conv3d(&r / "c3", 4, 2, 2, Default::default()),
        tconv1: nn::conv_transpose1d(&r / "t1", 4, 3, 3, Default::default()),
        tconv2: nn::conv_transpose2d(&r / "t2", 4, 3, 3, nn::ConvTransposeConfig { stride: 2, ..Default::default() }),
        tconv3: nn::conv_transpose3d(&r / "t3", 4, 2, 2, Default::default()),
        embedding: nn::embedding(&r / "emb", 16, 8, Default::default()),
        layer_norm: nn::layer_norm(&r / "ln", vec![8], Default::default()),
        batch_norm: nn::batch_norm2d(&r / "bn", 4, Default::default()),
        group_norm: nn::group_norm(&r / "gn", 2, 4, Default::default()),
        lstm: Lstm::new(&r / "lstm", 8, 6, nn::RNNConfig { num_layers: 2, ..Default::default() }),
        gru: Gru::new(&r / "gru", 8, 6, Default::default()),
        mlp: Mlp3 {
            blocks: (0..2)
                .map(|b| Block {
                    layers: (0..2)
                        .map(|l| Layer { linear: nn::linear(&r / "mlp" / b / l, 8, 8, Default::default()), calls: 0 })
                        .collect(),
                    scale: 0.5 + b as f64,
                })
                .collect(),
            name: "mlp3".into(),
        },
        store: nn::VarStore::new(dev),
    };
    let _ = nn::linear(zoo.store.root() / "extra", 2, 2, Default::default());
    let f = (tch::Kind::Float, dev);
    let inputs = vec![
        Tensor::randn([3, 8], f),
        Tensor::randn([2, 4, 9], f),
        Tensor::randn([2, 4, 8, 8], f),
        Tensor::randn([1, 4, 5, 5, 5], f),
        Tensor::randint(16, [3, 5], (tch::Kind::Int64, dev)),
        Tensor::randn([2, 7, 8], f),
    ];
    // Running statistics that are not the defaults, so that they must travel.
    let _ = zoo.batch_norm.forward_t(&inputs[2], true);
    let outputs = zoo.outputs(&inputs);
    (zoo, inputs, outputs)
}

/// Tied weights: an embedding and an output projection over one tensor, and a slice of it.
#[derive(Payload)]
pub struct Tied {
    pub embedding: nn::Embedding,
    pub head: nn::Linear,
    pub rows: Tensor,
}

#[share(managed, cache_key = "tied")]
pub fn tied_model() -> Tied {
    let vs = nn::VarStore::new(tch::Device::Cuda(0));
    let embedding = nn::embedding(vs.root() / "emb", 10, 4, Default::default());
    let head = nn::Linear { ws: embedding.ws.shallow_clone(), bs: None };
    let rows = embedding.ws.narrow(0, 2, 3);
    Tied { embedding, head, rows }
}

/// The server's view of the tied model: the sum of its embedding weights.
#[share(execution = "direct", cache = false)]
pub fn tied_sum() -> Tensor {
    let model: Managed<Tied> = tied_model().expect("the tied model");
    model.embedding.ws.sum(tch::Kind::Float)
}

/// A large matrix product, returned without waiting for it.
#[share(execution = "direct", cache = false)]
pub fn slow_matmul(n: i64) -> Tensor {
    let a = Tensor::ones([n, n], (tch::Kind::Float, tch::Device::Cuda(0)));
    a.matmul(&a)
}

/// A model that takes a while to build.
#[share(execution = "task", managed, cache_key = "slow:{ms}")]
pub fn slow_model(ms: u64) -> nn::Linear {
    std::thread::sleep(Duration::from_millis(ms));
    let vs = nn::VarStore::new(tch::Device::Cuda(0));
    nn::linear(vs.root(), 16, 16, Default::default())
}

/// A tensor on device `index`.
#[share(execution = "direct", cache = false)]
pub fn on_device(index: usize) -> Tensor {
    Tensor::full([4], index as f64, (tch::Kind::Float, tch::Device::Cuda(index)))
}

/// A CUDA error inside an endpoint: an allocation no GPU has room for.
#[share(execution = "direct", cache = false)]
pub fn cuda_oom() -> Tensor {
    Tensor::zeros([1 << 42], (tch::Kind::Float, tch::Device::Cuda(0)))
}

// ---- keys from the arguments (tests/cache_keys.rs) ----

/// A gate the test opens: bodies that wait on it overlap for sure, without sleeps.
pub struct Gate {
    open: Mutex<bool>,
    cv: std::sync::Condvar,
}

impl Gate {
    pub const fn new() -> Gate {
        Gate { open: Mutex::new(false), cv: std::sync::Condvar::new() }
    }

    pub fn wait(&self) {
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.cv.wait(open).unwrap();
        }
    }

    pub fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.cv.notify_all();
    }
}

pub static ECHO_GATE: Gate = Gate::new();

/// Singleflight without a cache: calls join only when their arguments are equal. The
/// error carries the argument, so each caller can tell whose result it got.
#[share(cache = false, singleflight = true)]
pub fn echo_sf(n: i64) -> Result<(), String> {
    record("echo_sf", n, Duration::ZERO);
    ECHO_GATE.wait();
    Err(format!("echo {n}"))
}

/// Cached by the default key (all arguments), two parameters.
#[share(execution = "direct")]
pub fn pair_key(n: i64, name: String) {
    record("pair_key", n, Duration::ZERO);
    let _ = name;
}

// ---- async on any executor, late replies (tests/executors.rs) ----

pub static OBJECT_GATE: Gate = Gate::new();

/// A managed object built only once the test opens the gate: its reply comes after the
/// caller stopped waiting.
#[share(managed, cache = false)]
pub fn gated_object(n: i64) {
    record("gated_object", n, Duration::ZERO);
    OBJECT_GATE.wait();
}

// ---- bounded cache, keep (tests/cache_keep.rs, tests/gpu_cache.rs) ----

/// A cached managed object that stays alive with no handles (`keep`).
#[share(managed, keep, cache_key = "kept:{n}")]
pub fn kept_object(n: i64) {
    record("kept_object", n, Duration::ZERO);
}

/// A cached 4 MiB CUDA tensor filled with `n` (eviction by bytes).
#[share(execution = "direct")]
pub fn cached_block(n: i64) -> Tensor {
    Tensor::full([1 << 20], n as f64, (tch::Kind::Float, tch::Device::Cuda(0)))
}

/// A small kept model: `width` × `width` Linear layers on CUDA.
#[share(managed, keep, cache_key = "kept_model:{width}")]
pub fn kept_model(width: i64) -> Vec<tch::nn::Linear> {
    let vs = tch::nn::VarStore::new(tch::Device::Cuda(0));
    (0..2).map(|i| tch::nn::linear(vs.root() / i, width, width, Default::default())).collect()
}

// ---- deadlines (tests/deadlines.rs) ----

pub static SERIAL_GATE: Gate = Gate::new();

/// One at a time; the first call holds the endpoint until the test opens the gate.
#[share(execution = "direct", concurrency = "serialized", cache = false)]
pub fn gated_serial(tag: i64) {
    record("gated_serial", tag, Duration::ZERO);
    SERIAL_GATE.wait();
}

/// Long work in steps that stops once its caller's deadline passes (recorded with its
/// tag), or after 20 s (recorded with the negated tag).
#[share(cache = false)]
pub fn cooperative(tag: i64) -> Result<(), String> {
    let start = Instant::now();
    while !shared_tensor::task::is_cancelled() {
        if start.elapsed() > Duration::from_secs(20) {
            record("cooperative", -tag, Duration::ZERO);
            return Err("never saw the deadline".into());
        }
        std::thread::sleep(Duration::from_millis(1)); // one step of work
    }
    record("cooperative", tag, Duration::ZERO);
    Err("stopped early: the caller's deadline passed".into())
}
