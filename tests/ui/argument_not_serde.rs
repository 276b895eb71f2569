use shared_tensor::share;

struct NotSerde;

#[share(cache = false)]
fn takes(x: NotSerde) {}

fn main() {}
