//! With `cli` and `cuda` together (a workspace build, where the package's tests serve
//! endpoints in-process), the package's binaries get a run path to libtorch: they start
//! without `LD_LIBRARY_PATH`. The inspector built without `cuda` links no libtorch and
//! needs none. A library alone needs no link arguments.
fn main() {
    println!("cargo:rerun-if-env-changed=CARGO_FEATURE_CLI");
    println!("cargo:rerun-if-env-changed=CARGO_FEATURE_CUDA");
    if std::env::var_os("CARGO_FEATURE_CLI").is_some() && std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        shared_tensor_build::rpath();
    }
}
