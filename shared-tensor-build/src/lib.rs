//! A build-script helper for packages whose binaries use shared-tensor.
//!
//! A binary linked against libtorch needs to find `libtorch_cuda.so` and friends when it
//! starts. Cargo cannot pass link arguments from a library (shared-tensor) to the
//! binaries that use it, so each binary package asks for them in its own `build.rs`, with
//! one line:
//!
//! ```no_run
//! // In `fn main` of build.rs of your binary package
//! // ([build-dependencies] shared-tensor-build = "..."):
//! shared_tensor_build::rpath();
//! ```
//!
//! The binaries then carry the libtorch folders in their run path: they start without
//! `LD_LIBRARY_PATH`. The folders are found from the same environment the `tch` build
//! reads: `LIBTORCH` (a libtorch folder; its `lib`), or `LIBTORCH_USE_PYTORCH=1` with the
//! Python that has `torch==2.11.0` (`python` when `VIRTUAL_ENV` is set, else `python3`;
//! its `torch/lib` and `nvidia/cu13/lib`). A binary copied to another machine needs
//! libtorch at the same paths there, or `LD_LIBRARY_PATH`.
//!
//! This crate has no dependencies and does not touch libtorch itself.

#![warn(missing_docs)]
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::Command;

/// Prints the `cargo:` lines that give this package's binaries (and tests and examples)
/// a run path to libtorch's folders. When they cannot be found it prints a
/// `cargo:warning` saying so (the binaries then need `LD_LIBRARY_PATH`) and does not fail
/// the build.
///
/// ```no_run
/// // build.rs: fn main() { ... }
/// shared_tensor_build::rpath();
/// ```
pub fn rpath() {
    for var in ["LIBTORCH", "LIBTORCH_USE_PYTORCH", "VIRTUAL_ENV", "PATH", "SHARED_TENSOR_CUDA_HOME"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    match libtorch_lib_dirs() {
        Ok(dirs) => {
            for dir in dirs {
                println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.display());
            }
        }
        Err(why) => {
            println!("cargo:warning=shared-tensor-build: no run path to libtorch ({why}); run with LD_LIBRARY_PATH")
        }
    }
}

/// The folders that hold libtorch's shared libraries (and CUDA's, for the pip wheel), as
/// the `tch` build finds them.
///
/// ```no_run
/// for dir in shared_tensor_build::libtorch_lib_dirs().unwrap() {
///     println!("{}", dir.display());
/// }
/// ```
pub fn libtorch_lib_dirs() -> Result<Vec<PathBuf>, String> {
    if let Some(root) = std::env::var_os("LIBTORCH") {
        let mut dirs = vec![PathBuf::from(root).join("lib")];
        dirs.extend(std::env::var_os("SHARED_TENSOR_CUDA_HOME").map(|c| PathBuf::from(c).join("lib")));
        return Ok(dirs);
    }
    if std::env::var_os("LIBTORCH_USE_PYTORCH").is_none() {
        return Err("neither LIBTORCH nor LIBTORCH_USE_PYTORCH is set".into());
    }
    let python = if std::env::var_os("VIRTUAL_ENV").is_some() { "python" } else { "python3" };
    let out = Command::new(python)
        .args(["-c", "import os, torch; print(os.path.dirname(torch.__file__))"])
        .output()
        .map_err(|e| format!("cannot run {python}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{python} cannot import torch: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    let torch = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let mut dirs = vec![torch.join("lib")];
    if let Some(site) = torch.parent() {
        let cuda = site.join("nvidia").join("cu13").join("lib");
        if cuda.is_dir() {
            dirs.push(cuda);
        }
    }
    Ok(dirs)
}
