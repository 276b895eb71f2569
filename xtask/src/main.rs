//! `cargo xtask`: the project's automation. Every command first makes sure libtorch 2.11
//! is available (installing it into a cache venv on first use) and runs cargo with the
//! environment tch needs.

mod bundle;
#[cfg(test)]
mod layers;
mod libtorch;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

use libtorch::Libtorch;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "shared-tensor project automation")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install libtorch 2.11 into the cache venv if it is missing, and say where it is.
    Bootstrap,
    /// Print `export` lines that set up a shell for plain `cargo` (eval "$(cargo xtask env)").
    Env,
    /// Run the test suite (`cargo test --workspace`; extra arguments go to cargo test),
    /// then build the out-of-workspace fixture crate and run its binary in a clean
    /// environment.
    Test {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Run the two-process demo: start the server role, run the client role, stop the server.
    Demo {
        /// Which example to run in both roles.
        #[arg(long, default_value = "zero_branch")]
        example: String,
    },
    /// Build the GPU tests and examples, stripped, with a runner script, into .gpu-bundle/.
    GpuBundle,
    /// Run the model tests of the hand-written concurrency primitives under loom (every
    /// interleaving within a bound on preemptions; no libtorch needed). Part of `test`.
    Loom,
    /// Run the benchmark here (needs a CUDA GPU); `--quick` for fewer calls.
    Bench {
        #[arg(long)]
        quick: bool,
    },
    /// Fuzz the frame reader and message decoders with libFuzzer (nightly, cargo-fuzz).
    Fuzz {
        /// How many inputs to run.
        #[arg(long, default_value_t = 1_000_000)]
        runs: u64,
    },
    /// Run any cargo command with the libtorch environment (e.g. `cargo xtask cargo clippy`).
    Cargo {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(code) => code,
        Err(msg) => {
            eprintln!("xtask: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn run(cmd: Cmd) -> Result<ExitCode, String> {
    let lt = Libtorch::ensure()?;
    match cmd {
        Cmd::Bootstrap => {
            println!("libtorch: {}", lt.describe());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Env => {
            for (key, value) in lt.envs() {
                println!("export {key}={}", shell_quote(&value.to_string_lossy()));
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Test { args } => {
            eprintln!("xtask: step 1/5: the inspector without libtorch (--no-default-features --features cli)");
            let inspector = inspector_without_libtorch(&lt)?;
            let mut cmd = cargo(&lt);
            // `cli`: the inspector and its tests, which run the libtorch-free build above.
            cmd.args(["test", "--workspace", "--features", "shared-tensor/cli"]).args(args);
            cmd.env("SHARED_TENSOR_INSPECTOR", &inspector);
            eprintln!("xtask: step 2/5: cargo test --workspace");
            if status_of(cmd)? != ExitCode::SUCCESS {
                return Ok(ExitCode::FAILURE);
            }
            eprintln!("xtask: step 3/5: the runtime's control plane alone (--no-default-features): its tests");
            let mut cmd = cargo(&lt);
            cmd.args(["test", "--package", "shared-tensor-runtime", "--no-default-features", "--lib"]);
            if status_of(cmd)? != ExitCode::SUCCESS {
                return Ok(ExitCode::FAILURE);
            }
            eprintln!("xtask: step 4/5: the concurrency primitives' model tests under loom");
            if loom(&lt)? != ExitCode::SUCCESS {
                return Ok(ExitCode::FAILURE);
            }
            eprintln!(
                "xtask: step 5/5: a user's own crate (tests/fixtures/own-crate) built by path, run with no environment"
            );
            own_crate(&lt)
        }
        Cmd::Cargo { args } => {
            let mut cmd = cargo(&lt);
            cmd.args(args);
            status_of(cmd)
        }
        Cmd::Demo { example } => demo(&lt, &example),
        Cmd::GpuBundle => bundle::build(&lt),
        Cmd::Loom => loom(&lt),
        Cmd::Bench { quick } => bench(&lt, quick),
        Cmd::Fuzz { runs } => fuzz(&lt, runs),
    }
}

/// `cargo` with the libtorch environment applied.
pub fn cargo(lt: &Libtorch) -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.envs(lt.envs());
    cmd
}

fn status_of(mut cmd: Command) -> Result<ExitCode, String> {
    let status = cmd.status().map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    Ok(if status.success() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Builds `tests/fixtures/own-crate` (a crate outside the workspace that depends on
/// shared-tensor by path, as the README's "Use it in your crate" says) and runs its binary
/// with an empty environment: no `LD_LIBRARY_PATH`, no `PATH`. It must start (its first
/// line) and, without a GPU, end with its own sentence about the missing GPU (exit 1),
/// never a loader error.
fn own_crate(lt: &Libtorch) -> Result<ExitCode, String> {
    let manifest = Path::new("tests/fixtures/own-crate/Cargo.toml");
    let target = target_dir()?;
    let mut build = cargo(lt);
    build.arg("build").arg("--manifest-path").arg(manifest).arg("--target-dir").arg(&target);
    if status_of(build)? != ExitCode::SUCCESS {
        return Err("the fixture crate tests/fixtures/own-crate does not build (cargo's messages are above)".into());
    }
    let exe = target.join("debug/own-crate");
    let out = Command::new(&exe).env_clear().output().map_err(|e| format!("cannot run {}: {e}", exe.display()))?;
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprint!("{stdout}{stderr}");
    let started = stdout.contains("own-crate: started as client");
    let own_words = stderr.starts_with("own-crate: cannot share tensors here: ");
    let gpu_run = out.status.success() && stdout.contains("double([0, 1, 2, 3])");
    if started && (own_words && out.status.code() == Some(1) || gpu_run) {
        eprintln!("xtask: the fixture's binary started with no environment and spoke in its own words");
        Ok(ExitCode::SUCCESS)
    } else {
        Err(format!(
            "the fixture's binary {} did not start cleanly with an empty environment ({}): a loader error means \
             the run path to libtorch is missing",
            exe.display(),
            out.status
        ))
    }
}

/// Builds the inspector as `cargo install --path shared-tensor --no-default-features
/// --features cli` would (no `cuda`: the control plane alone), copies it out of cargo's
/// way to `target/inspector/shared-tensor` (the workspace build of the same binary, with
/// `cuda`, lands on cargo's path) and checks it links nothing of libtorch or CUDA: the
/// dynamic loader's list of what it would load (`LD_TRACE_LOADED_OBJECTS`) names none, and
/// with an empty environment `--help` works and `ping` to no server says so (exit 3).
fn inspector_without_libtorch(lt: &Libtorch) -> Result<PathBuf, String> {
    let exes = build_executables(
        lt,
        &["--package", "shared-tensor", "--no-default-features", "--features", "cli", "--bin", "shared-tensor"],
    )?;
    let (_, _, built) = exes
        .into_iter()
        .find(|(name, kind, _)| name == "shared-tensor" && kind == "bin")
        .ok_or("cargo built no inspector")?;
    let dir = target_dir()?.join("inspector");
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let exe = dir.join("shared-tensor");
    std::fs::copy(&built, &exe).map_err(|e| format!("cannot copy {} to {}: {e}", built.display(), exe.display()))?;
    let run = |args: &[&str], trace: bool| {
        let mut cmd = Command::new(&exe);
        cmd.env_clear().args(args);
        if trace {
            cmd.env("LD_TRACE_LOADED_OBJECTS", "1");
        }
        cmd.output().map_err(|e| format!("cannot run {}: {e}", exe.display()))
    };
    let loads = run(&[], true)?;
    let loads = String::from_utf8_lossy(&loads.stdout).into_owned();
    let torch: Vec<&str> = loads
        .lines()
        .map(str::trim)
        .filter(|l| ["libtorch", "libc10", "libcudart", "libcuda."].iter().any(|lib| l.contains(lib)))
        .collect();
    if !torch.is_empty() {
        return Err(format!("the inspector built without `cuda` still loads {torch:?}:\n{loads}"));
    }
    let help = run(&["--help"], false)?;
    if !help.status.success() || !String::from_utf8_lossy(&help.stdout).contains("Usage: shared-tensor") {
        return Err(format!("`shared-tensor --help` with an empty environment failed ({})", help.status));
    }
    let nowhere = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| e.to_string())?
        .local_addr()
        .map_err(|e| e.to_string())?;
    let ping = run(&["--base-port", &nowhere.port().to_string(), "ping"], false)?;
    let said = String::from_utf8_lossy(&ping.stderr).into_owned();
    if ping.status.code() != Some(3) || !said.contains("no shared-tensor server at") {
        return Err(format!("`shared-tensor ping` to no server with an empty environment: {} {said}", ping.status));
    }
    eprintln!(
        "xtask: {} loads {} libraries, none of libtorch or CUDA; --help and ping (exit 3, no server) work with an \
         empty environment",
        exe.display(),
        loads.lines().count()
    );
    Ok(exe)
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Builds with `--message-format=json` and returns the executables cargo produced, as
/// (target name, target kind, path). Cargo's own output (progress, the compiler's messages)
/// streams through on stderr; only the JSON on stdout is read here.
pub fn build_executables(lt: &Libtorch, args: &[&str]) -> Result<Vec<(String, String, PathBuf)>, String> {
    let mut cmd = cargo(lt);
    cmd.arg("build").args(args).arg("--message-format=json-render-diagnostics");
    cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
    eprintln!("xtask: cargo build {} (a first build takes minutes: it compiles the libtorch bindings unless --no-default-features)", args.join(" "));
    let out = cmd.output().map_err(|e| format!("cannot run cargo build: {e}"))?;
    if !out.status.success() {
        return Err(format!("cargo build {} failed (cargo's messages are above)", args.join(" ")));
    }
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        let Some(exe) = msg["executable"].as_str() else {
            continue;
        };
        let name = msg["target"]["name"].as_str().unwrap_or_default().to_string();
        let kind = msg["target"]["kind"][0].as_str().unwrap_or_default().to_string();
        found.push((name, kind, PathBuf::from(exe)));
    }
    Ok(found)
}

fn bench(lt: &Libtorch, quick: bool) -> Result<ExitCode, String> {
    let exes = build_executables(lt, &["--profile", "gpu", "--package", "shared-tensor-tests", "--bins"])?;
    let bench = exes
        .iter()
        .find(|(name, kind, _)| name == "bench" && kind == "bin")
        .map(|(_, _, p)| p.clone())
        .ok_or("cargo built no bench binary")?;
    let mut cmd = Command::new(bench);
    cmd.envs(lt.envs());
    if quick {
        cmd.arg("--quick");
    }
    status_of(cmd)
}

/// The runtime's loom model tests (`loom_models` modules): the runtime without libtorch,
/// built with `--cfg shared_tensor_loom` (which swaps `protocol::sync` for loom's models)
/// in a target directory of its own, so the ordinary build is not rebuilt for it.
/// `LOOM_MAX_PREEMPTIONS` (default 3, set in the tests) bounds the exploration.
fn loom(lt: &Libtorch) -> Result<ExitCode, String> {
    let mut cmd = cargo(lt);
    let mut flags = std::env::var("RUSTFLAGS").unwrap_or_default();
    flags.push_str(" --cfg shared_tensor_loom");
    cmd.env("RUSTFLAGS", flags.trim_start())
        .env("CARGO_TARGET_DIR", target_dir()?.join("loom"))
        .args(["test", "--release", "--package", "shared-tensor-runtime", "--no-default-features", "--lib"])
        .args(["--", "loom_models"]);
    status_of(cmd)
}

/// The workspace's target directory (`CARGO_TARGET_DIR`, else `target` here).
fn target_dir() -> Result<PathBuf, String> {
    let root = std::env::current_dir().map_err(|e| format!("cannot read the current folder: {e}"))?;
    Ok(std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target")))
}

fn fuzz(lt: &Libtorch, runs: u64) -> Result<ExitCode, String> {
    let installed = Command::new("cargo").args(["fuzz", "--version"]).output().is_ok_and(|o| o.status.success());
    if !installed {
        eprintln!("xtask: installing cargo-fuzz");
        status_of({
            let mut c = Command::new("cargo");
            c.args(["install", "cargo-fuzz", "--locked"]);
            c
        })?;
    }
    // The rustup proxy (not $CARGO, which is one toolchain's binary) understands +nightly.
    let mut cmd = Command::new("cargo");
    cmd.envs(lt.envs())
        .env_remove("RUSTUP_TOOLCHAIN")
        .current_dir("shared-tensor-runtime")
        .args(["+nightly", "fuzz", "run", "decode", "--sanitizer", "none", "--"])
        .arg(format!("-runs={runs}"));
    status_of(cmd)
}

/// The port a demo server listens on: base port plus device 0.
fn demo_port() -> Result<u16, String> {
    match std::env::var("SHARED_TENSOR_BASE_PORT") {
        Ok(v) => v
            .parse()
            .map_err(|_| format!("SHARED_TENSOR_BASE_PORT={v:?} is not a port number (0-65535); unset it to use 2537")),
        Err(_) => Ok(2537),
    }
}

fn demo(lt: &Libtorch, example: &str) -> Result<ExitCode, String> {
    let exes = build_executables(lt, &["--package", "shared-tensor-examples", "--example", example])?;
    let exe = exes
        .into_iter()
        .find(|(name, kind, _)| name == example && kind == "example")
        .map(|(_, _, path)| path)
        .ok_or_else(|| format!("cargo built no example named {example}"))?;
    // The inspector checks that a shared-tensor server (not just anything) answers.
    let inspector =
        build_executables(lt, &["--package", "shared-tensor", "--features", "cli", "--bin", "shared-tensor"])?
            .into_iter()
            .find(|(name, kind, _)| name == "shared-tensor" && kind == "bin")
            .map(|(_, _, path)| path)
            .ok_or("cargo built no shared-tensor inspector")?;
    let port = demo_port()?;
    let mut server = Command::new(&exe)
        .envs(lt.envs())
        .env("SHARED_TENSOR_ROLE", "server")
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
    let result = demo_client(lt, &exe, &inspector, &mut server, port);
    stop(&mut server);
    match result {
        // The server already said why on stderr (for example: a CUDA GPU is required).
        Err(DemoError::ServerExited) => Ok(ExitCode::FAILURE),
        Err(DemoError::Other(msg)) => Err(msg),
        Ok(code) => Ok(code),
    }
}

enum DemoError {
    ServerExited,
    Other(String),
}

impl From<String> for DemoError {
    fn from(msg: String) -> Self {
        DemoError::Other(msg)
    }
}

/// Waits until a shared-tensor server answers a handshake on `port` (the inspector's
/// `ping`: exit 0 answered, 3 nobody there yet, anything else something that is not our
/// server), then runs the client role.
fn demo_client(
    lt: &Libtorch,
    exe: &PathBuf,
    inspector: &PathBuf,
    server: &mut Child,
    port: u16,
) -> Result<ExitCode, DemoError> {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(120);
    let mut said = Instant::now();
    loop {
        if server.try_wait().map_err(|e| e.to_string())?.is_some() {
            return Err(DemoError::ServerExited);
        }
        let ping = Command::new(inspector)
            .envs(lt.envs())
            .args(["--base-port", &port.to_string(), "--device", "0", "ping"])
            .output()
            .map_err(|e| format!("cannot run the inspector {}: {e}", inspector.display()))?;
        match ping.status.code() {
            Some(0) => break,
            Some(3) => {}
            _ => {
                return Err(format!(
                    "something that is not a shared-tensor server answers on 127.0.0.1:{port}: {}; stop it or set \
                     SHARED_TENSOR_BASE_PORT",
                    String::from_utf8_lossy(&ping.stderr).trim()
                )
                .into())
            }
        }
        if Instant::now() > deadline {
            return Err(format!("the server role did not answer on 127.0.0.1:{port} within 120 s").into());
        }
        if said.elapsed() > Duration::from_secs(5) {
            eprintln!("xtask: waiting for the server role to start ({} s)", started.elapsed().as_secs());
            said = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("xtask: server answered a shared-tensor handshake; running the same binary as the client");
    let status = Command::new(exe)
        .envs(lt.envs())
        .env_remove("SHARED_TENSOR_ROLE")
        .status()
        .map_err(|e| format!("cannot start the client: {e}"))?;
    if status.success() {
        eprintln!("xtask: client finished; stopping the server");
        Ok(ExitCode::SUCCESS)
    } else {
        Err(format!("the client role failed ({status})").into())
    }
}

/// SIGTERM, then SIGKILL if the process has not exited within 10 s.
fn stop(child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}
