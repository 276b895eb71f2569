//! The server process shared by the GPU tests of one test binary: `endpoint_server` in
//! the server role, with this process as its client.
#![allow(dead_code)]

use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use shared_tensor::config::{Config, Role};
use shared_tensor::server::ServerInfo;
use shared_tensor_tests::{free_port, helper_bin, require_gpu, Peer};
use tch::Device;

static SERVER: OnceLock<(Mutex<Peer>, u16)> = OnceLock::new();

/// Starts the server process once and makes this process its client; device 0.
pub fn setup() -> Device {
    require_gpu();
    SERVER.get_or_init(|| {
        let port = free_port();
        let exe = helper_bin("endpoint_server", env!("CARGO_BIN_EXE_endpoint_server"));
        let port_s = port.to_string();
        let mut peer = Peer::spawn(
            &exe,
            &[("ST_TEST_SERVER", "role"), ("SHARED_TENSOR_ROLE", "server"), ("SHARED_TENSOR_BASE_PORT", &port_s)],
        );
        assert_eq!(peer.expect_line("READY"), port_s, "the server serves base port + device 0");
        shared_tensor::configure(Config::default().role(Role::Client).base_port(port)).unwrap();
        (Mutex::new(peer), port)
    });
    Device::Cuda(0)
}

/// Polls the server until `done` holds or `within` passes; returns the last info.
pub fn server_until(within: Duration, done: impl Fn(&ServerInfo) -> bool) -> (ServerInfo, Duration) {
    let start = Instant::now();
    loop {
        let info = shared_tensor::server_info().unwrap();
        if done(&info) || start.elapsed() > within {
            return (info, start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn idle(info: &ServerInfo) -> bool {
    info.live_leases == 0 && info.imported_storages == 0
}

/// The server's port.
pub fn server_port() -> u16 {
    SERVER.get().expect("setup() first").1
}
