//! Connecting with no server: the default gives up after about 2 s with the clear
//! "no shared-tensor server" error (not a silent minute); a longer wait is explicit.

use std::time::{Duration, Instant};

use shared_tensor::client::Client;
use shared_tensor::config::{Config, DEFAULT_CONNECT_TIMEOUT};
use shared_tensor::Error;
use shared_tensor_tests::free_port;

#[test]
fn no_server_fails_after_the_short_default() {
    let client = Client::new(&Config::default().base_port(free_port()).device_index(0)).unwrap();
    let started = Instant::now();
    let err = client.connect().unwrap_err();
    let took = started.elapsed();
    let Error::ServerUnreachable { waited_ms, .. } = &err else { panic!("expected ServerUnreachable, got {err:?}") };
    assert!(*waited_ms >= DEFAULT_CONNECT_TIMEOUT.as_millis() as u64, "gave up early: {err}");
    assert!(took < Duration::from_secs(10), "connecting with no server took {took:?}");
    assert!(err.to_string().contains("start one with SHARED_TENSOR_ROLE=server"), "{err}");
}

#[test]
fn wait_for_server_takes_its_own_timeout() {
    let client = Client::new(&Config::default().base_port(free_port()).device_index(0)).unwrap();
    let started = Instant::now();
    let err = client.wait_for_server(Duration::from_millis(300)).unwrap_err();
    let took = started.elapsed();
    assert!(matches!(err, Error::ServerUnreachable { waited_ms, .. } if waited_ms >= 300), "{err:?}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
}
