//! Load: 16 client processes × 4 threads × 100,000 calls mixing identity, a cached result,
//! a managed handle and a task. No call fails, the server's memory (host and GPU) is flat
//! from the first quarter to the last, and nothing is left behind. Run in the GPU bundle.

#[path = "endpoints.rs"]
mod endpoints;
#[path = "gpu_server.rs"]
mod gpu_server;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gpu_server::{idle, server_port, server_until, setup};
use shared_tensor::task::TaskStatus;
use shared_tensor_tests::{helper_bin, Peer};

#[test]
#[ignore = "GPU: runs in the GPU bundle (cargo xtask gpu-bundle)"]
fn sixteen_processes_of_mixed_calls_fail_nothing_and_leave_nothing() {
    setup();
    let per_thread: usize = std::env::var("ST_LOAD_CALLS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let exe = helper_bin("gpu_client", env!("CARGO_BIN_EXE_gpu_client"));
    let port = server_port().to_string();
    let calls = per_thread.to_string();

    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut samples = Vec::new();
            let started = Instant::now();
            while !done.load(Ordering::Relaxed) {
                if let Ok(i) = shared_tensor::server_info() {
                    samples.push((i.host_rss_bytes, i.gpu_memory.map_or(0, |m| m.allocated_bytes)));
                    // Progress every 10 s, so a slow or stuck run shows where it is.
                    if samples.len() % 50 == 0 {
                        println!(
                            "[{:>4.0?}] {} requests, {} errors, {} connections, {} leases, tasks {:?}, {} managed, \
                             host {} MiB",
                            started.elapsed(),
                            i.counters.requests,
                            i.counters.errors,
                            i.connections,
                            i.live_leases,
                            i.tasks,
                            i.managed_objects,
                            i.host_rss_bytes >> 20
                        );
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            samples
        })
    };
    let started = Instant::now();
    let mut clients: Vec<Peer> = (0..16)
        .map(|_| Peer::spawn(&exe, &[("SHARED_TENSOR_BASE_PORT", &port), ("ST_TEST_LOAD_CALLS", &calls)]))
        .collect();
    let (mut total, mut failures) = (0u64, 0u64);
    for c in clients.iter_mut() {
        let line = c.expect_line("DONE");
        let mut parts = line.split_whitespace().map(|p| p.parse::<u64>().unwrap());
        total += parts.next().unwrap();
        failures += parts.next().unwrap();
    }
    let took = started.elapsed();
    done.store(true, Ordering::Relaxed);
    let samples = sampler.join().unwrap();
    for c in clients {
        assert!(c.wait_success());
    }

    let quarter = samples.len() / 4;
    assert!(quarter >= 2, "too few samples ({})", samples.len());
    let max = |s: &[(u64, u64)], f: fn(&(u64, u64)) -> u64| s.iter().map(f).max().unwrap();
    let (first, last) = (&samples[..quarter], &samples[samples.len() - quarter..]);
    let (rss_first, rss_last) = (max(first, |s| s.0), max(last, |s| s.0));
    let (gpu_first, gpu_last) = (max(first, |s| s.1), max(last, |s| s.1));
    let (after, _) = server_until(Duration::from_secs(5), |i| idle(i) && i.connections == 1);
    let live_tasks = shared_tensor::list_tasks(Some(TaskStatus::Pending)).unwrap().len()
        + shared_tensor::list_tasks(Some(TaskStatus::Running)).unwrap().len();
    println!(
        "{total} calls in {took:.1?} ({:.0} calls/s), {failures} failed; server host memory {} -> {} MiB, GPU memory \
         {} -> {} MiB (max of first vs last quarter); after: {} leases, {} imports, {} connections, {} live tasks",
        total as f64 / took.as_secs_f64(),
        rss_first >> 20,
        rss_last >> 20,
        gpu_first >> 20,
        gpu_last >> 20,
        after.live_leases,
        after.imported_storages,
        after.connections,
        live_tasks
    );
    assert_eq!(total, 16 * 4 * per_thread as u64);
    assert_eq!(failures, 0);
    assert!(rss_last <= rss_first + rss_first / 10 + (32 << 20), "host memory grew: {rss_first} -> {rss_last}");
    assert!(gpu_last <= gpu_first + (1 << 20), "GPU memory grew: {gpu_first} -> {gpu_last}");
    assert!(idle(&after) && after.connections == 1 && live_tasks == 0, "{after:#?}");
}
