//! With the `cli` feature, the inspector binary gets a run path to libtorch (it starts
//! without `LD_LIBRARY_PATH`). Without it, nothing: a library needs no link arguments.
fn main() {
    println!("cargo:rerun-if-env-changed=CARGO_FEATURE_CLI");
    if std::env::var_os("CARGO_FEATURE_CLI").is_some() {
        shared_tensor_build::rpath();
    }
}
