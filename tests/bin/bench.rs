//! The shared-tensor benchmark: a real server process, real client processes, every hot
//! path against the floors measured in the same run (TCP and Unix socket echoes; calls
//! go over the server's Unix socket, as a user's do, and a ping and an identity over TCP).
//!
//! `bench` starts the server (`endpoint_server` in the server role), measures, prints a
//! table with each figure's ratio to the floor and writes JSON to `$OUT/bench.json` (or
//! `./bench.json`). Client processes for the first-call, throughput and scaling figures
//! are this binary again (`bench child ...`). GPU timings stop after the consumer's
//! stream has the data (a stream synchronize inside the timed region).
//!
//! `bench transports [rounds]` runs the same calls over the Unix socket and over TCP in
//! turn, with both echo floors: the transports compared at the same moment; then three
//! rounds of the throughput load. `bench spin
//! [rounds]` does the same with spinning off and on (`SHARED_TENSOR_SPIN_US`), and the
//! throughput load against each.
//!
//! `bench tensors [calls]` runs only the rows whose cost grows with the tensors of a call:
//! identity with 1, 16 and 256 tensors, and the cached fetches of the N=32 decoder's state
//! dict (290 tensors) as a `HashMap` and as a `VarStore`; each row's p50 and p99.
//!
//! `bench models [--quick]` runs only the LLM-shaped rows (an embedding model, decoders,
//! state dicts; they also end a full run) and writes `$OUT/bench-models.json`.
//!
//! `cargo xtask bench` runs it where a GPU is present; the GPU bundle carries it
//! (`.gpu-bundle/run.sh bench`, `.gpu-bundle/run.sh bench models`).

#[path = "../endpoints.rs"]
mod endpoints;
#[path = "profiling.rs"]
mod profiling;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;
use shared_tensor::config::{Config, Role};
use tch::{Kind, Tensor};

/// Size of each echo frame of the floor, close to an identity request and reply.
const FLOOR_FRAME: usize = 256;

#[derive(Serialize, Clone)]
struct Figure {
    name: String,
    calls: usize,
    p50_us: f64,
    p99_us: f64,
    ratio_to_floor: f64,
}

#[derive(Serialize, Default)]
struct Report {
    date_unix: u64,
    gpu: String,
    floor_frame_bytes: usize,
    figures: Vec<Figure>,
    first_call_p50_us: f64,
    throughput_calls_per_s: f64,
    scaling_tensor_count: Vec<(usize, f64)>,
    scaling_processes: Vec<(usize, f64)>,
    model_build_ms: f64,
    breakdown: Vec<(String, f64)>,
    /// The LLM-shaped model rows (their fetch figures are in `figures`).
    models: ModelRows,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Runs `f` `warmup` times, then times `n` calls; returns microseconds, sorted.
fn measure(n: usize, warmup: usize, mut f: impl FnMut()) -> Vec<f64> {
    for _ in 0..warmup {
        f();
    }
    let mut times: Vec<f64> = (0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times
}

fn sync() {
    shared_tensor::cuda::synchronize_stream(0).expect("stream synchronize");
}

/// `n` round trips of one frame each way through `client`, echoed back by `server` on
/// its own thread: plain Rust sockets, the floor for any RPC over them.
fn echo_times<S: Read + Write + Send + 'static>(n: usize, mut client: S, mut server: S) -> Vec<f64> {
    std::thread::spawn(move || {
        let mut buf = [0u8; FLOOR_FRAME];
        while server.read_exact(&mut buf).is_ok() {
            if server.write_all(&buf).is_err() {
                break;
            }
        }
    });
    let out = [7u8; FLOOR_FRAME];
    let mut back = [0u8; FLOOR_FRAME];
    measure(n, 200, || {
        client.write_all(&out).unwrap();
        client.read_exact(&mut back).unwrap();
    })
}

/// The echo over loopback TCP (`TCP_NODELAY` on both ends).
fn floor(n: usize) -> Vec<f64> {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    client.set_nodelay(true).unwrap();
    server.set_nodelay(true).unwrap();
    echo_times(n, client, server)
}

/// The same echo over a Unix domain socket: the floor of the default transport.
fn unix_floor(n: usize) -> Vec<f64> {
    let (client, server) = std::os::unix::net::UnixStream::pair().unwrap();
    echo_times(n, client, server)
}

/// The floors over `n` echoes (TCP, Unix socket) and the TCP floor's p50, which the
/// ratios are to.
fn floor_figures(n: usize) -> (Vec<Figure>, f64) {
    let times = floor(n);
    let p50 = percentile(&times, 0.5);
    let tcp = figure(&format!("floor: TCP echo {FLOOR_FRAME} B"), &times, p50);
    let unix = figure(&format!("floor: Unix socket echo {FLOOR_FRAME} B"), &unix_floor(n), p50);
    (vec![tcp, unix], p50)
}

fn figure(name: &str, times: &[f64], floor_p50: f64) -> Figure {
    let p50 = percentile(times, 0.5);
    Figure {
        name: name.into(),
        calls: times.len(),
        p50_us: p50,
        p99_us: percentile(times, 0.99),
        ratio_to_floor: p50 / floor_p50,
    }
}

fn child(args: &[String]) -> shared_tensor::Result<()> {
    let device = shared_tensor::cuda::device()?;
    let x = Tensor::ones([4], (Kind::Float, device));
    match args.first().map(String::as_str) {
        Some("first-call") => {
            let t = Instant::now();
            let y = endpoints::identity(x.shallow_clone())?;
            sync();
            println!("FIRST_US {}", t.elapsed().as_secs_f64() * 1e6);
            drop(y);
        }
        Some("throughput") => {
            let secs: f64 = args[1].parse().unwrap();
            let threads: usize = args[2].parse().unwrap();
            drop(endpoints::identity(x.shallow_clone())?); // connect before the clock
            println!("READY");
            let go = Instant::now() + Duration::from_millis(500);
            let deadline = go + Duration::from_secs_f64(secs);
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    let x = x.shallow_clone();
                    std::thread::spawn(move || {
                        std::thread::sleep(go.saturating_duration_since(Instant::now()));
                        let mut calls = 0u64;
                        while Instant::now() < deadline {
                            drop(endpoints::identity(x.shallow_clone()).expect("identity"));
                            calls += 1;
                        }
                        calls
                    })
                })
                .collect();
            let total: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
            println!("CALLS {total}");
        }
        Some("profile-import") => {
            let mut stdin = std::io::stdin().lock();
            let mut bytes = Vec::new();
            stdin.read_to_end(&mut bytes).unwrap();
            let desc: shared_tensor::ipc::TensorDescriptor = rmp_serde::from_slice(&bytes).unwrap();
            for (name, us) in shared_tensor::diagnostics::import_steps(&desc, 1000)? {
                println!("STEP consumer: {name}\t{us}");
            }
            println!("DONE");
        }
        Some("latency") => {
            let iters: usize = args[1].parse().unwrap();
            let times = measure(iters, 50, || {
                let _ = endpoints::identity(x.shallow_clone()).expect("identity");
                sync();
            });
            println!("P50_US {}", percentile(&times, 0.5));
        }
        Some("fetch-model") => {
            // Connected first, so that the figure is the fetch (the connect is reported apart).
            let model = Model::from_args(&args[1..]);
            let t = Instant::now();
            shared_tensor::ping()?;
            let connect_us = t.elapsed().as_secs_f64() * 1e6;
            let (value, first_us, held) = fetch_held(|| model.fetch());
            let verdict = value.check().err().unwrap_or_else(|| "ok".into());
            println!(
                "FETCHED {first_us} {connect_us} {} {} {} {} {verdict}",
                held.rss, held.peak_rss, held.allocated, held.reserved
            );
            drop(value);
        }
        other => panic!("unknown child mode {other:?}"),
    }
    Ok(())
}

