//! A client process for the crash tests: receives tensors from the server and holds them,
//! printing `HOLDING n` after each call, until it is killed.

#[path = "../endpoints.rs"]
mod endpoints;

use tch::{Kind, Tensor};

fn main() -> shared_tensor::Result<()> {
    let device = shared_tensor::cuda::device()?;
    if let Ok(task) = std::env::var("ST_TEST_WAIT_TASK") {
        // Another process's task, known by id only.
        let model: shared_tensor::Managed<tch::nn::Linear> = shared_tensor::wait_for_task(task.parse().unwrap())?;
        println!("WAITED {}", model.object_id());
        return Ok(());
    }
    if let Ok(calls) = std::env::var("ST_TEST_LOAD_CALLS") {
        return load(device, calls.parse().unwrap());
    }
    let mb: i64 = std::env::var("ST_TEST_MB").ok().and_then(|v| v.parse().ok()).unwrap_or(64);
    // A managed object held by this client: released with its connection when it dies.
    let _model = endpoints::slow_model(0)?;
    let mut held = Vec::new();
    let factor = Tensor::from(3.0f32).to_device(device);
    loop {
        let x = Tensor::ones([mb * 1024 * 256], (Kind::Float, device));
        held.push(endpoints::scale_tensor(x, factor.shallow_clone())?);
        if held.len() > 8 {
            drop(held.remove(0));
        }
        println!("HOLDING {}", held.len());
    }
}

/// 4 threads × `calls` calls, mixing identity, a cached result, a managed handle and a
/// task; prints `DONE <calls> <failures>`.
fn load(device: tch::Device, calls: usize) -> shared_tensor::Result<()> {
    let threads: Vec<_> = (0..4)
        .map(|t| {
            std::thread::spawn(move || {
                let x = Tensor::ones([4], (Kind::Float, device));
                let mut failures = 0usize;
                for i in 0..calls {
                    let kind = (i + t) % 4;
                    let result = match kind {
                        0 => endpoints::identity(x.shallow_clone()).map(drop),
                        1 => endpoints::cached_tensor().map(drop),
                        2 => endpoints::tied_model().map(drop),
                        _ => endpoints::trivial_task::submit().and_then(|task| task.wait()).map(drop),
                    };
                    if let Err(e) = result {
                        // The first few of each thread, so that a failed run says why.
                        if failures < 5 {
                            let what = ["identity", "cached_tensor", "tied_model", "trivial_task"][kind];
                            eprintln!("load: thread {t}, call {i} ({what}) failed: {e}");
                        }
                        failures += 1;
                    }
                }
                failures
            })
        })
        .collect();
    let failures: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    println!("DONE {} {failures}", calls * 4);
    Ok(())
}
