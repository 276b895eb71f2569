//! Finding or installing libtorch 2.11, and the environment cargo needs to build against it.
//!
//! Three sources, first match wins:
//! 1. `LIBTORCH` (a libtorch 2.11 folder; CUDA headers from `SHARED_TENSOR_CUDA_HOME`);
//! 2. `SHARED_TENSOR_PYTHON` (an interpreter that has `torch==2.11.0` and
//!    `nvidia-cuda-crt==13.0.*` installed);
//! 3. a venv that this module creates under the cache folder
//!    (`SHARED_TENSOR_CACHE_DIR`, default `~/.cache/shared-tensor`) and reuses afterwards.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

pub const TORCH_VERSION: &str = "2.11.0";
const PIP_PACKAGES: [&str; 2] = ["torch==2.11.0", "nvidia-cuda-crt==13.0.*"];
const READY_MARKER: &str = ".shared-tensor-ready";

/// Where libtorch comes from, once found or installed.
pub enum Libtorch {
    /// A plain libtorch folder named by `LIBTORCH`.
    Folder { root: PathBuf },
    /// A Python interpreter with the torch wheel installed.
    Wheel { python: PathBuf, site_packages: PathBuf },
}

impl Libtorch {
    /// Finds libtorch, installing it into the cache venv when nothing else is set up.
    pub fn ensure() -> Result<Self, String> {
        if let Some(root) = std::env::var_os("LIBTORCH") {
            let root = PathBuf::from(root);
            if !root.join("lib").exists() {
                return Err(format!(
                    "LIBTORCH={} has no lib/ folder; point it at an unpacked libtorch {TORCH_VERSION}",
                    root.display()
                ));
            }
            return Ok(Libtorch::Folder { root });
        }
        if let Some(python) = std::env::var_os("SHARED_TENSOR_PYTHON") {
            let python = PathBuf::from(python);
            let site_packages = site_packages_of(&python)?;
            check_wheel(&site_packages).map_err(|e| format!("SHARED_TENSOR_PYTHON={}: {e}", python.display()))?;
            return Ok(Libtorch::Wheel { python, site_packages });
        }
        let venv = cache_dir()?.join(format!("torch-{TORCH_VERSION}"));
        let python = venv.join("bin").join("python");
        if venv.join(READY_MARKER).exists() && python.exists() {
            let site_packages = find_site_packages(&venv)?;
            return Ok(Libtorch::Wheel { python, site_packages });
        }
        install_venv(&venv)?;
        let site_packages = find_site_packages(&venv)?;
        Ok(Libtorch::Wheel { python, site_packages })
    }

    /// Environment variables for cargo and for running what it builds.
    pub fn envs(&self) -> Vec<(&'static str, OsString)> {
        let mut lib_dirs: Vec<PathBuf> = Vec::new();
        let mut envs: Vec<(&'static str, OsString)> = Vec::new();
        match self {
            Libtorch::Folder { root } => {
                lib_dirs.push(root.join("lib"));
                if let Some(cuda) = std::env::var_os("SHARED_TENSOR_CUDA_HOME") {
                    lib_dirs.push(PathBuf::from(cuda).join("lib"));
                }
            }
            Libtorch::Wheel { python, site_packages } => {
                let bin = python.parent().unwrap_or(Path::new("/"));
                envs.push(("LIBTORCH_USE_PYTORCH", "1".into()));
                if bin.join("activate").exists() {
                    envs.push(("VIRTUAL_ENV", bin.parent().unwrap_or(bin).into()));
                }
                envs.push(("PATH", prepend_path(bin, std::env::var_os("PATH"))));
                lib_dirs.push(site_packages.join("torch").join("lib"));
                lib_dirs.push(site_packages.join("nvidia").join("cu13").join("lib"));
            }
        }
        let mut ld = OsString::new();
        for dir in &lib_dirs {
            if !ld.is_empty() {
                ld.push(":");
            }
            ld.push(dir);
        }
        if let Some(old) = std::env::var_os("LD_LIBRARY_PATH").filter(|v| !v.is_empty()) {
            ld.push(":");
            ld.push(old);
        }
        envs.push(("LD_LIBRARY_PATH", ld));
        envs
    }

    pub fn describe(&self) -> String {
        match self {
            Libtorch::Folder { root } => format!("libtorch folder {}", root.display()),
            Libtorch::Wheel { python, .. } => {
                format!("torch {TORCH_VERSION} wheel through {}", python.display())
            }
        }
    }
}

fn prepend_path(dir: &Path, old: Option<OsString>) -> OsString {
    let mut path = OsString::from(dir);
    if let Some(old) = old {
        path.push(":");
        path.push(old);
    }
    path
}

fn cache_dir() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("SHARED_TENSOR_CACHE_DIR") {
        return Ok(PathBuf::from(dir));
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return Ok(PathBuf::from(dir).join("shared-tensor"));
    }
    match std::env::var_os("HOME") {
        Some(home) => Ok(PathBuf::from(home).join(".cache").join("shared-tensor")),
        None => Err("neither SHARED_TENSOR_CACHE_DIR nor HOME is set: set SHARED_TENSOR_CACHE_DIR \
                     to a folder where libtorch may be installed"
            .into()),
    }
}