fn spawn_child(port: u16, args: &[&str]) -> std::process::Child {
    spawn_child_with(port, args, &[])
}

/// [`spawn_child`], with `env` added to the child's environment.
fn spawn_child_with(port: u16, args: &[&str], env: &[(&str, String)]) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .arg("child")
        .args(args)
        .env("SHARED_TENSOR_BASE_PORT", port.to_string())
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env_remove("SHARED_TENSOR_ROLE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn a bench client")
}

/// Reads the child's lines until one starts with `prefix`; returns the rest.
fn read_line(child: &mut std::process::Child, prefix: &str) -> String {
    try_read_line(child, prefix).unwrap_or_else(|| panic!("a bench process exited before printing {prefix}"))
}

/// Reads the child's lines until one starts with `prefix`; returns the rest, or `None` if
/// the child's output ends first.
fn try_read_line(child: &mut std::process::Child, prefix: &str) -> Option<String> {
    let out = child.stdout.as_mut().unwrap();
    let mut line = String::new();
    let mut reader = BufReader::new(out);
    loop {
        line.clear();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        if let Some(v) = line.trim().strip_prefix(prefix) {
            return Some(v.trim().to_string());
        }
    }
}

fn read_value(child: &mut std::process::Child, prefix: &str) -> f64 {
    let value = read_line(child, prefix);
    value.parse().unwrap_or_else(|_| panic!("{prefix} {value:?} is not a number"))
}

/// Calls per second of 8 client processes × 4 threads calling `identity` on 16 B for
/// `secs` seconds.
fn throughput(port: u16, secs: f64) -> f64 {
    throughput_with(port, secs, &[])
}

/// [`throughput`], with `env` added to the client processes' environment.
fn throughput_with(port: u16, secs: f64, env: &[(&str, String)]) -> f64 {
    let secs_s = secs.to_string();
    let mut children: Vec<_> = (0..8).map(|_| spawn_child_with(port, &["throughput", &secs_s, "4"], env)).collect();
    for c in children.iter_mut() {
        read_line(c, "READY");
    }
    let total: f64 = children.iter_mut().map(|c| read_value(c, "CALLS")).sum();
    children.iter_mut().for_each(|c| drop(c.wait()));
    total / secs
}

/// The server process, stopped when dropped (an early return included).
struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the endpoint server; `env` is added to its environment.
fn start_server(port: u16, env: &[(&str, String)]) -> Server {
    let server_exe = std::env::var_os("SHARED_TENSOR_TEST_BIN_DIR")
        .map(|d| std::path::PathBuf::from(d).join("endpoint_server"))
        .unwrap_or_else(|| std::env::current_exe().unwrap().with_file_name("endpoint_server"));
    let mut server = Command::new(&server_exe)
        .env("SHARED_TENSOR_ROLE", "server")
        .env("ST_TEST_SERVER", "role")
        .env("SHARED_TENSOR_BASE_PORT", port.to_string())
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped()) // the server exits when this process does
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the endpoint server");
    read_line(&mut server, "READY");
    Server(server)
}

// ---- LLM-shaped models: an embedding model, decoders, state dicts ----

/// A model row's subject: what one fetch calls.
#[derive(Clone, Copy)]
enum Model {
    /// `embedding_model`: a 2 GiB f32 embedding and a small head.
    Embedding,
    /// `decoder(layers)`: bf16, the head tied to the embedding.
    Decoder(i64),
    /// `decoder_state_dict(layers)`: the decoder's tensors as a `HashMap<String, Tensor>`.
    StateDict(i64),
    /// `decoder_var_store(layers)`: the decoder's tensors in an `nn::VarStore`.
    VarStore(i64),
}

/// One fetched model, held until dropped.
enum Fetched {
    Embedding(shared_tensor::Managed<endpoints::EmbeddingHead>),
    Decoder(shared_tensor::Managed<endpoints::Decoder>, i64),
    StateDict(HashMap<String, Tensor>, i64),
    VarStore(tch::nn::VarStore, i64),
}

impl Model {
    /// The model's name in the tables (the same for every runtime and every run mode).
    fn label(self) -> String {
        let decoder = |layers: i64| {
            format!(
                "decoder N={layers} bf16 ({} tensors, {:.1} GB)",
                endpoints::Decoder::tensor_count(layers),
                endpoints::Decoder::weight_bytes(layers) as f64 / 1e9
            )
        };
        match self {
            Model::Embedding => "embedding 2 GiB f32 + head".into(),
            Model::Decoder(layers) => decoder(layers),
            Model::StateDict(layers) => {
                format!("state dict HashMap {} tensors (decoder N={layers})", endpoints::Decoder::tensor_count(layers))
            }
            Model::VarStore(layers) => {
                format!("VarStore {} tensors (decoder N={layers})", endpoints::Decoder::tensor_count(layers))
            }
        }
    }

