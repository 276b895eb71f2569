use shared_tensor::Payload;

#[derive(Payload)]
struct Borrows<'a> {
    t: &'a tch::Tensor,
}

#[derive(Payload)]
struct UnknownOption {
    #[payload(sometimes)]
    t: tch::Tensor,
}

fn main() {}
