//! A client process for the shutdown tests: calls the server in a loop until a call fails,
//! then reports how it failed.
//!
//! Prints `CALLING` after its first successful round, then `ENDED gone|unreachable|other
//! <calls> <message>` at the first error. Exits 0 when the error says the server is gone
//! (or, between two calls, no longer there), 1 otherwise. With `ST_TEST_GPU=1` it calls
//! `identity` with 1 MiB of CUDA memory and the 2 ms direct endpoint `sleepy`; without,
//! `noop` and `sleepy` (no GPU needed).

#[path = "../endpoints.rs"]
mod endpoints;

use shared_tensor::Error;

fn round(gpu: Option<&tch::Tensor>) -> shared_tensor::Result<()> {
    match gpu {
        Some(x) => {
            let _echoed = endpoints::identity(x.shallow_clone())?;
        }
        None => endpoints::noop()?,
    }
    endpoints::sleepy(2)
}

fn main() {
    let gpu = std::env::var("ST_TEST_GPU").is_ok_and(|v| v == "1");
    let tensor = gpu.then(|| {
        let device = shared_tensor::cuda::device().unwrap_or_else(|e| panic!("{e}"));
        tch::Tensor::ones([256 * 1024], (tch::Kind::Float, device)) // 1 MiB
    });
    let mut calls = 0u64;
    let error = loop {
        if let Err(e) = round(tensor.as_ref()) {
            break e;
        }
        calls += 1;
        if calls == 1 {
            println!("CALLING");
        }
    };
    let kind = match &error {
        Error::ServerGone { .. } => "gone",
        Error::ServerUnreachable { .. } => "unreachable",
        _ => "other",
    };
    println!("ENDED {kind} {calls} {error}");
    std::process::exit(if kind == "other" { 1 } else { 0 });
}