    /// The arguments of `bench child fetch-model ...`.
    fn args(self) -> Vec<String> {
        match self {
            Model::Embedding => vec!["embedding".into()],
            Model::Decoder(l) => vec!["decoder".into(), l.to_string()],
            Model::StateDict(l) => vec!["state-dict".into(), l.to_string()],
            Model::VarStore(l) => vec!["var-store".into(), l.to_string()],
        }
    }

    fn from_args(args: &[String]) -> Model {
        let layers = || args.get(1).and_then(|l| l.parse().ok()).expect("a layer count");
        match args.first().map(String::as_str) {
            Some("embedding") => Model::Embedding,
            Some("decoder") => Model::Decoder(layers()),
            Some("state-dict") => Model::StateDict(layers()),
            Some("var-store") => Model::VarStore(layers()),
            other => panic!("unknown model {other:?}"),
        }
    }

    /// One call; the value stays until the `Fetched` is dropped.
    fn fetch(self) -> Fetched {
        match self {
            Model::Embedding => Fetched::Embedding(endpoints::embedding_model().expect("embedding_model")),
            Model::Decoder(l) => Fetched::Decoder(endpoints::decoder(l).expect("decoder"), l),
            Model::StateDict(l) => Fetched::StateDict(endpoints::decoder_state_dict(l).expect("decoder_state_dict"), l),
            Model::VarStore(l) => Fetched::VarStore(endpoints::decoder_var_store(l).expect("decoder_var_store"), l),
        }
    }
}

/// Checks that the tensor `what` has `size` and `kind` and lies on a GPU.
fn check_tensor(what: &str, t: &Tensor, size: &[i64], kind: Kind) -> Result<(), String> {
    if t.size() != size || t.kind() != kind || !t.device().is_cuda() {
        return Err(format!(
            "{what} is {:?} {:?} on {:?}, expected {size:?} {kind:?} on a GPU",
            t.size(),
            t.kind(),
            t.device()
        ));
    }
    Ok(())
}

impl Fetched {
    /// Shapes and dtypes as built on the server, and the decoder's tie kept.
    fn check(&self) -> Result<(), String> {
        use endpoints::{HEAD_OUT, HIDDEN, MLP_HIDDEN, VOCAB};
        let embedding_weight = |t: &Tensor| check_tensor("the embedding weight", t, &[VOCAB, HIDDEN], Kind::BFloat16);
        let count = |found: usize, layers: i64| {
            let expected = endpoints::Decoder::tensor_count(layers) as usize;
            if found == expected {
                Ok(())
            } else {
                Err(format!("{found} tensors arrived, expected {expected}"))
            }
        };
        match self {
            Fetched::Embedding(m) => {
                check_tensor("the embedding weight", &m.embedding.ws, &[VOCAB, HIDDEN], Kind::Float)?;
                check_tensor("the head weight", &m.head.ws, &[HEAD_OUT, HIDDEN], Kind::Float)
            }
            Fetched::Decoder(m, layers) => {
                if m.layers.len() as i64 != *layers {
                    return Err(format!("{} blocks arrived, expected {layers}", m.layers.len()));
                }
                embedding_weight(&m.embed_tokens.ws)?;
                check_tensor("the final norm", &m.norm.weight, &[HIDDEN], Kind::BFloat16)?;
                for b in &m.layers {
                    check_tensor("q_proj", &b.q_proj.ws, &[HIDDEN, HIDDEN], Kind::BFloat16)?;
                    check_tensor("up_proj", &b.up_proj.ws, &[MLP_HIDDEN, HIDDEN], Kind::BFloat16)?;
                    check_tensor("down_proj", &b.down_proj.ws, &[HIDDEN, MLP_HIDDEN], Kind::BFloat16)?;
                }
                let (head, embedding) = (m.lm_head.ws.data_ptr(), m.embed_tokens.ws.data_ptr());
                if head != embedding {
                    return Err(format!(
                        "the tie did not survive: the head's weight is at {head:?}, the embedding's at {embedding:?}"
                    ));
                }
                Ok(())
            }
            Fetched::StateDict(tensors, layers) => {
                count(tensors.len(), *layers)?;
                embedding_weight(tensors.get("model.embed_tokens.weight").ok_or("no model.embed_tokens.weight")?)
            }
            Fetched::VarStore(store, layers) => {
                let tensors = store.variables();
                count(tensors.len(), *layers)?;
                embedding_weight(tensors.get("model.embed_tokens.weight").ok_or("no model.embed_tokens.weight")?)
            }
        }
    }
}

/// This process's memory, in bytes: host RSS, peak host RSS (since the last reset) and the
/// CUDA caching allocator of device 0; or the difference of two such readings.
#[derive(Clone, Copy)]
struct Memory {
    rss: f64,
    peak_rss: f64,
    allocated: f64,
    reserved: f64,
}

impl Memory {
    fn now() -> Memory {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        // In kB whatever the page size.
        let kib = |field: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(field)?.trim().strip_suffix("kB")?.trim().parse::<f64>().ok())
                .map_or(f64::NAN, |k| k * 1024.0)
        };
        let cuda = shared_tensor::cuda::memory_stats(0).expect("CUDA memory statistics");
        Memory {
            rss: kib("VmRSS:"),
            peak_rss: kib("VmHWM:"),
            allocated: cuda.allocated_bytes as f64,
            reserved: cuda.reserved_bytes as f64,
        }
    }
}

/// Fetches (call and stream synchronize) and returns the value, the microseconds it took,
/// and what holding it costs this process: host RSS and the CUDA allocator while holding
/// it, and the host RSS peak during the fetch (NaN where the kernel cannot reset the peak).
fn fetch_held<T>(fetch: impl FnOnce() -> T) -> (T, f64, Memory) {
    // Writing 5 to clear_refs sets the peak RSS (VmHWM) to the current RSS.
    let peak_known = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let before = Memory::now();
    let t = Instant::now();
    let value = fetch();
    sync();
    let us = t.elapsed().as_secs_f64() * 1e6;
    let after = Memory::now();
    let held = Memory {
        rss: after.rss - before.rss,
        peak_rss: if peak_known { after.peak_rss - before.peak_rss } else { f64::NAN },
        allocated: after.allocated - before.allocated,
        reserved: after.reserved - before.reserved,
    };
    (value, us, held)
}

