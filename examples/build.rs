//! The examples start without `LD_LIBRARY_PATH`: a run path to libtorch, as a user's
//! binary package gets it (README, "Use it in your crate").
fn main() {
    shared_tensor_build::rpath();
}
