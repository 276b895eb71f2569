//! Stop signals in a serving process that opted in (`catch_stop_signals` at the start,
//! `serve_until_signal` at the end): SIGTERM during the program's own work lets that work
//! finish and the process exit 0 once it reaches `serve_until_signal`; a second signal
//! ends the process the ordinary way (the library never exits the process itself). No GPU
//! needed (manual mode in the local role).

use shared_tensor_tests::{free_port, helper_bin, Peer};

fn busy_server(busy_ms: u64) -> Peer {
    let exe = helper_bin("endpoint_server", env!("CARGO_BIN_EXE_endpoint_server"));
    let (port, busy) = (free_port().to_string(), busy_ms.to_string());
    let mut peer = Peer::spawn(
        &exe,
        &[
            ("ST_TEST_SERVER", "busy"),
            ("ST_TEST_BUSY_MS", &busy),
            ("SHARED_TENSOR_BASE_PORT", &port),
            ("SHARED_TENSOR_DEVICE", "0"),
        ],
    );
    assert_eq!(peer.expect_line("READY"), port);
    peer
}

#[test]
fn sigterm_during_the_programs_own_work_lets_it_finish_and_exit_zero() {
    let mut server = busy_server(1500);
    server.signal("TERM");
    // The work sees the request (and may end early; this one runs on)...
    server.expect_line("STOP REQUESTED");
    server.expect_line("WORK DONE");
    server.expect_line("STOPPED");
    assert_eq!(server.wait_code(), Some(0));
}

/// The signal comes once the work is done: while `serve_until_signal` waits, or just
/// before it is reached (which of the two is the scheduler's choice; the library's unit
/// test `a_stop_wakes_a_waiter_already_waiting_and_one_that_comes_later` covers both).
#[test]
fn sigterm_after_the_work_stops_serving_and_exits_zero() {
    let mut server = busy_server(0);
    server.expect_line("WORK DONE");
    server.signal("TERM");
    server.expect_line("STOPPED");
    assert_eq!(server.wait_code(), Some(0));
}

#[test]
fn a_second_signal_ends_the_process_by_that_signal() {
    let started = std::time::Instant::now();
    let mut server = busy_server(60_000);
    server.signal("TERM");
    // Once the first signal is seen, the default actions are back.
    server.expect_line("STOP REQUESTED");
    server.signal("INT");
    assert_eq!(server.wait_code(), None, "after SIGTERM then SIGINT the process is ended by SIGINT");
    assert!(started.elapsed().as_secs() < 30, "the second signal did not end the 60 s of work");
}