/// A row of the client memory table, in MiB.
#[derive(Serialize, Clone)]
struct MemoryRow {
    name: String,
    host_rss_mib: f64,
    peak_host_rss_mib: f64,
    allocator_allocated_mib: f64,
    allocator_reserved_mib: f64,
}

impl MemoryRow {
    fn new(name: String, held: Memory) -> MemoryRow {
        let mib = |bytes: f64| bytes / (1u64 << 20) as f64;
        MemoryRow {
            name,
            host_rss_mib: mib(held.rss),
            peak_host_rss_mib: mib(held.peak_rss),
            allocator_allocated_mib: mib(held.allocated),
            allocator_reserved_mib: mib(held.reserved),
        }
    }
}

/// What the model rows report besides their fetch figures.
#[derive(Serialize, Default)]
struct ModelRows {
    /// Cached fetches per row of a model (state dicts: `state_dict_fetches`).
    fetches: usize,
    state_dict_fetches: usize,
    /// First call of each model: the server builds it, this process receives it.
    builds_ms: Vec<(String, f64)>,
    /// The fresh client processes' connect (a ping) before their first fetch, p50.
    fresh_connect_p50_us: Vec<(String, f64)>,
    memory: Vec<MemoryRow>,
    /// Each check and its verdict: "ok" or what was wrong.
    checks: Vec<(String, String)>,
}

impl ModelRows {
    fn check(&mut self, what: String, verdict: Result<(), String>) {
        self.checks.push((what, verdict.err().unwrap_or_else(|| "ok".into())));
    }

    fn failed(&self) -> usize {
        self.checks.iter().filter(|(_, v)| v != "ok").count()
    }
}

/// The rows of one model: its first call (the build), `fetches` cached fetches (each: call,
/// stream synchronize, drop), one more while one is held (memory), and `fresh` first
/// fetches in fresh client processes (figure and memory, medians). Returns the first
/// call's value: the model stays cached while it lives.
#[allow(clippy::too_many_arguments)]
fn model_rows(
    model: Model,
    port: u16,
    fetches: usize,
    warmup: usize,
    fresh: usize,
    floor_p50: f64,
    figures: &mut Vec<Figure>,
    rows: &mut ModelRows,
) -> Fetched {
    let label = model.label();
    let t = Instant::now();
    let first = model.fetch();
    sync();
    rows.builds_ms.push((label.clone(), t.elapsed().as_secs_f64() * 1e3));
    rows.check(format!("{label}: first call"), first.check());

    let times = measure(fetches, warmup, || {
        let value = model.fetch();
        sync();
        drop(value);
    });
    figures.push(figure(&format!("{label}: cached fetch"), &times, floor_p50));
    let (value, _, held) = fetch_held(|| model.fetch());
    rows.check(format!("{label}: cached fetch"), value.check());
    rows.memory.push(MemoryRow::new(format!("{label}: cached fetch, one already held"), held));
    drop(value);

    if fresh > 0 {
        let (mut firsts, mut connects, mut helds) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..fresh {
            let args: Vec<String> = ["fetch-model".to_string()].into_iter().chain(model.args()).collect();
            let mut c = spawn_child(port, &args.iter().map(String::as_str).collect::<Vec<_>>());
            let line = try_read_line(&mut c, "FETCHED");
            let _ = c.wait();
            let what = format!("{label}: fresh client process {}", i + 1);
            let Some(line) = line else {
                rows.check(what, Err("the process exited without a result (see its stderr)".into()));
                continue;
            };
            let mut parts = line.splitn(7, ' ');
            let mut number = || parts.next().and_then(|v| v.parse::<f64>().ok()).unwrap_or(f64::NAN);
            let (first, connect) = (number(), number());
            let held = Memory { rss: number(), peak_rss: number(), allocated: number(), reserved: number() };
            let verdict = parts.next().unwrap_or("no verdict").to_string();
            rows.check(what, if verdict == "ok" { Ok(()) } else { Err(verdict) });
            firsts.push(first);
            connects.push(connect);
            helds.push(held);
        }
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            percentile(&v, 0.5)
        };
        let field = |f: fn(&Memory) -> f64| median(helds.iter().map(f).collect());
        let held = Memory {
            rss: field(|h| h.rss),
            peak_rss: field(|h| h.peak_rss),
            allocated: field(|h| h.allocated),
            reserved: field(|h| h.reserved),
        };
        firsts.sort_by(f64::total_cmp);
        let name = format!("{label}: first fetch in a fresh client process (p50 of {})", firsts.len());
        figures.push(figure(&name, &firsts, floor_p50));
        rows.fresh_connect_p50_us.push((label.clone(), median(connects)));
        rows.memory.push(MemoryRow::new(format!("{label}: first fetch in a fresh client process (median)"), held));
    }
    first
}

/// The LLM-shaped rows: a 2 GiB embedding model, decoders of 2 and 32 blocks (bf16, head
/// tied to the embedding), and the 32-block decoder's tensors as a `HashMap` and a
/// `VarStore`. Each model is freed (handles dropped, cache entries gone) before the next.
fn llm_rows(port: u16, quick: bool, floor_p50: f64, figures: &mut Vec<Figure>) -> ModelRows {
    // A fetch rebuilding an embedding costs ~200 ms on the runtime before issue 14: keep
    // the heavy rows short.
    let (fetches, state_dict_fetches) = if quick { (20, 50) } else { (30, 200) };
    let mut rows = ModelRows { fetches, state_dict_fetches, ..ModelRows::default() };
    let fresh = if quick { 3 } else { 5 };
    for (model, fresh) in [(Model::Embedding, fresh - 1), (Model::Decoder(2), fresh)] {
        drop(model_rows(model, port, fetches, 2, fresh, floor_p50, figures, &mut rows));
    }
    let decoder = model_rows(Model::Decoder(32), port, fetches, 2, fresh, floor_p50, figures, &mut rows);
    for model in [Model::StateDict(32), Model::VarStore(32)] {
        drop(model_rows(model, port, state_dict_fetches, 5, 0, floor_p50, figures, &mut rows));
    }
    // The state dicts are views of the decoder's weights: free them with it.
    let _ = endpoints::decoder_state_dict::invalidate(32);
    let _ = endpoints::decoder_var_store::invalidate(32);
    drop(decoder);
    // The release reaches the server ahead of this request: the 14 GB are freed now.
    let _ = shared_tensor::ping();
    rows
}

