use shared_tensor::share;

#[share(cache_key = "model:{hidden_sz}")]
fn load(hidden_size: i64) {}

#[share(cache_key = "model:{hidden_size")]
fn unclosed(hidden_size: i64) {}

fn main() {}
