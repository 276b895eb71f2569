//! Stop under load on a GPU: 100 cycles of a server-role process serving 4 client
//! processes that call `identity` (1 MiB of CUDA memory) and the 2 ms direct endpoint
//! `sleepy` in a loop, stopped with SIGTERM; then 10 cycles of a manual-mode server (fewer: the same stop path, to keep the binary
//! under about 4 minutes)
//! stopped with `ServerHandle::shutdown()`. Every cycle's server exits 0, every client's
//! calls end with the "server is gone" error, none hangs. Run in the GPU bundle.

#[path = "shutdown_cycles.rs"]
mod shutdown_cycles;

use shutdown_cycles::{run, Stop};

#[test]
#[ignore = "GPU: runs in the GPU bundle (cargo xtask gpu-bundle)"]
fn a_hundred_sigterms_under_load_exit_zero() {
    shared_tensor_tests::require_gpu();
    run(true, Stop::Sigterm, 100);
}

#[test]
#[ignore = "GPU: runs in the GPU bundle (cargo xtask gpu-bundle)"]
fn manual_shutdown_under_load_exits_zero() {
    shared_tensor_tests::require_gpu();
    run(true, Stop::Shutdown, 10);
}
