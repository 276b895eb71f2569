//! The shared-tensor benchmark: a real server process, real client processes, every hot
//! path against the loopback floor measured in the same run.
//!
//! `bench` starts the server (`endpoint_server` in the server role), measures, prints a
//! table with each figure's ratio to the floor and writes JSON to `$OUT/bench.json` (or
//! `./bench.json`). Client processes for the first-call, throughput and scaling figures
//! are this binary again (`bench child ...`). GPU timings stop after the consumer's
//! stream has the data (a stream synchronize inside the timed region).
//!
//! `cargo xtask bench` runs it where a GPU is present; the GPU bundle carries it
//! (`.gpu-bundle/run.sh bench`).

#[path = "../endpoints.rs"]
mod endpoints;
#[path = "profiling.rs"]
mod profiling;

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

/// A plain Rust loopback TCP echo of one frame each way: the floor for any RPC.
fn floor(n: usize) -> Vec<f64> {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_nodelay(true).unwrap();
        let mut buf = [0u8; FLOOR_FRAME];
        while s.read_exact(&mut buf).is_ok() {
            if s.write_all(&buf).is_err() {
                break;
            }
        }
    });
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    let out = [7u8; FLOOR_FRAME];
    let mut back = [0u8; FLOOR_FRAME];
    measure(n, 200, || {
        s.write_all(&out).unwrap();
        s.read_exact(&mut back).unwrap();
    })
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
        other => panic!("unknown child mode {other:?}"),
    }
    Ok(())
}

fn spawn_child(port: u16, args: &[&str]) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .arg("child")
        .args(args)
        .env("SHARED_TENSOR_BASE_PORT", port.to_string())
        .env_remove("SHARED_TENSOR_ROLE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn a bench client")
}

/// Reads the child's lines until one starts with `prefix`; returns the rest.
fn read_line(child: &mut std::process::Child, prefix: &str) -> String {
    let out = child.stdout.as_mut().unwrap();
    let mut line = String::new();
    let mut reader = BufReader::new(out);
    loop {
        line.clear();
        assert!(reader.read_line(&mut line).unwrap() > 0, "a bench process exited before printing {prefix}");
        if let Some(v) = line.trim().strip_prefix(prefix) {
            return v.trim().to_string();
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
    let secs_s = secs.to_string();
    let mut children: Vec<_> = (0..8).map(|_| spawn_child(port, &["throughput", &secs_s, "4"])).collect();
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

/// `bench profile <model|identity|throughput> <seconds>`: one workload in a loop while
/// the server and (except for `throughput`, whose load runs in 8 child processes) the
/// client, this process, are sampled; folded stacks go to
/// `$OUT/{client,server}-<workload>.folded`. Needs `--features profile`.
fn profile(args: &[String]) -> shared_tensor::Result<()> {
    let workload = args.first().map(String::as_str).unwrap_or("model").to_string();
    let secs: f64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(5.0);
    let out = std::env::var_os("OUT").map(std::path::PathBuf::from).unwrap_or_else(|| ".".into());
    let warmup = 1.0;
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let server_file = out.join(format!("server-{workload}.folded")).display().to_string();
    let _server = start_server(port, &[("ST_PROFILE", server_file), ("ST_PROFILE_SECS", (warmup + secs).to_string())]);
    shared_tensor::configure(Config::default().role(Role::Client).base_port(port))?;
    if workload == "throughput" {
        // The throughput figure's load (8 processes × 4 threads); only the server is sampled.
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
        other => panic!("unknown workload {other:?}: model, identity or throughput"),
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
    run_for(&mut step, warmup);
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
    let quick = args.iter().any(|a| a == "--quick");
    let n = if quick { 200 } else { 1000 };
    let device = shared_tensor::cuda::device()?;

    // The server process.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let server = start_server(port, &[]);
    shared_tensor::configure(Config::default().role(Role::Client).base_port(port))?;

    let mut report = Report {
        date_unix: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs(),
        gpu: std::env::var("ST_GPU_NAME").unwrap_or_default(),
        floor_frame_bytes: FLOOR_FRAME,
        ..Report::default()
    };
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

    let floor_times = floor(n.max(1000));
    let floor_p50 = percentile(&floor_times, 0.5);
    let mut figures = vec![figure(&format!("floor: TCP echo {FLOOR_FRAME} B"), &floor_times, floor_p50)];

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
        let xs: Vec<Tensor> = (0..count).map(|_| Tensor::ones([4], (Kind::Float, device))).collect();
        let times = measure(if count == 256 { n / 2 } else { n }, 20, || {
            let ys = endpoints::identity_many(xs.iter().map(Tensor::shallow_clone).collect()).unwrap();
            sync();
            drop(ys);
        });
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

    report.figures = figures;
    let json = serde_json::to_string_pretty(&report).unwrap();
    let out = std::env::var_os("OUT").map(std::path::PathBuf::from).unwrap_or_else(|| ".".into());
    let _ = std::fs::write(out.join("bench.json"), &json);

    println!("\nshared-tensor benchmark, {} ({} calls per figure)", report.gpu, n);
    println!("| figure | p50 µs | p99 µs | p50 / floor | p99 / p50 |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for f in &report.figures {
        println!(
            "| {} | {:.1} | {:.1} | {:.2} | {:.2} |",
            f.name,
            f.p50_us,
            f.p99_us,
            f.ratio_to_floor,
            f.p99_us / f.p50_us
        );
    }
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
    println!("\n| step of one transfer (16 B tensor) | p50 µs |\n| --- | ---: |");
    for (name, us) in &report.breakdown {
        println!("| {name} | {us:.1} |");
    }
    println!("\n| tensors per call | identity p50 µs |\n| ---: | ---: |");
    for (count, p50) in &report.scaling_tensor_count {
        println!("| {count} | {p50:.1} |");
    }
    println!("\n| concurrent client processes | identity 16 B p50 µs (median over processes) |\n| ---: | ---: |");
    for (procs, p50) in &report.scaling_processes {
        println!("| {procs} | {p50:.1} |");
    }
    drop(server);
    Ok(())
}
