//! The model service's client: calls the server by endpoint name, with typed arguments
//! and result, without linking the endpoint's definition (manual mode).
//!
//! ```sh
//! cargo run --example model_service_client
//! ```

use shared_tensor::client::Client;
use shared_tensor::config::Config;
use shared_tensor::Managed;
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

fn main() -> shared_tensor::Result<()> {
    shared_tensor_examples::log_to_stderr();
    let device = shared_tensor::cuda::device()?;
    let client = Client::new(&Config::from_env()?)?;
    let (name, dtype) = ("small".to_string(), "f32".to_string());
    let model: Managed<nn::Linear> = client.call("load_model", (&name, &dtype))?;
    let again: Managed<nn::Linear> = client.call("load_model", (&name, &dtype))?; // the registry hands out the same object
    let y = model.forward(&Tensor::ones([1, 256], (Kind::Float, device)));
    println!(
        "[model_service_client] object {} (again: {}), refcount {}, output {:?}",
        model.object_id(),
        again.object_id(),
        model.info()?.refcount,
        y.size()
    );
    assert_eq!(model.object_id(), again.object_id());
    println!("[model_service_client] release: {} then {}", again.release(), again.release());
    // Dropping `model` releases this client's last reference; the endpoint is `keep`, so
    // the server keeps the model in its registry for the next client.
    Ok(())
}
