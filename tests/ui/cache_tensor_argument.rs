use shared_tensor::share;
use tch::Tensor;

// Caches by default, and a tensor cannot be part of the default key (every argument).
#[share]
fn scale(t: Tensor, factor: f64) -> Tensor {
    t * factor
}

// Singleflight without a cache keys by every argument too.
#[share(cache = false, singleflight = true)]
fn scale_once(t: &Tensor, factor: f64) -> Tensor {
    t * factor
}

// Fine: the key names only plain parameters.
#[share(cache_key = "scale:{factor}")]
fn scale_keyed(t: Tensor, factor: f64) -> Tensor {
    t * factor
}

// Fine: no cache, no singleflight.
#[share(cache = false)]
fn scale_uncached(t: Tensor, factor: f64) -> Tensor {
    t * factor
}

fn main() {}
