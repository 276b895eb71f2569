use shared_tensor::share;

#[share(cahce = false)]
fn unknown_option() {}

#[share(execution = "fast")]
fn bad_execution() {}

#[share(concurrency = "one-at-a-time")]
fn bad_concurrency() {}

#[share(cache = "yes")]
fn cache_is_a_bool() {}

#[share(cache_format_key = "model:{n}")]
fn seed_spelling(n: i64) {}

#[share(cache = false, singleflight = false, cache_key = "k:{n}")]
fn key_without_cache(n: i64) {}

#[share(cache, managed)]
fn cache_needs_a_value() {}

fn main() {}
