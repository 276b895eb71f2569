//! `cargo xtask gpu-bundle`: everything the GPU machine runs, in one git-ignored folder.
//!
//! The GPU machine has no Rust toolchain, so the tests, their helper binaries and the
//! examples are built here (profile `gpu`: release, stripped), packed into one gzip'd tar with a runner
//! script, `run.sh`, which finds libtorch in the machine's `python3`, refuses to run
//! without CUDA, runs every test including the GPU ones (ignored on CPU) and every
//! example in its roles, and exits non-zero if anything failed.

use std::fs;
use std::path::Path;
use std::process::ExitCode;

use crate::libtorch::Libtorch;

pub const BUNDLE_DIR: &str = ".gpu-bundle";

/// The packed binaries inside the bundle.
const ARCHIVE: &str = "binaries.tar.gz";

/// Examples the runner starts: (name, server binary, client binary). The server binary
/// runs with SHARED_TENSOR_ROLE=server, the client binary without a role.
const EXAMPLES: &[(&str, &str, &str)] = &[
    ("zero_branch", "zero_branch", "zero_branch"),
    ("basic_service", "basic_service", "basic_service"),
    ("async_service", "async_service", "async_service"),
    ("model_service", "model_service_server", "model_service_client"),
    // A user's crate outside the workspace (tests/fixtures/own-crate), built by path.
    ("own_crate", "own-crate", "own-crate"),
];

/// The runtime library's unit tests in the bundle (their GPU tests are ignored on CPU).
const UNIT_TESTS: &str = "gpu_runtime_unit";

/// The fixture crate's binary (not an example of the workspace).
const OWN_CRATE: &str = "own-crate";

