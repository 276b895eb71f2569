//! Scenarios 1 and 5 of the seed: a fast tensor transform, and strictly per-request work.
//!
//! ```sh
//! SHARED_TENSOR_ROLE=server cargo run --example basic_service   # the server (also runs its own calls)
//! cargo run --example basic_service                             # the client
//! ```
//!
//! - `scale_tensor`: `execution = "direct"` (the lowest overhead: the body runs on the
//!   request path), `cache = false` (request-scoped results are never reused), parallel.
//! - `build_request_tensor`: `cache = false` and `singleflight = false`: every request
//!   gets a fresh result, and identical concurrent requests stay independent.

use shared_tensor::share;
use tch::{Kind, Tensor};

/// Scenario 1: fast transform.
#[share(execution = "direct", cache = false)]
fn scale_tensor(tensor: &Tensor, factor: f64) -> Tensor {
    tensor * factor
}

/// Scenario 5: strictly per-request work (a fresh tensor every time).
#[share(execution = "direct", cache = false, singleflight = false)]
fn build_request_tensor(template: &Tensor) -> Tensor {
    template.copy()
}

fn main() -> shared_tensor::Result<()> {
    shared_tensor_examples::log_to_stderr();
    shared_tensor_examples::keep_stop_signals_in_server_role()?; // a stop during the work below is kept
    let device = shared_tensor::cuda::device()?;
    let role = shared_tensor::role()?;
    let x = Tensor::arange(4, (Kind::Float, device));
    let y = scale_tensor(&x, 3.0)?;
    println!("[{role}] scale_tensor(x, 3) = {y}");
    let a = build_request_tensor(&x)?;
    let b = build_request_tensor(&x)?;
    println!("[{role}] two requests, two fresh tensors: {}", a.data_ptr() != b.data_ptr() && a.equal(&b));
    shared_tensor::serve_while_server()
}
