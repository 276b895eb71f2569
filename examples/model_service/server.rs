//! The model service's server: a dedicated binary in manual mode (no roles involved).
//!
//! ```sh
//! cargo run --example model_service_server      # serves until Ctrl-C
//! cargo run --example model_service_client      # in another terminal
//! ```

mod endpoints;

use shared_tensor::config::{Config, Role};

fn main() -> shared_tensor::Result<()> {
    shared_tensor::cuda::require()?;
    // This process runs its endpoints itself and serves them; it calls nobody.
    shared_tensor::configure(Config::from_env()?.role(Role::Local))?;
    let addr = shared_tensor::serve_in_background(Some(&[endpoints::load_model::endpoint()]))?;
    println!("[model_service_server] serving load_model on {addr}");
    shared_tensor::serve_until_signal()
}
