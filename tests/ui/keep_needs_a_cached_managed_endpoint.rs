use shared_tensor::share;

#[share(keep)]
fn not_managed(n: i64) {}

#[share(managed, keep, cache = false)]
fn not_cached(n: i64) {}

#[share(managed, keep = "yes")]
fn not_a_bool(n: i64) {}

fn main() {}
