//! The model service's server: a dedicated binary in manual mode (no roles involved).
//!
//! ```sh
//! cargo run --example model_service_server      # serves until Ctrl-C
//! cargo run --example model_service_client      # in another terminal
//! ```

mod endpoints;

use shared_tensor::config::{Config, Role};
use shared_tensor::server::Server;

fn main() -> shared_tensor::Result<()> {
    shared_tensor_examples::log_to_stderr();
    shared_tensor::cuda::require()?;
    // This process runs its endpoints itself and serves them; it calls nobody.
    shared_tensor::configure(Config::from_env()?.role(Role::Local))?;
    let server = Server::builder().endpoints([endpoints::load_model::endpoint()]).start()?;
    println!("[model_service_server] serving load_model on {}", server.addr());
    // The opt-in to stop signals: on SIGINT/SIGTERM, stop gracefully and return.
    shared_tensor::serve_until_signal()?;
    println!("[model_service_server] stopped: {:?}", server.join());
    Ok(())
}
