//! Shared harness of the integration tests.
//!
//! GPU tests are `#[ignore = "GPU ..."]`: a CPU-only `cargo test` lists them as ignored,
//! and the GPU bundle runs them with `--include-ignored`. Each GPU test starts with
//! [`require_gpu`], so a GPU run on a machine without CUDA fails instead of passing.
//!
//! Two-process tests start helper binaries of this package ([`helper_bin`]) and talk to
//! them over stdin/stdout in the protocol's own frames ([`send`], [`recv`], through
//! `wire::write_frame` and `wire::read_frame`).

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Panics unless this process sees a CUDA device: GPU tests must never pass without one.
pub fn require_gpu() {
    if let Err(e) = shared_tensor::cuda::require() {
        panic!("this GPU test needs a CUDA GPU and must not be skipped: {e}");
    }
}

/// The path of a helper binary of this package: `$SHARED_TENSOR_TEST_BIN_DIR/<name>` in
/// the GPU bundle, else the path cargo built it at.
pub fn helper_bin(name: &str, cargo_path: &str) -> PathBuf {
    match std::env::var_os("SHARED_TENSOR_TEST_BIN_DIR") {
        Some(dir) => PathBuf::from(dir).join(name),
        None => PathBuf::from(cargo_path),
    }
}

/// The bytes of `t.contiguous()`, copied to the host: for bit-exact comparisons.
pub fn bytes_of(t: &tch::Tensor) -> Vec<u8> {
    let t = t.contiguous().to_device(tch::Device::Cpu);
    let mut out = vec![0u8; t.numel() * t.kind().elt_size_in_bytes()];
    t.copy_data_u8(&mut out, t.numel());
    out
}

/// A port nothing listens on right now (the OS picks it; free it again at once).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Waits until `done` holds, failing the test after 20 s: a readiness check polled
/// without sleeping, for tests that wait on another thread or process.
pub fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::yield_now();
    }
}

/// The configuration of a client of a loopback server on `port` (device 0, 5 s to connect).
pub fn loopback_config(port: u16) -> shared_tensor::config::Config {
    shared_tensor::config::Config::default()
        .base_port(port)
        .device_index(0)
        .connect_timeout(std::time::Duration::from_secs(5))
}

/// Makes this test process a client of a server it runs itself in the background on a
/// free loopback port (no GPU needed), once per test binary; `adjust` tunes the
/// process's configuration. Returns the port.
pub fn serve_here(adjust: impl FnOnce(shared_tensor::config::Config) -> shared_tensor::config::Config) -> u16 {
    static PORT: std::sync::OnceLock<u16> = std::sync::OnceLock::new();
    *PORT.get_or_init(|| {
        let port = free_port();
        let config = adjust(loopback_config(port).role(shared_tensor::config::Role::Client));
        shared_tensor::configure(config).unwrap();
        shared_tensor::serve_in_background(None).unwrap();
        port
    })
}

/// A helper process with piped stdin and stdout, killed if dropped while running.
pub struct Peer {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Peer {
    /// Starts `exe` with the given environment variables.
    pub fn spawn(exe: &PathBuf, envs: &[(&str, &str)]) -> Peer {
        let mut cmd = Command::new(exe);
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {}: {e}", exe.display()));
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        Peer { child, stdin, stdout }
    }

    /// Sends one message.
    pub fn send<T: Serialize>(&mut self, msg: &T) {
        send(self.stdin.as_mut().expect("stdin is open"), msg).expect("the peer closed its stdin");
    }

    /// Reads lines until one starts with `prefix`; returns the rest of it.
    pub fn expect_line(&mut self, prefix: &str) -> String {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self.stdout.read_line(&mut line).expect("reading the peer's stdout");
            assert!(n > 0, "the peer exited before printing {prefix:?} (see its stderr above)");
            if let Some(rest) = line.trim_end().strip_prefix(prefix) {
                return rest.trim().to_string();
            }
        }
    }

