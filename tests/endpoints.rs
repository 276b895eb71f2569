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

/// As `sleepy`, but first prints `SLEEPING` on the server's stdout: a test that reads it
/// knows the call is running there (no guess of how long it takes to get there).
#[share(execution = "direct", cache = false)]
pub fn announced_sleep(ms: u64) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "SLEEPING").and_then(|()| out.flush());
    drop(out);
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

/// New tensors equal to the arguments (the server's own small allocations, which its
/// caching allocator carves from few blocks).
#[share(execution = "direct", cache = false)]
pub fn copy_many(tensors: Vec<Tensor>) -> Vec<Tensor> {
    tensors.iter().map(Tensor::copy).collect()
}

/// `n` views of `len` elements each, carved from one `arange(n * len)` f32 tensor.
#[share(execution = "direct", cache = false)]
pub fn carved(n: i64, len: i64) -> Vec<Tensor> {
    let whole = Tensor::arange(n * len, (tch::Kind::Float, tch::Device::Cuda(0)));
    (0..n).map(|i| whole.narrow(0, i * len, len)).collect()
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

// ---- LLM-shaped benchmark models (GPU) ----

use std::collections::HashMap;

/// Vocabulary of the LLM-shaped benchmark models (128k, as in Llama 3).
pub const VOCAB: i64 = 131_072;
/// Hidden size of the LLM-shaped benchmark models (a 7B-class decoder).
pub const HIDDEN: i64 = 4096;
/// Inner size of the decoder blocks' MLP.
pub const MLP_HIDDEN: i64 = 11_008;
/// Output features of the embedding model's head.
pub const HEAD_OUT: i64 = 16;

/// A 2 GiB f32 embedding (`VOCAB` × `HIDDEN`) and a small head.
#[derive(Payload)]
pub struct EmbeddingHead {
    pub embedding: nn::Embedding,
    pub head: nn::Linear,
}

/// The cached embedding model (about 2 GiB of weights).
#[share(execution = "task", managed, concurrency = "serialized", cache_key = "embedding_head")]
pub fn embedding_model() -> EmbeddingHead {
    let vs = nn::VarStore::new(tch::Device::Cuda(0));
    EmbeddingHead {
        embedding: nn::embedding(vs.root() / "embedding", VOCAB, HIDDEN, Default::default()),
        head: nn::linear(vs.root() / "head", HIDDEN, HEAD_OUT, Default::default()),
    }
}

/// An RMS norm: one weight of `HIDDEN`.
#[derive(Payload)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

/// One decoder block: two norms, the attention projections and a gated MLP (no biases).
#[derive(Payload)]
pub struct DecoderBlock {
    pub input_norm: RmsNorm,
    pub q_proj: nn::Linear,
    pub k_proj: nn::Linear,
    pub v_proj: nn::Linear,
    pub o_proj: nn::Linear,
    pub post_attention_norm: RmsNorm,
    pub gate_proj: nn::Linear,
    pub up_proj: nn::Linear,
    pub down_proj: nn::Linear,
}

/// A decoder-only language model, Llama-shaped, bf16; the head is tied to the embedding.
#[derive(Payload)]
pub struct Decoder {
    pub embed_tokens: nn::Embedding,
    pub layers: Vec<DecoderBlock>,
    pub norm: RmsNorm,
    pub lm_head: nn::Linear,
}

impl Decoder {
    /// The number of distinct tensors of a decoder with `layers` blocks (the tied head is
    /// the embedding's tensor).
    pub fn tensor_count(layers: i64) -> i64 {
        9 * layers + 2
    }

    /// The bytes of the weights of a decoder with `layers` blocks (bf16).
    pub fn weight_bytes(layers: i64) -> i64 {
        let block = 4 * HIDDEN * HIDDEN + 3 * HIDDEN * MLP_HIDDEN + 2 * HIDDEN;
        2 * (VOCAB * HIDDEN + layers * block + HIDDEN)
    }

    /// Every distinct tensor under its Hugging Face Llama name (views, no copies).
    pub fn state_dict(&self) -> HashMap<String, Tensor> {
        let mut tensors = HashMap::new();
        tensors.insert("model.embed_tokens.weight".to_string(), self.embed_tokens.ws.shallow_clone());
        for (i, b) in self.layers.iter().enumerate() {
            for (name, t) in [
                ("input_layernorm", &b.input_norm.weight),
                ("self_attn.q_proj", &b.q_proj.ws),
                ("self_attn.k_proj", &b.k_proj.ws),
                ("self_attn.v_proj", &b.v_proj.ws),
                ("self_attn.o_proj", &b.o_proj.ws),
                ("post_attention_layernorm", &b.post_attention_norm.weight),
                ("mlp.gate_proj", &b.gate_proj.ws),
                ("mlp.up_proj", &b.up_proj.ws),
                ("mlp.down_proj", &b.down_proj.ws),
            ] {
                tensors.insert(format!("model.layers.{i}.{name}.weight"), t.shallow_clone());
            }
        }
        tensors.insert("model.norm.weight".to_string(), self.norm.weight.shallow_clone());
        tensors
    }
}

/// A bf16 weight on GPU 0, drawn from N(0, 0.02²) in place (no f32 copy).
fn bf16_weight(shape: [i64; 2]) -> Tensor {
    let mut w = Tensor::empty(shape, (tch::Kind::BFloat16, tch::Device::Cuda(0)));
    let _ = w.normal_(0.0, 0.02);
    w
}

fn bf16_linear(out_features: i64, in_features: i64) -> nn::Linear {
    nn::Linear { ws: bf16_weight([out_features, in_features]), bs: None }
}

fn rms_norm() -> RmsNorm {
    RmsNorm { weight: Tensor::ones([HIDDEN], (tch::Kind::BFloat16, tch::Device::Cuda(0))), eps: 1e-5 }
}

/// The cached decoder with `layers` blocks (32: about 7B parameters, 14 GB).
#[share(execution = "task", managed, concurrency = "serialized", cache_key = "decoder:{layers}")]
pub fn decoder(layers: i64) -> Decoder {
    // The embedding's configuration is private to tch: build a one-row placeholder, then
    // give it the real weight (drawn in bf16 on the GPU, not converted from f32).
    let vs = nn::VarStore::new(tch::Device::Cuda(0));
    let mut embed_tokens = nn::embedding(vs.root() / "embed_tokens", 1, HIDDEN, Default::default());
    embed_tokens.ws = bf16_weight([VOCAB, HIDDEN]);
    let lm_head = nn::Linear { ws: embed_tokens.ws.shallow_clone(), bs: None };
    let layers = (0..layers)
        .map(|_| DecoderBlock {
            input_norm: rms_norm(),
            q_proj: bf16_linear(HIDDEN, HIDDEN),
            k_proj: bf16_linear(HIDDEN, HIDDEN),
            v_proj: bf16_linear(HIDDEN, HIDDEN),
            o_proj: bf16_linear(HIDDEN, HIDDEN),
            post_attention_norm: rms_norm(),
            gate_proj: bf16_linear(MLP_HIDDEN, HIDDEN),
            up_proj: bf16_linear(MLP_HIDDEN, HIDDEN),
            down_proj: bf16_linear(HIDDEN, MLP_HIDDEN),
        })
        .collect();
    Decoder { embed_tokens, layers, norm: rms_norm(), lm_head }
}

/// The cached decoder's tensors as a state dict (views of its weights, cached itself).
#[share(execution = "direct", cache_key = "decoder_state_dict:{layers}")]
pub fn decoder_state_dict(layers: i64) -> Result<HashMap<String, Tensor>, String> {
    let model: Managed<Decoder> = decoder(layers).map_err(|e| e.to_string())?;
    Ok(model.state_dict())
}

/// The cached decoder's tensors in a `VarStore`, by the same names (views, cached itself).
#[share(execution = "direct", cache_key = "decoder_var_store:{layers}")]
pub fn decoder_var_store(layers: i64) -> Result<nn::VarStore, String> {
    let model: Managed<Decoder> = decoder(layers).map_err(|e| e.to_string())?;
    let store = nn::VarStore::new(tch::Device::Cuda(0));
    for (name, tensor) in model.state_dict() {
        // A path component may not contain a dot: walk the dotted name through sub-paths.
        let mut parts: Vec<&str> = name.split('.').collect();
        let leaf = parts.pop().unwrap_or_default();
        let path = parts.into_iter().fold(store.root(), |path, part| path / part);
        let _ = path.add(leaf, tensor, false);
    }
    Ok(store)
}

// ---- real models (GPU, tests/gpu_models.rs) ----

/// A language-model-shaped pair: a 2 GiB embedding (131072 × 4096 f32) and a small head.
#[derive(Payload)]
pub struct EmbeddingModel {
    pub embedding: nn::Embedding,
    pub head: nn::Linear,
}

impl EmbeddingModel {
    pub fn forward(&self, ids: &Tensor) -> Tensor {
        use tch::nn::Module;
        self.head.forward(&self.embedding.forward(ids))
    }
}

#[share(execution = "task", managed, concurrency = "serialized", cache_key = "embedding_model")]
pub fn real_embedding_model() -> EmbeddingModel {
    tch::manual_seed(21);
    let vs = nn::VarStore::new(tch::Device::Cuda(0));
    let embedding = nn::embedding(vs.root() / "emb", 131072, 4096, Default::default());
    let head = nn::linear(vs.root() / "head", 4096, 64, Default::default());
    EmbeddingModel { embedding, head }
}

/// The server's forward of the cached embedding model on `ids`.
#[share(execution = "direct", cache = false)]
pub fn embedding_model_forward(ids: Tensor) -> Tensor {
    let model: Managed<EmbeddingModel> = real_embedding_model().expect("the embedding model");
    model.forward(&ids)
}

/// A pre-norm decoder block: norms, q/k/v/o projections and a 3-matrix MLP.
#[derive(Payload)]
pub struct TinyDecoderBlock {
    pub attn_norm: nn::LayerNorm,
    pub q: nn::Linear,
    pub k: nn::Linear,
    pub v: nn::Linear,
    pub o: nn::Linear,
    pub mlp_norm: nn::LayerNorm,
    pub gate: nn::Linear,
    pub up: nn::Linear,
    pub down: nn::Linear,
}

/// A decoder-shaped model (bf16) whose output head is tied to its embedding.
#[derive(Payload)]
pub struct TinyDecoder {
    pub embedding: nn::Embedding,
    pub blocks: Vec<TinyDecoderBlock>,
    pub norm: nn::LayerNorm,
    pub head: nn::Linear,
}

impl TinyDecoder {
    /// A causal single-head forward: enough to use every weight.
    pub fn forward(&self, ids: &Tensor) -> Tensor {
        use tch::nn::Module;
        let mut x = self.embedding.forward(ids);
        let scale = (x.size()[2] as f64).sqrt();
        for b in &self.blocks {
            let h = b.attn_norm.forward(&x);
            let (q, k, v) = (b.q.forward(&h), b.k.forward(&h), b.v.forward(&h));
            let t = ids.size()[1];
            let mask = Tensor::ones([t, t], (tch::Kind::Bool, x.device())).triu(1);
            let att =
                (q.matmul(&k.transpose(1, 2)) / scale).masked_fill(&mask, f64::NEG_INFINITY).softmax(-1, x.kind());
            x = &x + b.o.forward(&att.matmul(&v));
            let h = b.mlp_norm.forward(&x);
            x = &x + b.down.forward(&(b.gate.forward(&h).silu() * b.up.forward(&h)));
        }
        self.head.forward(&self.norm.forward(&x))
    }
}

#[share(execution = "task", managed, concurrency = "serialized", cache_key = "decoder:{blocks}")]
pub fn decoder_model(blocks: i64) -> TinyDecoder {
    tch::manual_seed(22);
    let (vocab, hidden, mlp) = (32000, 1024, 2816);
    let mut vs = nn::VarStore::new(tch::Device::Cuda(0));
    let r = vs.root();
    let no_bias = nn::LinearConfig { bias: false, ..Default::default() };
    let linear = |p: nn::Path, i, o| nn::linear(p, i, o, no_bias);
    let embedding = nn::embedding(&r / "emb", vocab, hidden, Default::default());
    let blocks = (0..blocks)
        .map(|i| {
            let p = &r / "blocks" / i;
            TinyDecoderBlock {
                attn_norm: nn::layer_norm(&p / "attn_norm", vec![hidden], Default::default()),
                q: linear(&p / "q", hidden, hidden),
                k: linear(&p / "k", hidden, hidden),
                v: linear(&p / "v", hidden, hidden),
                o: linear(&p / "o", hidden, hidden),
                mlp_norm: nn::layer_norm(&p / "mlp_norm", vec![hidden], Default::default()),
                gate: linear(&p / "gate", hidden, mlp),
                up: linear(&p / "up", hidden, mlp),
                down: linear(&p / "down", mlp, hidden),
            }
        })
        .collect();
    let norm = nn::layer_norm(&r / "norm", vec![hidden], Default::default());
    let head = nn::Linear { ws: embedding.ws.shallow_clone(), bs: None };
    // In place: the modules hold the store's tensors, so they (and the tie) follow.
    vs.bfloat16();
    TinyDecoder { embedding, blocks, norm, head }
}

/// The server's forward of the cached decoder on `ids`.
#[share(execution = "direct", cache = false)]
pub fn decoder_forward(blocks: i64, ids: Tensor) -> Tensor {
    let model: Managed<TinyDecoder> = decoder_model(blocks).expect("the decoder");
    model.forward(&ids)
}

/// The sum (in f32) of row `row` of the cached decoder's head weight, as the server sees it.
#[share(execution = "direct", cache = false)]
pub fn decoder_head_row_sum(blocks: i64, row: i64) -> Tensor {
    let model: Managed<TinyDecoder> = decoder_model(blocks).expect("the decoder");
    model.head.ws.get(row).sum(tch::Kind::Float)
}

/// A VarStore of 40 f32 linears and a few bf16 variables, flattened with
/// `payload::flat::flatten_var_store`, and copies of its values taken before flattening.
#[share(execution = "direct", cache = false)]
pub fn flat_store() -> (nn::VarStore, std::collections::HashMap<String, Tensor>) {
    tch::manual_seed(23);
    let vs = nn::VarStore::new(tch::Device::Cuda(0));
    for i in 0..40 {
        let _ = nn::linear(vs.root() / "layers" / i, 64, 64, Default::default());
    }
    for i in 0..3 {
        let t = Tensor::randn([17 + i], (tch::Kind::BFloat16, tch::Device::Cuda(0)));
        let _ = (vs.root() / "bf16").add(&i.to_string(), t, false);
    }
    let before = vs.variables().into_iter().map(|(k, t)| (k, t.copy())).collect();
    let report = shared_tensor::payload::flat::flatten_var_store(&vs).expect("flattening");
    assert_eq!((report.tensors, report.buffers.len()), (83, 2));
    (vs, before)
}

/// Views of storage: what the client checks of the received recurrent layers.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Layout {
    /// Each weight's storage offset, in elements.
    pub offsets: Vec<i64>,
    /// Bytes from the storage's start to the end of the last weight.
    pub storage_bytes: u64,
}

