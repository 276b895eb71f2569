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
    let mb: i64 = std::env::var("ST_TEST_MB").ok().and_then(|v| v.parse().ok()).unwrap_or(64);
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