/// A two-column table: `header` names both columns, each row a name and a value.
fn print_named_values(header: &str, rows: &[(String, f64)]) {
    println!("\n| {header} |\n| --- | ---: |");
    for (name, value) in rows {
        println!("| {name} | {value:.1} |");
    }
}

fn print_llm_rows(rows: &ModelRows) {
    print_named_values("model (first call: built on the server, received here) | build ms", &rows.builds_ms);
    print_named_values(
        "model | fresh client: connect (ping) before its first fetch, p50 µs",
        &rows.fresh_connect_p50_us,
    );
    println!(
        "\n| client memory while holding one | host RSS Δ MiB | peak host RSS Δ during the fetch MiB \
         | CUDA allocator allocated Δ MiB | reserved Δ MiB |\n| --- | ---: | ---: | ---: | ---: |"
    );
    for m in &rows.memory {
        println!(
            "| {} | {:.2} | {:.2} | {:.2} | {:.2} |",
            m.name, m.host_rss_mib, m.peak_host_rss_mib, m.allocator_allocated_mib, m.allocator_reserved_mib
        );
    }
    println!("\n| check (shapes, dtypes; the decoder's head tied to its embedding) | result |\n| --- | --- |");
    for (what, verdict) in &rows.checks {
        let verdict = if verdict == "ok" { "ok".to_string() } else { format!("FAILED: {verdict}") };
        println!("| {what} | {verdict} |");
    }
}

/// One call of an interleaved comparison, made through the client it is given.
type Step<'a> = Box<dyn Fn(&shared_tensor::client::Client) + 'a>;

/// The calls that `bench transports` and `bench spin` compare: a ping, a no-op call,
/// identities of a 16 B tensor (direct by reference, and as a task) and a cached 4 MiB
/// result, each ending when the caller's stream has the data.
fn compared_calls(x: &Tensor) -> Vec<(&'static str, Step<'_>)> {
    use shared_tensor::client::Client;
    use shared_tensor::control::Control;
    vec![
        (
            "ping",
            Box::new(|c: &Client| {
                c.ping().unwrap();
            }),
        ),
        ("no-op call (direct)", Box::new(|c: &Client| c.call::<(), _>("noop", ()).unwrap())),
        (
            "identity 16 B (direct, by reference)",
            Box::new(move |c: &Client| {
                let y: Tensor = c.call("identity_ref", (x,)).unwrap();
                sync();
                drop(y);
            }),
        ),
        (
            "identity 16 B (task)",
            Box::new(move |c: &Client| {
                let y: Tensor = c.call("identity", (x.shallow_clone(),)).unwrap();
                sync();
                drop(y);
            }),
        ),
        (
            "cached 4 MiB result",
            Box::new(|c: &Client| {
                let y: Tensor = c.call("cached_tensor", ()).unwrap();
                sync();
                drop(y);
            }),
        ),
    ]
}

