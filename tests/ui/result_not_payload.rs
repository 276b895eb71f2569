use shared_tensor::share;

#[share]
fn count() -> i64 {
    1
}

#[share]
fn name() -> String {
    String::new()
}

fn main() {}