pub fn build(lt: &Libtorch) -> Result<ExitCode, String> {
    let mut args = vec![
        "--profile",
        "gpu",
        "--package",
        "shared-tensor-tests",
        // Only the GPU test binaries travel (CPU tests run in CI): building the others
        // with this profile's LTO would double the bundle's build time for nothing.
        "--test",
        "gpu_*",
        "--bins",
        "--package",
        "shared-tensor-examples",
    ];
    let mut binaries: Vec<&str> =
        EXAMPLES.iter().flat_map(|(_, s, c)| [*s, *c]).filter(|name| *name != OWN_CRATE).collect();
    binaries.dedup();
    for name in binaries {
        args.push("--example");
        args.push(name);
    }
    let mut exes = crate::build_executables(lt, &args)?;
    let fixture = crate::build_executables(
        lt,
        &[
            "--manifest-path",
            "tests/fixtures/own-crate/Cargo.toml",
            "--bin",
            OWN_CRATE,
            // The workspace's `gpu` profile, declared for the fixture too: the libtorch
            // bindings built for the bundle are reused, and the binary is stripped.
            "--profile",
            "gpu",
            "--config",
            "profile.gpu.inherits=\"release\"",
            "--config",
            "profile.gpu.strip=\"symbols\"",
            "--config",
            "profile.gpu.lto=\"thin\"",
        ],
    )?;
    exes.extend(fixture.into_iter().filter(|(name, _, _)| name == OWN_CRATE).map(|(n, _, p)| (n, "example".into(), p)));
    // The runtime's own unit tests, with their GPU ones (ignored on CPU): the test
    // harness of its lib travels as `gpu_runtime_unit`.
    let unit =
        crate::build_executables(lt, &["--profile", "gpu", "--package", "shared-tensor-runtime", "--lib", "--tests"])?;
    exes.extend(
        unit.into_iter()
            .filter(|(_, kind, _)| kind == "lib")
            .map(|(_, _, p)| (UNIT_TESTS.to_string(), "test".into(), p)),
    );
    let root = Path::new(BUNDLE_DIR);
    if root.exists() {
        fs::remove_dir_all(root).map_err(|e| format!("cannot clear {BUNDLE_DIR}: {e}"))?;
    }
    for dir in ["tests", "bin", "examples"] {
        fs::create_dir_all(root.join(dir)).map_err(|e| format!("cannot create {BUNDLE_DIR}/{dir}: {e}"))?;
    }
    let mut total = 0u64;
    let mut copied = 0usize;
    for (name, kind, path) in &exes {
        let dir = match kind.as_str() {
            // Only binaries with GPU tests travel; CPU tests run in CI.
            "test" if name.starts_with("gpu_") => "tests",
            "test" => continue,
            "bin" => "bin",
            "example" => "examples",
            _ => continue, // the lib's own unit tests need no GPU
        };
        let dest = root.join(dir).join(name);
        fs::copy(path, &dest).map_err(|e| format!("cannot copy {}: {e}", path.display()))?;
        total += fs::metadata(&dest).map(|m| m.len()).unwrap_or(0);
        copied += 1;
    }
    let mut script = RUNNER.to_string();
    let examples: Vec<String> =
        EXAMPLES.iter().map(|(name, server, client)| format!("{name}:{server}:{client}")).collect();
    script = script.replace("@EXAMPLES@", &examples.join(" "));
    let runner = root.join("run.sh");
    fs::write(&runner, script).map_err(|e| format!("cannot write {}: {e}", runner.display()))?;
    make_executable(&runner)?;
    // The device transfer carries at most 64 MiB: the binaries travel as one gzip'd tar
    // (about 40% of their size) that run.sh unpacks on first use.
    let status = std::process::Command::new("tar")
        .args(["-czf", ARCHIVE, "tests", "bin", "examples"])
        .current_dir(root)
        .status()
        .map_err(|e| format!("cannot run tar to pack {BUNDLE_DIR}: {e}"))?;
    if !status.success() {
        return Err(format!("tar failed to pack {BUNDLE_DIR} ({status})"));
    }
    for dir in ["tests", "bin", "examples"] {
        fs::remove_dir_all(root.join(dir)).map_err(|e| format!("cannot remove {BUNDLE_DIR}/{dir}: {e}"))?;
    }
    let packed = fs::metadata(root.join(ARCHIVE)).map(|m| m.len()).unwrap_or(0);
    println!(
        "xtask: GPU bundle in {BUNDLE_DIR}/ ({copied} binaries, {:.1} MiB, {:.1} MiB packed); \
         run it there with {BUNDLE_DIR}/run.sh [filter]",
        total as f64 / (1024.0 * 1024.0),
        packed as f64 / (1024.0 * 1024.0)
    );
    if packed > 60 * 1024 * 1024 {
        return Err(format!("the packed bundle is {packed} bytes, over the 60 MiB budget of the device transfer"));
    }
    Ok(ExitCode::SUCCESS)
}

fn make_executable(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let mut perms = fs::metadata(path).map_err(|e| e.to_string())?.permissions();
    perms.set_mode(0o755);
    fs::set_permissions(path, perms).map_err(|e| e.to_string())
}

const RUNNER: &str = r#"#!/usr/bin/env bash
# Runs the shared-tensor GPU bundle on a machine with a CUDA GPU and python3's torch 2.11.
# Usage: run.sh [filter]   (filter: substrings of the test binary or example names to run,
#                          separated by commas: `run.sh gpu_cache,gpu_models,own_crate`)
#        run.sh bench [--quick]   (the benchmark; writes $OUT/bench.json)
# Logs go to $OUT/gpu-bundle.log when OUT is set, else next to this script.
set -u
here=$(cd "$(dirname "$0")" && pwd)
filter=${1:-}
# Whether a test binary or example named $1 is selected by the filter.
selected() {
  [[ -z "$filter" ]] && return 0
  local part
  IFS=, read -ra parts <<<"$filter"
  for part in "${parts[@]}"; do
    [[ -n "$part" && "$1" == *"$part"* ]] && return 0
  done
  return 1
}
if [[ -f "$here/binaries.tar.gz" ]]; then
  tar -xzf "$here/binaries.tar.gz" -C "$here" && rm -f "$here/binaries.tar.gz" || {
    echo "gpu-bundle: cannot unpack $here/binaries.tar.gz"; exit 4; }
