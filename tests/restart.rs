//! Server death and restart, seen from a client: calls in flight fail within a second
//! with "server gone", later calls fail fast, a restarted server is reconnected to, and
//! handles from the old server report that they are stale. No GPU needed.

#[path = "endpoints.rs"]
mod endpoints;

use std::time::{Duration, Instant};

use shared_tensor::config::{Config, Role};
use shared_tensor::Error;
use shared_tensor_tests::{free_port, helper_bin, Peer};

fn start_server(port: u16) -> Peer {
    let exe = helper_bin("endpoint_server", env!("CARGO_BIN_EXE_endpoint_server"));
    let port_s = port.to_string();
    let mut peer = Peer::spawn(
        &exe,
        &[("ST_TEST_SERVER", "manual"), ("SHARED_TENSOR_BASE_PORT", &port_s), ("SHARED_TENSOR_DEVICE", "0")],
    );
    assert_eq!(peer.expect_line("READY"), port_s);
    peer
}

#[test]
fn server_death_is_reported_and_a_restarted_server_is_reconnected_to() {
    let port = free_port();
    shared_tensor::configure(
        Config::default().role(Role::Client).base_port(port).device_index(0).connect_timeout(Duration::from_secs(10)),
    )
    .unwrap();
    let mut server = start_server(port);
    endpoints::noop().unwrap();
    let handle = endpoints::make_object(5).unwrap();
    assert!(handle.is_live());
    let first_server = handle.server_id();

    let in_flight = std::thread::spawn(|| {
        let started = Instant::now();
        (endpoints::announced_sleep(10_000), started)
    });
    server.expect_line("SLEEPING"); // the call runs on the server now
    let killed_at = Instant::now();
    server.kill();
    let (result, _) = in_flight.join().unwrap();
    let failed_after = killed_at.elapsed();
    match result {
        Err(Error::ServerGone { reason, .. }) => assert!(!reason.is_empty()),
        other => panic!("a call in flight when the server died returned {other:?}"),
    }
    assert!(failed_after < Duration::from_secs(1), "the pending call failed after {failed_after:?}");

    let started = Instant::now();
    let later = endpoints::noop();
    assert!(matches!(later, Err(Error::ServerUnreachable { .. } | Error::ServerGone { .. })), "{later:?}");
    assert!(started.elapsed() < Duration::from_secs(1), "a later call took {:?} to fail", started.elapsed());
    assert!(!handle.is_live());
    // An explicit wait says what its docs say: nothing accepts connections there.
    let waited = shared_tensor::wait_for_server(Duration::from_millis(200));
    assert!(matches!(waited, Err(Error::ServerUnreachable { .. })), "{waited:?}");

    let _restarted = start_server(port);
    endpoints::noop().unwrap();
    match handle.ensure_live() {
        Err(Error::ObjectGone { reason, .. }) => assert!(reason.contains("restarted"), "{reason}"),
        other => panic!("a handle from the old server is {other:?}"),
    }
    assert_ne!(shared_tensor::server_info().unwrap().server_id, first_server);
}