/// Recurrent layers, an input, the server's outputs, and the layers' layouts as the
/// server sees them.
#[derive(Payload)]
pub struct RecurrentLayers {
    pub lstm: Lstm,
    pub gru: Gru,
    pub input: Tensor,
    pub outputs: Vec<Tensor>,
    #[payload(data)]
    pub layouts: Vec<Layout>,
}

/// A 2-layer bidirectional LSTM and a GRU built on CUDA (so laid out as cuDNN expects).
#[share(execution = "direct", cache = false)]
pub fn recurrent_layers(seed: i64) -> RecurrentLayers {
    tch::manual_seed(seed);
    let dev = tch::Device::Cuda(0);
    let vs = nn::VarStore::new(dev);
    let config = nn::RNNConfig { num_layers: 2, bidirectional: true, ..Default::default() };
    let lstm = Lstm::new(vs.root() / "lstm", 32, 64, config);
    let gru = Gru::new(vs.root() / "gru", 32, 48, Default::default());
    let input = Tensor::randn([4, 9, 32], (tch::Kind::Float, dev));
    let outputs = vec![lstm.seq(&input).0, gru.seq(&input).0];
    let layouts = vec![layout(&lstm.weights), layout(&gru.weights)];
    RecurrentLayers { lstm, gru, input, outputs, layouts }
}

