//! Stop under load on a GPU: 100 cycles of a server-role process serving 4 client
//! processes that call `identity` (1 MiB of CUDA memory) and the 2 ms direct endpoint
//! `sleepy` in a loop, stopped with SIGTERM; then 10 cycles of a manual-mode server (fewer: the same stop path, to keep the binary
//! under about 4 minutes)
//! stopped with `ServerHandle::shutdown()`. Every cycle's server exits 0, every client's
//! calls end with the "server is gone" error, none hangs. Run in the GPU bundle.

#[path = "shutdown_cycles.rs"]
mod shutdown_cycles;

use shutdown_cycles::{cycle, Stop, Tally};

#[test]
#[ignore = "GPU: runs in the GPU bundle (cargo xtask gpu-bundle)"]
fn a_hundred_sigterms_under_load_exit_zero() {
    shared_tensor_tests::require_gpu();
    let started = std::time::Instant::now();
    let mut tally = Tally::default();
    for _ in 0..100 {
        cycle(true, Stop::Sigterm, &mut tally);
    }
    println!(
        "{} SIGTERM cycles under load in {:?}: every server exited 0; clients ended with ServerGone {} times, \
         found the server gone between calls {} times; {} calls made; slowest stop {:?}",
        tally.cycles,
        started.elapsed(),
        tally.gone,
        tally.unreachable,
        tally.calls,
        tally.slowest_stop
    );
    assert_eq!(tally.gone + tally.unreachable, 400);
}

#[test]
#[ignore = "GPU: runs in the GPU bundle (cargo xtask gpu-bundle)"]
fn manual_shutdown_under_load_exits_zero() {
    shared_tensor_tests::require_gpu();
    let started = std::time::Instant::now();
    let mut tally = Tally::default();
    for _ in 0..10 {
        cycle(true, Stop::Shutdown, &mut tally);
    }
    println!(
        "{} shutdown() cycles under load (manual mode) in {:?}: every server exited 0; ServerGone {}, gone between \
         calls {}; {} calls; slowest stop {:?}",
        tally.cycles,
        started.elapsed(),
        tally.gone,
        tally.unreachable,
        tally.calls,
        tally.slowest_stop
    );
    assert_eq!(tally.gone + tally.unreachable, 40);
}
