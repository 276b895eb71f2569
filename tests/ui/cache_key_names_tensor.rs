use shared_tensor::share;
use tch::{nn, Tensor};

// A cache_key over a tensor would print it (a copy to the host, truncated).
#[share(cache_key = "k:{t}")]
fn keyed_by_tensor(t: &Tensor) -> Tensor {
    t.shallow_clone()
}

// Nor a module.
#[share(cache_key = "m:{layer:?}:{n}")]
fn keyed_by_module(layer: nn::Linear, n: i64) -> Tensor {
    layer.ws.shallow_clone() * n
}

fn main() {}
