use shared_tensor::share;

struct NotSerde;

#[share]
fn takes(x: NotSerde) {}

fn main() {}
