//! Compiles `csrc/st_ipc.cpp` against the libtorch that torch-sys found, and links the
//! CUDA pieces it calls (with the `cuda` feature, the default; nothing without it).
//!
//! Where things come from:
//! - libtorch: `DEP_TCH_LIBTORCH_LIB` (exported by torch-sys, whose `links = "tch"`),
//!   headers in `<lib>/../include`.
//! - CUDA headers and `libcudart.so.13`: the pip wheel's `<site-packages>/nvidia/cu13`
//!   (next to `torch/`); `SHARED_TENSOR_CUDA_HOME` overrides it, and `CUDA_HOME` is used
//!   when libtorch does not come from a wheel.

use std::env;
use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-changed=csrc/st_ipc.cpp");
    println!("cargo:rerun-if-changed=csrc/st_ipc.h");
    // Without the `cuda` feature the crate is the control plane only: no C++, no libtorch.
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    println!("cargo:rerun-if-env-changed=SHARED_TENSOR_CUDA_HOME");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");

    let lib = match env::var("DEP_TCH_LIBTORCH_LIB") {
        Ok(lib) => PathBuf::from(lib),
        Err(_) => fail(
            "torch-sys did not export the libtorch folder (DEP_TCH_LIBTORCH_LIB). \
             Build through `cargo xtask` (it sets up libtorch 2.11), or set LIBTORCH.",
        ),
    };
    let torch_root = lib.parent().map(Path::to_path_buf).unwrap_or_default();
    let include = torch_root.join("include");
    let cuda = cuda_home(&torch_root);
    let cuda_include = cuda.join("include");
    let cuda_lib = [cuda.join("lib"), cuda.join("lib64")]
        .into_iter()
        .find(|dir| dir.join("libcudart.so.13").exists() || dir.join("libcudart.so").exists())
        .unwrap_or_else(|| {
            fail(&format!(
                "no libcudart.so.13 under {}: install `nvidia-cuda-runtime` for CUDA 13 next to \
                 torch (cargo xtask does), or set SHARED_TENSOR_CUDA_HOME to a CUDA 13 toolkit",
                cuda.display()
            ))
        });
    if !cuda_include.join("crt").join("host_config.h").exists() {
        fail(&format!(
            "{} lacks crt/host_config.h, which the c10/cuda headers need: \
             `pip install 'nvidia-cuda-crt==13.0.*'` next to torch (cargo xtask does), \
             or set SHARED_TENSOR_CUDA_HOME to a full CUDA 13 toolkit",
            cuda_include.display()
        ));
    }

    cc::Build::new()
        .cpp(true)
        .file("csrc/st_ipc.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .include(&cuda_include)
        .flag("-std=c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-deprecated-declarations")
        .warnings(false)
        .compile("st_ipc");

    // Order matters with --as-needed: these come after libst_ipc.a on the link line.
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-search=native={}", cuda_lib.display());
    println!("cargo:rustc-link-lib=dylib=torch_cuda");
    println!("cargo:rustc-link-lib=dylib=c10_cuda");
    if cuda_lib.join("libcudart.so.13").exists() {
        println!("cargo:rustc-link-lib=dylib:+verbatim=libcudart.so.13");
    } else {
        println!("cargo:rustc-link-lib=dylib=cudart");
    }
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
    println!("cargo:rustc-link-lib=dylib=stdc++");
}

fn cuda_home(torch_root: &Path) -> PathBuf {
    if let Ok(dir) = env::var("SHARED_TENSOR_CUDA_HOME") {
        return PathBuf::from(dir);
    }
    // <site-packages>/torch/lib -> <site-packages>/nvidia/cu13: the CUDA that this
    // libtorch was built with, preferred over whatever CUDA_HOME points at.
    let wheel = torch_root.parent().map(|site| site.join("nvidia").join("cu13")).unwrap_or_default();
    if wheel.exists() {
        return wheel;
    }
    if let Ok(dir) = env::var("CUDA_HOME") {
        return PathBuf::from(dir);
    }
    fail(&format!(
        "no CUDA 13 headers found: expected the pip wheel's nvidia/cu13 next to {} \
         (cargo xtask installs it), or set SHARED_TENSOR_CUDA_HOME",
        torch_root.display()
    ))
}

fn fail(msg: &str) -> ! {
    eprintln!("shared-tensor-runtime build: {msg}");
    std::process::exit(1);
}
