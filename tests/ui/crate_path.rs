use shared_tensor::share;

mod sdk {
    pub use ::shared_tensor as st;
}

// A path that does not lead to shared-tensor.
#[share(crate = "crate::nowhere", execution = "direct", cache = false)]
fn wrong_path() {}

// Not a path at all.
#[share(crate = "not a path", execution = "direct", cache = false)]
fn not_a_path() {}

// A value that is not a string.
#[share(crate = sdk::st)]
fn not_a_string() {}

#[derive(shared_tensor::Payload)]
#[payload(container, crate = "crate::sdk::nowhere")]
struct Derived {
    steps: i64,
}

fn main() {}