/// The weights' storage offsets and storage size; panics unless they view one storage.
pub fn layout(weights: &[Tensor]) -> Layout {
    let views: Vec<_> = weights.iter().map(|w| shared_tensor::ipc::view_of(w).expect("a view")).collect();
    let base = |w: &Tensor, offset: i64| w.data_ptr() as i64 - offset * w.kind().elt_size_in_bytes() as i64;
    let first = base(&weights[0], views[0].storage_offset);
    for (w, v) in weights.iter().zip(&views) {
        assert_eq!(base(w, v.storage_offset), first, "every weight views one storage");
    }
    let storage_bytes =
        weights.iter().zip(&views).map(|(w, v)| (v.storage_offset as u64 + w.numel() as u64) * 4).max().unwrap_or(0);
    Layout { offsets: views.iter().map(|v| v.storage_offset).collect(), storage_bytes }
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

// ---- stopping (tests/shutdown.rs) ----

pub static LATE_GATE: Gate = Gate::new();

/// A managed result that comes late: once its server stops (`is_cancelled()`), the body
/// records itself and waits for the test's gate before returning.
#[share(execution = "task", managed, cache = false)]
pub fn late_object(tag: i64) {
    while !shared_tensor::task::is_cancelled() {
        std::thread::yield_now();
    }
    record("late_object", tag, Duration::ZERO);
    LATE_GATE.wait();
}
