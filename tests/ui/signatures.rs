use shared_tensor::share;
use tch::Tensor;

#[share]
fn generic<T: Clone>(t: T) {}

#[share]
async fn asynchronous() {}

#[share]
fn mutable(t: &mut Tensor) {}

#[share]
fn pattern((a, b): (i64, i64)) {}

#[share]
fn greet(name: &str) {}

#[share]
fn batch(tensors: &[Tensor]) {}

#[share]
fn describe(thing: &dyn std::fmt::Debug) {}

struct S;
impl S {
    #[share]
    fn method(&self) {}
}

fn main() {}
