//! The zero-branch example: one file, one binary, two processes.
//!
//! ```sh
//! SHARED_TENSOR_ROLE=server cargo run --example zero_branch   # process A: serves, and runs its own calls locally
//! cargo run --example zero_branch                             # process B: the same calls become zero-copy RPC
//! ```
//! `cargo xtask demo` starts both for you and stops the server afterwards.
//!
//! In both processes `load_model` returns a managed handle to one CUDA `nn::Linear` built
//! once (cached by `hidden_size`), and `identity` hands a tensor to the server and back.

use shared_tensor::{share, Managed};
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

/// Slow model construction: a task, a managed handle, one build per `hidden_size`.
#[share(execution = "task", managed, cache_key = "model:{hidden_size}")]
fn load_model(hidden_size: i64) -> nn::Linear {
    let vs = nn::VarStore::new(tch::Device::Cuda(0));
    nn::linear(vs.root(), hidden_size, 2, Default::default())
}

/// Request-scoped: every call computes (no cache).
#[share(cache = false)]
fn identity(tensor: Tensor) -> Tensor {
    tensor
}

/// A fast transform: runs on the request path.
#[share(execution = "direct", cache = false)]
fn scale_tensor(tensor: Tensor, factor: Tensor) -> Tensor {
    &tensor * &factor
}

fn main() -> shared_tensor::Result<()> {
    shared_tensor_examples::log_to_stderr();
    shared_tensor_examples::keep_stop_signals_in_server_role()?; // a stop during the work below is kept
    let device = shared_tensor::cuda::device()?;
    let role = shared_tensor::role()?;
    let x = Tensor::ones([1, 4], (Kind::Float, device));

    let model: Managed<nn::Linear> = load_model(4)?; // the same line in every role
    let y = model.forward(&x);
    println!("[{role}] load_model(4) -> object {}; model(x) = {y}", model.object_id());

    let echoed = identity(x.shallow_clone())?;
    println!("[{role}] identity(x) = {echoed} (the caller's own memory: {})", echoed.data_ptr() == x.data_ptr());
    let z = scale_tensor(x.shallow_clone(), Tensor::from(2.0f32).to_device(device))?;
    println!("[{role}] scale_tensor(x, 2) = {z}");
    let task = identity::submit(echoed)?; // the submit companion
    println!("[{role}] identity::submit(..).wait() = {}", task.wait()?);
    model.release(); // deterministic release (dropping the handle does the same)

    if role == shared_tensor::config::Role::Server {
        println!("[server] serving; stop with Ctrl-C");
    }
    shared_tensor::serve_while_server()
}