    /// Closes the peer's stdin (helpers that serve until then exit).
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Kills the peer with SIGKILL and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Receives one message.
    pub fn recv<T: DeserializeOwned>(&mut self) -> T {
        recv(&mut self.stdout).expect("the peer closed its stdout (did it crash? see its stderr above)")
    }

    /// Waits for the peer to exit and returns whether it succeeded.
    pub fn wait_success(mut self) -> bool {
        self.child.wait().map(|s| s.success()).unwrap_or(false)
    }

    /// Waits for the peer to exit and returns its exit code (`None`: killed by a signal).
    pub fn wait_code(mut self) -> Option<i32> {
        self.child.wait().ok().and_then(|s| s.code())
    }

    /// Waits up to `limit` for the peer to exit and returns its exit code (`None`: killed
    /// by a signal). Panics, after killing it, if it is still running by then (a hang).
    pub fn wait_code_within(&mut self, limit: std::time::Duration) -> Option<i32> {
        let started = std::time::Instant::now();
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return status.code(),
                Ok(None) if started.elapsed() < limit => std::thread::sleep(std::time::Duration::from_millis(5)),
                Ok(None) => {
                    self.kill();
                    panic!("process {} still running after {limit:?}: it hangs", self.child.id());
                }
                Err(e) => panic!("waiting for process {}: {e}", self.child.id()),
            }
        }
    }

    /// Sends `signal` (a name `kill` understands: TERM, INT, KILL, ...) to the peer.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill").arg(format!("-{signal}")).arg(self.child.id().to_string()).status();
        assert!(status.is_ok_and(|s| s.success()), "kill -{signal} {} failed", self.child.id());
    }

    /// The peer's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Writes one frame, in the protocol's own format and codec (`wire::write_frame`).
pub fn send<T: Serialize>(w: &mut impl Write, msg: &T) -> std::io::Result<()> {
    let mut frame = Vec::new();
    shared_tensor::wire::write_frame(msg, &mut frame).map_err(std::io::Error::other)?;
    w.write_all(&frame)?;
    w.flush()
}

/// Reads one frame, in the protocol's own format and codec (`wire::read_frame`).
pub fn recv<T: DeserializeOwned>(r: &mut impl Read) -> std::io::Result<T> {
    let mut body = Vec::new();
    shared_tensor::wire::read_frame(r, &mut body)?;
    shared_tensor::wire::decode(&body).map_err(std::io::Error::other)
}

/// Messages of the two-process CUDA IPC proof (`tests/ipc_proof.rs` and `bin/ipc_peer.rs`).
pub mod ipc_proof {
    use super::*;
    use shared_tensor::ipc::TensorDescriptor;

    /// How the consumer checks the values it sees.
    #[derive(Debug, Serialize, Deserialize)]
    pub enum Expected {
        /// The exact bytes of `tensor.contiguous()`.
        Bytes(#[serde(with = "serde_bytes")] Vec<u8>),
        /// `arange(n, Int32)`: for tensors too large to send by value.
        ArangeI32(i64),
    }

    /// One tensor handed from A to B.
    #[derive(Debug, Serialize, Deserialize)]
    pub struct Item {
        /// A name for the report.
        pub name: String,
        /// The descriptor A exported.
        pub descriptor: TensorDescriptor,
        /// What B must see.
        pub expected: Expected,
    }

    /// A's request to B.
    #[derive(Debug, Serialize, Deserialize)]
    pub struct Request {
        /// Tensors to import and check.
        pub items: Vec<Item>,
        /// The item B fills with 42 in place after checking.
        pub mutate: String,
        /// The item B imports a second time.
        pub import_twice: String,
    }

    /// B's verdict on one check.
    #[derive(Debug, Serialize, Deserialize)]
    pub struct Check {
        /// What was checked.
        pub name: String,
        /// `None` if it held, else what went wrong.
        pub failure: Option<String>,
    }
}
