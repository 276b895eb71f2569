//! The control plane with real GPU objects: a cached managed model is one object with
//! one memory, released when the last handle goes; a task submitted by one process is
//! awaited by another. Run in the GPU bundle.

#[path = "endpoints.rs"]
mod endpoints;
#[path = "gpu_server.rs"]
mod gpu_server;

use std::time::Duration;

use gpu_server::{server_port, server_until, setup};
use shared_tensor::Managed;
use shared_tensor_tests::{helper_bin, Peer};

#[test]
#[ignore = "GPU: runs in the GPU bundle (cargo xtask gpu-bundle)"]
fn a_cached_managed_model_is_one_object_freed_with_its_last_handle() {
    setup();
    let (info, _) = server_until(Duration::from_secs(2), |_| true);
    let baseline = info.gpu_memory.unwrap().allocated_bytes;
    let a: Managed<Vec<tch::nn::Linear>> = endpoints::big_model(4, 2048).unwrap();
    let b = endpoints::big_model(4, 2048).unwrap();
    assert_eq!(a.object_id(), b.object_id(), "the cache returns the same object");
    for (x, y) in a.iter().zip(b.iter()) {
        assert_eq!(x.ws.data_ptr(), y.ws.data_ptr(), "and the same memory");
    }
    assert_eq!(a.info().unwrap().refcount, 2);
    let built = shared_tensor::server_info().unwrap().gpu_memory.unwrap().allocated_bytes;
    assert!(built >= baseline + 4 * 2048 * 2048 * 4, "the server holds the model");
    let id = a.object_id();
    drop((a, b));
    let (after, took) =
        server_until(Duration::from_secs(2), |i| i.gpu_memory.is_some_and(|m| m.allocated_bytes <= baseline));
    println!(
        "model of {} MiB: server memory {} -> {} -> {} bytes ({took:?} after the last release)",
        (built - baseline) >> 20,
        baseline,
        built,
        after.gpu_memory.unwrap().allocated_bytes
    );
    assert_eq!(shared_tensor::object_info(id).unwrap(), None, "destroyed with its last handle");
    assert!(after.gpu_memory.unwrap().allocated_bytes <= baseline, "and its GPU memory freed");
}

#[test]
#[ignore = "GPU: runs in the GPU bundle (cargo xtask gpu-bundle)"]
fn a_task_submitted_here_is_awaited_by_another_process() {
    setup();
    let task = endpoints::slow_model::submit(800).unwrap();
    let exe = helper_bin("gpu_client", env!("CARGO_BIN_EXE_gpu_client"));
    let (port, id) = (server_port().to_string(), task.id().to_string());
    let mut other = Peer::spawn(&exe, &[("SHARED_TENSOR_BASE_PORT", &port), ("ST_TEST_WAIT_TASK", &id)]);
    let model = task.wait().unwrap();
    let theirs: u64 = other.expect_line("WAITED").parse().unwrap();
    assert_eq!(theirs, model.object_id(), "both processes got the object the task built");
    assert!(other.wait_success());
    println!("task {id} built object {theirs}; waited for by two processes");
}