/// Runs every step through both clients in turn, `rounds` times after 100 warm-up calls
/// each (the order swapped every round, so that both see the host at the same moment),
/// and prints a row per step: p50 of each client, then p99 of each.
fn interleaved(clients: [&shared_tensor::client::Client; 2], steps: &[(&str, Step)], rounds: usize) {
    for (name, step) in steps {
        let mut times = [Vec::with_capacity(rounds), Vec::with_capacity(rounds)];
        for c in clients {
            for _ in 0..100 {
                step(c);
            }
        }
        for round in 0..rounds {
            for k in [round % 2, 1 - round % 2] {
                let t = Instant::now();
                step(clients[k]);
                times[k].push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        for t in &mut times {
            t.sort_by(f64::total_cmp);
        }
        println!(
            "| {name} | {:.1} | {:.1} | {:.1} | {:.1} |",
            percentile(&times[0], 0.5),
            percentile(&times[1], 0.5),
            percentile(&times[0], 0.99),
            percentile(&times[1], 0.99)
        );
    }
}

/// Prints the two echo floors, `rounds` each, as a row of the interleaved tables.
fn print_floors(rounds: usize) {
    let (tcp_floor, unix_floor) = (floor(rounds), unix_floor(rounds));
    println!(
        "| floor: echo {FLOOR_FRAME} B, Unix / TCP (blocking sockets) | {:.1} | {:.1} | {:.1} | {:.1} |",
        percentile(&unix_floor, 0.5),
        percentile(&tcp_floor, 0.5),
        percentile(&unix_floor, 0.99),
        percentile(&tcp_floor, 0.99)
    );
}

/// A free loopback port.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `bench transports [calls]`: the same calls over the server's Unix socket and over TCP
/// loopback, one of each in turn (the order swapped every round), so that both see the
/// same host at the same moment; with the two echo floors measured the same way.
fn transports(args: &[String]) -> shared_tensor::Result<()> {
    use shared_tensor::client::Client;
    use shared_tensor::transport::Transport;
    let rounds: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(2000);
    let device = shared_tensor::cuda::device()?;
    let port = free_port();
    let server = start_server(port, &[]);
    let config = Config::default().role(Role::Client).base_port(port);
    shared_tensor::configure(config.clone())?;
    let unix = Client::new(&config.clone().transport(Transport::Unix))?;
    let tcp = Client::new(&config.transport(Transport::Tcp))?;
    let x = Tensor::ones([4], (Kind::Float, device));
    println!("\nshared-tensor transports, {rounds} rounds, Unix socket and TCP in turn");
    println!("| figure | Unix p50 µs | TCP p50 µs | Unix p99 µs | TCP p99 µs |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    print_floors(rounds);
    interleaved([&unix, &tcp], &compared_calls(&x), rounds);
    for (name, c) in [("unix", &unix), ("tcp", &tcp)] {
        assert_eq!(c.transport().map(|t| t.to_string()).as_deref(), Some(name), "each client kept its transport");
    }
    drop((unix, tcp));
    // The throughput load (over the Unix socket, the default), three rounds of 3 s.
    for round in 1..=3 {
        println!(
            "throughput round {round}, 8 processes × 4 threads, identity 16 B: {:.0} calls/s",
            throughput(port, 3.0)
        );
    }
    drop(server);
    Ok(())
}

/// `calls` identity calls of `count` small tensors each (after `warmup`), each until the
/// caller's stream has the result: µs, sorted.
fn identity_many_times(device: tch::Device, count: usize, calls: usize, warmup: usize) -> Vec<f64> {
    let xs: Vec<Tensor> = (0..count).map(|_| Tensor::ones([4], (Kind::Float, device))).collect();
    measure(calls, warmup, || {
        let ys = endpoints::identity_many(xs.iter().map(Tensor::shallow_clone).collect()).unwrap();
        sync();
        drop(ys);
    })
}

/// `bench tensors [calls]`: the rows whose cost grows with the tensors of a call (see the
/// module's documentation), `calls` timed per row after a warm-up.
fn tensors(args: &[String]) -> shared_tensor::Result<()> {
    let calls: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(500);
    let device = shared_tensor::cuda::device()?;
    let port = free_port();
    let server = start_server(port, &[]);
    shared_tensor::configure(Config::default().role(Role::Client).base_port(port))?;
    println!("\nshared-tensor tensors per call, {calls} calls per row");
    println!("| figure | p50 µs | p99 µs |\n| --- | ---: | ---: |");
    let row = |name: &str, times: &[f64]| {
        println!("| {name} | {:.1} | {:.1} |", percentile(times, 0.5), percentile(times, 0.99));
    };
    for count in [1usize, 16, 256] {
        row(&format!("identity, {count} tensors in one call"), &identity_many_times(device, count, calls, 50));
    }
    // Built (seconds) and cached by the first call; the model stays cached meanwhile.
    let _model = endpoints::decoder(32)?;
    let times = measure(calls, 5, || drop(endpoints::decoder_state_dict(32).unwrap()));
    row("state dict HashMap 290 tensors: cached fetch", &times);
    let times = measure(calls, 5, || drop(endpoints::decoder_var_store(32).unwrap()));
    row("state dict VarStore 290 tensors: cached fetch", &times);
    drop(server);
    Ok(())
}

/// `bench spin [calls]`: the same calls with spinning off and on ([`Config::spin`]), one
/// of each in turn: two servers of this host, one started with `SHARED_TENSOR_SPIN_US=0`
/// and one with the host's default, each called by a client of the same setting. Then
/// the throughput load (8 processes × 4 threads, identity 16 B) against each server in
/// turn, three times, its clients with the server's setting.
fn spin(args: &[String]) -> shared_tensor::Result<()> {
    use shared_tensor::client::Client;
    let rounds: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(2000);
    let device = shared_tensor::cuda::device()?;
    let on = Config::default().role(Role::Client);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if on.get_spin().is_zero() {
        println!("this host ({cpus} CPUs) does not spin by default: both sides are the same");
    }
    let off_port = free_port();
    let on_port = std::iter::repeat_with(free_port).find(|&p| p != off_port).unwrap();
    let off_env = [("SHARED_TENSOR_SPIN_US", "0".to_string())];
    let off_server = start_server(off_port, &off_env);
    let on_server = start_server(on_port, &[]);
    let on = on.base_port(on_port);
    shared_tensor::configure(on.clone())?;
    let off_client = Client::new(&on.clone().base_port(off_port).spin(Duration::ZERO))?;
    let on_client = Client::new(&on)?;
    let x = Tensor::ones([4], (Kind::Float, device));
    println!("\nshared-tensor spin, {rounds} rounds, spinning off and on ({:?}, {cpus} CPUs) in turn", on.get_spin());
    println!("| figure | off p50 µs | on p50 µs | off p99 µs | on p99 µs |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    print_floors(rounds);
    interleaved([&off_client, &on_client], &compared_calls(&x), rounds);
    drop((off_client, on_client));
    println!("\n| throughput, 8 processes × 4 threads, identity 16 B, 3 s | off calls/s | on calls/s |");
    println!("| --- | ---: | ---: |");
    for round in 1..=3 {
        let off = throughput_with(off_port, 3.0, &off_env);
        let on = throughput_with(on_port, 3.0, &[]);
        println!("| round {round} | {off:.0} | {on:.0} |");
    }
    drop((off_server, on_server));
    Ok(())
}

/// `bench profile <model|identity|identity256|statedict|throughput> <seconds>`: one workload in a loop while
/// the server and (except for `throughput`, whose load runs in 8 child processes) the
/// client, this process, are sampled; folded stacks go to
/// `$OUT/{client,server}-<workload>.folded`. Needs `--features profile`.
fn profile(args: &[String]) -> shared_tensor::Result<()> {
    let workload = args.first().map(String::as_str).unwrap_or("model").to_string();
    let secs: f64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(5.0);
    let out = std::env::var_os("OUT").map(std::path::PathBuf::from).unwrap_or_else(|| ".".into());
    let warmup = 1.0;
    let port = free_port();
    let server_file = out.join(format!("server-{workload}.folded")).display().to_string();
    let server_secs = if workload == "throughput" { warmup + secs } else { secs };
    let mut server = start_server(port, &[("ST_PROFILE", server_file), ("ST_PROFILE_SECS", server_secs.to_string())]);
    // The server samples from this line on, for `server_secs`.
    let start_server_profile = move || {
        let stdin = server.0.stdin.as_mut().expect("the server's stdin is piped");
        writeln!(stdin, "PROFILE").and_then(|()| stdin.flush()).expect("ask the server to profile");
        server
    };
    // From the environment, as the server's: `SHARED_TENSOR_SPIN_US=0` keeps spinning out
    // of both processes' samples.
    shared_tensor::configure(Config::from_env()?.role(Role::Client).base_port(port))?;
    if workload == "throughput" {
        // The throughput figure's load (8 processes × 4 threads); only the server is sampled.
        let _server = start_server_profile();
        let rate = throughput(port, warmup + secs);
        println!("profile throughput: {rate:.0} calls/s under the server's profile");
        std::thread::sleep(Duration::from_millis(1500)); // the server's profile ends meanwhile
        return Ok(());
    }
    let device = shared_tensor::cuda::device()?;
    let x = Tensor::ones([4], (Kind::Float, device));
    // As in the benchmark, one handle stays alive: the managed model stays cached.
    let _model = endpoints::big_model(24, 4096)?;
    let mut step: Box<dyn FnMut()> = match workload.as_str() {
        "model" => Box::new(|| drop(endpoints::big_model(24, 4096).unwrap())),
        "identity" => Box::new(move || drop(endpoints::identity(x.shallow_clone()).unwrap())),
        "identity256" => {
            let xs: Vec<Tensor> = (0..256).map(|_| Tensor::ones([4], (Kind::Float, device))).collect();
            Box::new(move || drop(endpoints::identity_many(xs.iter().map(Tensor::shallow_clone).collect()).unwrap()))
        }
        // The cached fetch of the N=32 decoder's state dict (290 tensors, one allocation each).
        "statedict" => Box::new(|| drop(endpoints::decoder_state_dict(32).unwrap())),
        other => panic!("unknown workload {other:?}: model, identity, identity256, statedict or throughput"),
    };
    let run_for = |step: &mut dyn FnMut(), secs: f64| {
        let (t, mut calls) = (Instant::now(), 0u64);
        while t.elapsed().as_secs_f64() < secs {
            step();
            sync();
            calls += 1;
        }
        calls
    };
    // Also the first call, which may build what later calls fetch (the decoder: seconds).
    run_for(&mut step, warmup);
    let _server = start_server_profile();
    let profile =
        profiling::Profile::start(out.join(format!("client-{workload}.folded"))).unwrap_or_else(|e| panic!("{e}"));
    let calls = run_for(&mut step, secs);
    let samples = profile.finish().unwrap_or_else(|e| panic!("{e}"));
    println!(
        "profile {workload}: {calls} calls in {secs} s ({:.1} µs a call), {samples} client samples",
        secs * 1e6 / calls as f64
    );
    run_for(&mut step, 1.0); // the server's profile ends meanwhile
    std::thread::sleep(Duration::from_millis(500));
    Ok(())
}

fn main() -> shared_tensor::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("child") {
        return child(&args[1..]);
    }
    if args.first().map(String::as_str) == Some("profile") {
        return profile(&args[1..]);
    }
    if args.first().map(String::as_str) == Some("transports") {
        return transports(&args[1..]);
    }
    if args.first().map(String::as_str) == Some("spin") {
        return spin(&args[1..]);
    }
    if args.first().map(String::as_str) == Some("tensors") {
        return tensors(&args[1..]);
    }
    let quick = args.iter().any(|a| a == "--quick");
    let n = if quick { 200 } else { 1000 };
    let device = shared_tensor::cuda::device()?;

    // The server process.
    let port = free_port();
    let server = start_server(port, &[]);
    shared_tensor::configure(Config::default().role(Role::Client).base_port(port))?;

    let mut report = Report {
        date_unix: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs(),
        gpu: std::env::var("ST_GPU_NAME").unwrap_or_default(),
        floor_frame_bytes: FLOOR_FRAME,
        ..Report::default()
    };
    if args.first().map(String::as_str) == Some("models") {
        let report = models_only(port, quick, report);
        drop(server);
        exit_on_failed_checks(&report.models);
        return Ok(());
    }
    // Where the time of one transfer goes, step by step.
    let probe = Tensor::ones([4], (Kind::Float, device));
    for (name, us) in shared_tensor::diagnostics::export_steps(&probe, 1000)? {
        report.breakdown.push((format!("producer: {name}"), us));
    }
    let exported = shared_tensor::diagnostics::export_with_event(&probe)?;
    let mut importer = Command::new(std::env::current_exe().unwrap())
        .args(["child", "profile-import"])
        .env("SHARED_TENSOR_BASE_PORT", port.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the import profiler");
    importer.stdin.take().unwrap().write_all(&rmp_serde::to_vec(exported.descriptor()).unwrap()).unwrap();
    {
        let mut reader = BufReader::new(importer.stdout.take().unwrap());
        let mut line = String::new();
        while reader.read_line(&mut line).unwrap() > 0 && !line.starts_with("DONE") {
            if let Some((name, us)) = line.trim().strip_prefix("STEP ").and_then(|l| l.split_once('\t')) {
                report.breakdown.push((name.to_string(), us.parse().unwrap()));
            }
            line.clear();
        }
    }
    let _ = importer.wait();
    drop(exported);

    let (mut figures, floor_p50) = floor_figures(n.max(1000));

    figures.push(figure(
        "no-op call (direct, no arguments)",
        &measure(n, 100, || endpoints::noop().unwrap()),
        floor_p50,
    ));
    let x16 = Tensor::ones([4], (Kind::Float, device));
    let times = measure(n, 50, || {
        let y = endpoints::identity_ref(&x16).unwrap();
        sync();
        drop(y);
    });
    figures.push(figure("identity 16 B, direct endpoint, by reference", &times, floor_p50));
    figures.push(figure(
        "ping",
        &measure(n, 100, || {
            shared_tensor::ping().unwrap();
        }),
        floor_p50,
    ));
    // The same over TCP loopback, for the clients that cannot reach the server's socket.
    let tcp = shared_tensor::client::Client::new(
        &Config::default().base_port(port).transport(shared_tensor::transport::Transport::Tcp),
    )?;
    {
        use shared_tensor::control::Control;
        figures.push(figure(
            "ping, TCP transport",
            &measure(n, 100, || {
                tcp.ping().unwrap();
            }),
            floor_p50,
        ));
    }
    let times = measure(n, 50, || {
        let y: Tensor = tcp.call("identity", (x16.shallow_clone(),)).unwrap();
        sync();
        drop(y);
    });
    figures.push(figure("identity 16 B, TCP transport", &times, floor_p50));
    drop(tcp);
    for (label, numel) in [("16 B", 4i64), ("4 MiB", 1 << 20), ("256 MiB", 1 << 26), ("1 GiB", 1 << 28)] {
        let x = Tensor::ones([numel], (Kind::Float, device));
        let times = measure(n, 50, || {
            let y = endpoints::identity(x.shallow_clone()).unwrap();
            sync();
            drop(y);
        });
        figures.push(figure(&format!("identity {label}"), &times, floor_p50));
    }
    let times = measure(n, 50, || {
        let y = endpoints::cached_tensor().unwrap();
        sync();
        drop(y);
    });
    figures.push(figure("cached 4 MiB result", &times, floor_p50));

    let build = Instant::now();
    let first_model = endpoints::big_model(24, 4096)?;
    report.model_build_ms = build.elapsed().as_secs_f64() * 1e3;
    let (mut fetch_us, mut drop_us) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let times = measure(n, 20, || {
        let t = Instant::now();
        let model = endpoints::big_model(24, 4096).unwrap();
        sync();
        let fetched = t.elapsed();
        drop(model);
        fetch_us.push(fetched.as_secs_f64() * 1e6);
        drop_us.push((t.elapsed() - fetched).as_secs_f64() * 1e6);
    });
    figures.push(figure("cached managed model 1.6 GB (24 × Linear 4096²)", &times, floor_p50));
    for (name, mut part) in
        [("model: call until the value is built", fetch_us), ("model: dropping the handle and value", drop_us)]
    {
        part.sort_by(f64::total_cmp);
        report.breakdown.push((name.to_string(), percentile(&part, 0.5)));
    }
    // The same calls again, phase by phase, through a client of the same server.
    let phases = shared_tensor::client::Client::new(&Config::default().role(Role::Client).base_port(port))?;
    let model_steps = shared_tensor::diagnostics::call_steps::<shared_tensor::Managed<Vec<tch::nn::Linear>>, _, _>(
        &phases,
        "big_model",
        || (24i64, 4096i64),
        n,
    )?;
    for (name, us) in model_steps {
        report.breakdown.push((format!("model call: {name}"), us));
    }
    drop(phases);
    drop(first_model);

    let times = measure(n, 50, || endpoints::trivial_task::submit().unwrap().wait().unwrap());
    figures.push(figure("submit + wait, trivial task", &times, floor_p50));

    // Scaling with tensors per call.
    for count in [1usize, 16, 256] {
        let times = identity_many_times(device, count, if count == 256 { n / 2 } else { n }, 20);
        report.scaling_tensor_count.push((count, percentile(&times, 0.5)));
    }

    // First call from fresh client processes.
    let mut firsts: Vec<f64> = (0..if quick { 5 } else { 20 })
        .map(|_| {
            let mut c = spawn_child(port, &["first-call"]);
            let v = read_value(&mut c, "FIRST_US");
            let _ = c.wait();
            v
        })
        .collect();
    firsts.sort_by(f64::total_cmp);
    report.first_call_p50_us = percentile(&firsts, 0.5);

    // Scaling with concurrent client processes.
    for procs in [1usize, 4, 16] {
        let mut children: Vec<_> =
            (0..procs).map(|_| spawn_child(port, &["latency", if quick { "200" } else { "1000" }])).collect();
        let mut p50s: Vec<f64> = children.iter_mut().map(|c| read_value(c, "P50_US")).collect();
        children.iter_mut().for_each(|c| drop(c.wait()));
        p50s.sort_by(f64::total_cmp);
        report.scaling_processes.push((procs, percentile(&p50s, 0.5)));
    }

    // Throughput: 8 processes × 4 threads × identity 16 B.
    report.throughput_calls_per_s = throughput(port, if quick { 2.0 } else { 10.0 });

    // The LLM-shaped models last, so that their gigabytes sit under no other figure.
    report.models = llm_rows(port, quick, floor_p50, &mut figures);

    report.figures = figures;
    write_report(&report, "bench.json");

    println!(
        "\nshared-tensor benchmark, {} ({} calls per figure; models: {} fetches, state dicts: {})",
        report.gpu, n, report.models.fetches, report.models.state_dict_fetches
    );
    print_figures(&report.figures);
    println!(
        "| first call from a fresh client process (p50 of {}) | {:.1} | | {:.1} | |",
        firsts.len(),
        report.first_call_p50_us,
        report.first_call_p50_us / floor_p50
    );
    println!(
        "| throughput, 8 processes × 4 threads, identity 16 B | {:.0} calls/s | | | |",
        report.throughput_calls_per_s
    );
    println!("| model build (first call, not cached) | {:.1} ms | | | |", report.model_build_ms);
    print_named_values("step of one transfer (16 B tensor) | p50 µs", &report.breakdown);
    println!("\n| tensors per call | identity p50 µs |\n| ---: | ---: |");
    for (count, p50) in &report.scaling_tensor_count {
        println!("| {count} | {p50:.1} |");
    }
    println!("\n| concurrent client processes | identity 16 B p50 µs (median over processes) |\n| ---: | ---: |");
    for (procs, p50) in &report.scaling_processes {
        println!("| {procs} | {p50:.1} |");
    }
    print_llm_rows(&report.models);
    drop(server);
    exit_on_failed_checks(&report.models);
    Ok(())
}

/// `bench models [--quick]`: only the LLM-shaped rows (and the floor, for the ratios);
/// writes `$OUT/bench-models.json`.
fn models_only(port: u16, quick: bool, mut report: Report) -> Report {
    let (mut figures, floor_p50) = floor_figures(1000);
    report.models = llm_rows(port, quick, floor_p50, &mut figures);
    report.figures = figures;
    write_report(&report, "bench-models.json");
    println!(
        "\nshared-tensor benchmark, {}: LLM-shaped models ({} fetches per model, {} per state dict)",
        report.gpu, report.models.fetches, report.models.state_dict_fetches
    );
    print_figures(&report.figures);
    print_llm_rows(&report.models);
    report
}

fn print_figures(figures: &[Figure]) {
    println!("| figure | p50 µs | p99 µs | p50 / floor | p99 / p50 |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for f in figures {
        println!(
            "| {} | {:.1} | {:.1} | {:.2} | {:.2} |",
            f.name,
            f.p50_us,
            f.p99_us,
            f.ratio_to_floor,
            f.p99_us / f.p50_us
        );
    }
}

/// Writes the report as JSON to `$OUT/<file>` (or `./<file>`).
fn write_report(report: &Report, file: &str) {
    let json = serde_json::to_string_pretty(report).unwrap();
    let out = std::env::var_os("OUT").map(std::path::PathBuf::from).unwrap_or_else(|| ".".into());
    let _ = std::fs::write(out.join(file), &json);
}

/// Ends the process with status 1, after the tables, if a check of the model rows failed.
fn exit_on_failed_checks(rows: &ModelRows) {
    let failed = rows.failed();
    if failed > 0 {
        println!("\nbench: {failed} checks of the model rows FAILED (see the check table)");
        std::process::exit(1);
    }
}