fn find_site_packages(venv: &Path) -> Result<PathBuf, String> {
    let lib = venv.join("lib");
    let entries = std::fs::read_dir(&lib).map_err(|e| format!("cannot read {}: {e}", lib.display()))?;
    for entry in entries.flatten() {
        let candidate = entry.path().join("site-packages");
        if entry.file_name().to_string_lossy().starts_with("python") && candidate.exists() {
            return Ok(candidate);
        }
    }
    Err(format!("no python*/site-packages under {}", lib.display()))
}

fn site_packages_of(python: &Path) -> Result<PathBuf, String> {
    let out = Command::new(python)
        .args(["-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
        .output()
        .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
    if !out.status.success() {
        return Err(format!("{} failed: {}", python.display(), String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// Checks the installed wheel without importing torch (which takes seconds).
fn check_wheel(site_packages: &Path) -> Result<(), String> {
    let version_file = site_packages.join("torch").join("version.py");
    let text = std::fs::read_to_string(&version_file)
        .map_err(|_| format!("torch is not installed there (no {})", version_file.display()))?;
    let version = text
        .lines()
        .find_map(|l| l.strip_prefix("__version__ = "))
        .map(|v| v.trim().trim_matches(['\'', '"']).to_string())
        .unwrap_or_default();
    if !version.starts_with(TORCH_VERSION) {
        return Err(format!("torch {version} is installed, but tch 0.24 needs torch {TORCH_VERSION}"));
    }
    let crt = site_packages.join("nvidia/cu13/include/crt/host_config.h");
    if !crt.exists() {
        return Err(format!("{} is missing: install 'nvidia-cuda-crt==13.0.*' next to torch", crt.display()));
    }
    Ok(())
}

fn install_venv(venv: &Path) -> Result<(), String> {
    let hint = "To use a libtorch you already have, set SHARED_TENSOR_PYTHON to a Python interpreter \
                with torch==2.11.0 and nvidia-cuda-crt==13.0.* installed, or LIBTORCH to a libtorch \
                2.11 folder together with SHARED_TENSOR_CUDA_HOME (a CUDA 13 toolkit).";
    let python3 = std::env::var_os("PYTHON").unwrap_or_else(|| "python3".into());
    eprintln!(
        "xtask: installing torch=={TORCH_VERSION} (about 4.6 GB with its CUDA libraries, a few minutes) into {}",
        venv.display()
    );
    std::fs::create_dir_all(venv.parent().unwrap_or(venv))
        .map_err(|e| format!("cannot create {}: {e}. {hint}", venv.display()))?;
    run_step(
        Command::new(&python3).arg("-m").arg("venv").arg(venv),
        &format!("creating a Python venv with {} (on Debian: apt-get install python3-venv)", python3.to_string_lossy()),
        hint,
    )?;
    let pip = venv.join("bin").join("pip");
    run_step(
        Command::new(&pip).args(["install", "--no-input", "--disable-pip-version-check"]).args(PIP_PACKAGES),
        &format!("pip install {}", PIP_PACKAGES.join(" ")),
        hint,
    )?;
    let site_packages = find_site_packages(venv)?;
    check_wheel(&site_packages).map_err(|e| format!("after installing: {e}. {hint}"))?;
    std::fs::write(venv.join(READY_MARKER), PIP_PACKAGES.join("\n"))
        .map_err(|e| format!("cannot write the ready marker in {}: {e}", venv.display()))?;
    Ok(())
}

fn run_step(cmd: &mut Command, what: &str, hint: &str) -> Result<(), String> {
    let status = cmd.status().map_err(|e| format!("{what} could not start: {e}. {hint}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{what} failed ({status}); its output is above. {hint}"))
    }
}
