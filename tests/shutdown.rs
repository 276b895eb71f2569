//! A server stopped while 4 client processes call it in a loop exits 0, and every client's
//! calls end with the "server is gone" error; none hangs. No GPU needed: manual mode in
//! the local role (`gpu_shutdown` runs the same cycles in the server role on a GPU).

#[path = "shutdown_cycles.rs"]
mod shutdown_cycles;

use shutdown_cycles::{run, Stop};

#[test]
fn sigterm_under_load_exits_zero_and_every_client_sees_the_server_gone() {
    run(false, Stop::Sigterm, 5);
}

#[test]
fn shutdown_under_load_exits_zero_and_every_client_sees_the_server_gone() {
    run(false, Stop::Shutdown, 5);
}

/// `serve_until_signal` (sync and async) from inside an application's tokio runtime, of
/// either flavour: no panic, and SIGTERM still stops the server with exit code 0.
#[test]
fn serve_until_signal_works_inside_a_tokio_runtime() {
    use shared_tensor_tests::{free_port, helper_bin, Peer};
    let exe = helper_bin("endpoint_server", env!("CARGO_BIN_EXE_endpoint_server"));
    for runtime in ["current_thread", "multi_thread"] {
        for stop in ["signal", "async"] {
            let port = free_port().to_string();
            let mut server = Peer::spawn(
                &exe,
                &[
                    ("ST_TEST_SERVER", "stoppable"),
                    ("ST_TEST_STOP", stop),
                    ("ST_TEST_RUNTIME", runtime),
                    ("SHARED_TENSOR_ROLE", "local"),
                    ("SHARED_TENSOR_BASE_PORT", &port),
                    ("SHARED_TENSOR_DEVICE", "0"),
                ],
            );
            assert_eq!(server.expect_line("READY"), port);
            server.signal("TERM");
            assert_eq!(server.expect_line("STOPPED"), "true", "{runtime} runtime, {stop}");
            let code = server.wait_code_within(std::time::Duration::from_secs(30));
            assert_eq!(code, Some(0), "{runtime} runtime, {stop}: exit code");
        }
    }
}
