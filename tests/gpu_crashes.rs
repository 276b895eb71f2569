//! 100 cycles of: a client process receives tensors and a managed model, then is killed
//! with SIGKILL. After each cycle the server holds no lease, no import and no managed
//! reference for it, and its GPU memory is back at its baseline (within 1 MiB). Run in the
//! GPU bundle.

#[path = "endpoints.rs"]
mod endpoints;
#[path = "gpu_server.rs"]
mod gpu_server;

use std::time::Duration;

use gpu_server::{idle, server_port, server_until, setup};
use shared_tensor_tests::{helper_bin, Peer};

#[test]
#[ignore = "GPU: runs in the GPU bundle (cargo xtask gpu-bundle)"]
fn a_hundred_killed_clients_leak_nothing() {
    setup();
    let exe = helper_bin("gpu_client", env!("CARGO_BIN_EXE_gpu_client"));
    let port = server_port().to_string();
    let (start, _) = server_until(Duration::from_secs(2), idle);
    let baseline = start.gpu_memory.unwrap().allocated_bytes as i64;
    let (mut worst_delta, mut worst_time, mut held_max) = (0i64, Duration::ZERO, 0u64);
    for cycle in 0..100 {
        let mut client = Peer::spawn(&exe, &[("SHARED_TENSOR_BASE_PORT", &port), ("ST_TEST_MB", "16")]);
        for _ in 0..3 {
            client.expect_line("HOLDING");
        }
        let busy = shared_tensor::server_info().unwrap();
        assert!(
            busy.live_leases >= 3 && busy.managed_objects >= 1,
            "cycle {cycle}: the client holds nothing: {busy:#?}"
        );
        held_max = held_max.max(busy.live_leases);
        client.kill();
        let (after, took) = server_until(Duration::from_secs(2), |i| {
            idle(i)
                && i.managed_objects == 0
                && i.gpu_memory.is_some_and(|m| (m.allocated_bytes as i64 - baseline).abs() <= 1 << 20)
        });
        let delta = after.gpu_memory.unwrap().allocated_bytes as i64 - baseline;
        assert!(idle(&after) && after.managed_objects == 0, "cycle {cycle}: {after:#?}");
        assert!(delta.abs() <= 1 << 20, "cycle {cycle}: GPU memory {delta} bytes off its baseline");
        worst_delta = worst_delta.max(delta.abs());
        worst_time = worst_time.max(took);
    }
    println!(
        "100 SIGKILL cycles (up to {held_max} leases and a managed model each): 0 leases, 0 managed objects after \
         every cycle; GPU memory within {worst_delta} bytes of its baseline ({baseline} bytes); slowest recovery {worst_time:?}"
    );
}
