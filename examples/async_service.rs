//! Scenarios 4 and 6 of the seed: fire-and-poll warm-up, and an endpoint that must run
//! one at a time. Also: polling a task's status and cancelling a pending one.
//!
//! ```sh
//! SHARED_TENSOR_ROLE=server cargo run --example async_service
//! cargo run --example async_service
//! ```
//!
//! - `warm_up`: `execution = "task"` + `managed`: the caller submits, does other work and
//!   waits later; the built object stays until its handle is released.
//! - `compact_memory`: `concurrency = "serialized"`: one execution at a time,
//!   endpoint-wide; a second submit waits as pending and can be cancelled.

use std::time::Duration;

use shared_tensor::task::TaskStatus;
use shared_tensor::{share, Managed};
use tch::{nn, Kind, Tensor};

/// Scenario 4: a slow build to start early and collect later.
#[share(execution = "task", managed, cache_key = "warm:{hidden}")]
fn warm_up(hidden: i64) -> nn::Linear {
    shared_tensor::report_progress(0.1, "allocating");
    std::thread::sleep(Duration::from_millis(500));
    let vs = nn::VarStore::new(tch::Device::Cuda(0));
    let layer = nn::linear(vs.root(), hidden, hidden, Default::default());
    shared_tensor::report_progress(1.0, "built");
    layer
}

/// Scenario 6: must not overlap with itself.
#[share(execution = "task", concurrency = "serialized", cache = false, singleflight = false)]
fn compact_memory(tensor: Tensor) -> Tensor {
    std::thread::sleep(Duration::from_millis(300));
    tensor.contiguous()
}

fn main() -> shared_tensor::Result<()> {
    shared_tensor_examples::log_to_stderr();
    shared_tensor_examples::keep_stop_signals_in_server_role()?; // a stop during the work below is kept
    let device = shared_tensor::cuda::device()?;
    let role = shared_tensor::role()?;

    let warming = warm_up::submit(1024)?; // returns at once
    println!("[{role}] submitted warm_up as task {}", warming.id());
    let x = Tensor::ones([2, 1024], (Kind::Float, device)); // other work meanwhile
    loop {
        let status = warming.status()?;
        let progress = status.progress.map(|p| format!("{:.0}% {}", p.fraction * 100.0, p.message));
        println!("[{role}] warm_up: {:?} {}", status.status, progress.unwrap_or_default());
        if status.status.is_finished() {
            break;
        }
        std::thread::sleep(Duration::from_millis(150));
    }
    let model: Managed<nn::Linear> = warming.wait()?;
    println!(
        "[{role}] model ready: object {}, output {:?}",
        model.object_id(),
        nn::Module::forward(&*model, &x).size()
    );

    let first = compact_memory::submit(x.shallow_clone())?;
    let second = compact_memory::submit(x.shallow_clone())?; // waits for the first: pending
    std::thread::sleep(Duration::from_millis(50));
    let cancelled = second.cancel()?;
    println!("[{role}] second compact_memory cancelled while pending: {cancelled}");
    let compacted = first.wait()?;
    println!("[{role}] first compact_memory done: {:?}", compacted.size());
    assert!(!cancelled || second.status()?.status == TaskStatus::Cancelled);
    drop(model); // releases the managed object
    shared_tensor::serve_while_server()
}
