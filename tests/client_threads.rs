//! A client's threads end with its connection: once a `Client` is dropped (or its server
//! goes away), its reader and release threads are gone, and none of them runs on. No GPU
//! needed. One test function: it counts this process's threads.

#[path = "endpoints.rs"]
mod endpoints;

use std::time::{Duration, Instant};

use shared_tensor::client::Client;
use shared_tensor::config::{Config, Role};
use shared_tensor_tests::free_port;

/// This process's threads whose name starts with `prefix` (names are cut at 15 bytes).
fn threads_named(prefix: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("a Linux /proc")
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with(prefix))
        .count()
}

/// Waits (at most 10 s) until `prefix` threads number `n`; returns how many there were last.
fn until_threads(prefix: &str, n: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = threads_named(prefix);
        if now == n || Instant::now() >= deadline {
            return now;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_dropped_clients_threads_end_and_leave_no_cpu_behind() {
    // The client's threads are "shared-tensor-reader" and "shared-tensor-releases".
    const CLIENT: &str = "shared-tensor-r";
    let port = free_port();
    let config = Config::default().base_port(port).device_index(0).connect_timeout(Duration::from_secs(5));
    shared_tensor::configure(config.clone().role(Role::Local)).unwrap();
    shared_tensor::serve_in_background(None).unwrap();
    let before = threads_named(CLIENT);
    for round in 0..3 {
        let client = Client::new(&config.clone().role(Role::Client)).unwrap();
        client.call::<(), _>("noop", ()).unwrap();
        // A new thread takes its name once it first runs: wait for both to have started.
        let started = until_threads(CLIENT, before + 2);
        assert_eq!(started, before + 2, "round {round}: a connected client reads and releases");
        drop(client);
        let left = until_threads(CLIENT, before);
        assert_eq!(left, before, "round {round}: a dropped client's threads ran on for 10 s");
    }
}
