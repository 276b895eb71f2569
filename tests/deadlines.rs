//! Deadlines travel: a call's deadline (the client's call timeout) goes to the server,
//! which cancels the call if it is still pending then, and lets a running body see it
//! (`shared_tensor::task::is_cancelled()`). Over a real loopback server (this process is
//! a client of a server it runs in the background); no GPU needed.

#[path = "endpoints.rs"]
mod endpoints;

use std::time::{Duration, Instant};

use shared_tensor::client::Client;
use shared_tensor::config::Config;
use shared_tensor::Error;
use shared_tensor_tests::{loopback_config, serve_here, wait_until as until};

fn config(port: u16) -> Config {
    loopback_config(port)
}

fn setup() -> u16 {
    serve_here(|c| c.call_timeout(Duration::from_secs(60)))
}

/// A client that waits 300 ms for each call.
fn impatient() -> Client {
    Client::new(&config(setup()).call_timeout(Duration::from_millis(300))).unwrap()
}

#[test]
fn a_pending_call_past_its_deadline_is_cancelled_on_the_server() {
    setup();
    let before = shared_tensor::server_info().unwrap().counters.deadline_cancellations;
    let first = std::thread::spawn(|| endpoints::gated_serial(1));
    until("the first call to hold the endpoint", || endpoints::runs("gated_serial", Some(1)).len() == 1);
    // The second waits for the serialized endpoint; its caller gives up after 300 ms.
    let err = impatient().call::<(), _>("gated_serial", (2i64,)).unwrap_err();
    // The caller sees its own timeout, or (if the server's answer wins the race) the
    // server's cancellation.
    assert!(matches!(err, Error::Timeout { .. } | Error::DeadlinePassed { .. }), "{err:?}");
    // The server cancels it while it is still pending, before the endpoint frees up.
    until("the server to cancel the pending call", || {
        shared_tensor::server_info().unwrap().counters.deadline_cancellations > before
    });
    endpoints::SERIAL_GATE.open();
    first.join().unwrap().unwrap();
    // Once the endpoint is free, a later call runs at once: the cancelled one never ran.
    endpoints::gated_serial(3).unwrap();
    assert_eq!(endpoints::runs("gated_serial", Some(2)).len(), 0, "the cancelled call never ran");
    assert_eq!(endpoints::runs("gated_serial", Some(3)).len(), 1);
}

#[test]
fn a_running_body_sees_its_callers_deadline_and_stops_early() {
    setup();
    let started = Instant::now();
    let err = impatient().call::<(), _>("cooperative", (7i64,)).unwrap_err();
    // The client's timeout and the server's deadline are the same 300 ms: the caller sees
    // its own timeout, or (if the reply wins the race) the body's early stop.
    let stopped = matches!(&err, Error::Endpoint { message, .. } if message.starts_with("stopped early"));
    assert!(matches!(err, Error::Timeout { .. }) || stopped, "{err:?}");
    until("the body to stop", || !endpoints::runs("cooperative", None).is_empty());
    let took = started.elapsed();
    assert_eq!(endpoints::runs("cooperative", Some(7)).len(), 1, "the body saw is_cancelled()");
    assert!(endpoints::runs("cooperative", Some(-7)).is_empty());
    assert!(took < Duration::from_secs(10), "stopped {took:?} after the call, not at the 20 s limit");
    // Outside an endpoint body nothing is cancelled.
    assert!(!shared_tensor::task::is_cancelled());
}

#[test]
fn a_call_timeout_of_duration_max_means_no_limit_and_does_not_panic() {
    let client = Client::new(&config(setup()).call_timeout(Duration::MAX)).unwrap();
    client.call::<(), _>("default_key", (900i64,)).unwrap();
    assert_eq!(endpoints::runs("default_key", Some(900)).len(), 1);
}