fi
log_dir=${OUT:-$here}
log="$log_dir/gpu-bundle.log"
[[ "$filter" == "bench" ]] && log="$log_dir/bench.log"
: >"$log"
say() { echo "$@" | tee -a "$log"; }

T=$(python3 -c 'import torch, os; print(os.path.dirname(torch.__file__))' 2>/dev/null) || {
  say "gpu-bundle: python3 has no torch; this machine cannot run the bundle"; exit 2; }
export LD_LIBRARY_PATH="$T/lib:$(dirname "$T")/nvidia/cu13/lib:${LD_LIBRARY_PATH:-}"
python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' || {
  say "gpu-bundle: no CUDA GPU is visible; refusing to run (GPU tests are never skipped here)"; exit 3; }
say "gpu-bundle: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -n 1)"
say "gpu-bundle: torch $(python3 -c 'import torch; print(torch.__version__)')"
export SHARED_TENSOR_TEST_BIN_DIR="$here/bin"
export RUST_BACKTRACE=1

if [[ "$filter" == "bench" ]]; then
  export ST_GPU_NAME="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)"
  shift
  timeout 540 "$here/bin/bench" "$@" >>"$log" 2>&1
  rc=$?
  pkill -f "$here/bin/" 2>/dev/null
  sed -n '/^shared-tensor benchmark/,$p' "$log"
  exit $rc
fi

failed=()
passed=0
not_run=()
gpus=$(python3 -c 'import torch; print(torch.cuda.device_count())')
for t in "$here"/tests/*; do
  name=$(basename "$t")
  selected "$name" || continue
  if [[ "$name" == gpu_two_gpus && "$gpus" -lt 2 ]]; then
    say "$name: NOT RUN (needs 2 GPUs, this machine has $gpus)"
    not_run+=("$name")
    continue
  fi
  say "=== test binary $name"
  # Straight to the log: a stray child holding a pipe open cannot stall the run.
  # gpu_load makes 6.4 million mixed calls (about 6 minutes on an H100); the rest take seconds.
  limit=300; [[ "$name" == gpu_load || "$name" == gpu_shutdown ]] && limit=570
  # Measurements run by hand (`measure_*`) are left out: they assert nothing.
  timeout $limit "$t" --include-ignored --test-threads=1 --show-output --skip measure_ >>"$log" 2>&1
  rc=$?
  section=$(sed -n "/^=== test binary $name\$/,\$p" "$log")
  say "$name: exit $rc; $(grep -E '^test result' <<<"$section" | tail -n 1)"
  if [[ $rc -eq 0 ]]; then passed=$((passed + 1)); else failed+=("test:$name"); fi
done

port=$(( ${SHARED_TENSOR_BASE_PORT:-2537} ))
for spec in @EXAMPLES@; do
  IFS=: read -r name server_bin client_bin <<<"$spec"
  selected "$name" || continue
  exe="$here/examples/$client_bin"
  say "=== example $name (server: $server_bin, client: $client_bin)"
  SHARED_TENSOR_ROLE=server "$here/examples/$server_bin" >>"$log" 2>&1 &
  server=$!
  for _ in $(seq 1 600); do
    (echo >/dev/tcp/127.0.0.1/$port) 2>/dev/null && break
    kill -0 $server 2>/dev/null || break
    sleep 0.1
  done
  timeout 300 "$exe" >>"$log" 2>&1
  rc=$?
  kill -TERM $server 2>/dev/null
  wait $server
  src=$?
  say "example $name: client exit $rc, server exit $src"
  if [[ $rc -eq 0 && $src -eq 0 ]]; then passed=$((passed + 1)); else failed+=("example:$name"); fi
done

pkill -f "$here/bin/" 2>/dev/null
say "gpu-bundle: ${passed} passed, ${#failed[@]} failed ${failed[*]:-}; not run: ${not_run[*]:-none}"
[[ ${#failed[@]} -eq 0 ]]
"#;
