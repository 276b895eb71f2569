//! Stop-under-load cycles shared by `shutdown` (CPU, local role) and `gpu_shutdown`
//! (server role on a GPU): start a server, let 4 client processes call it in a loop, stop
//! it (SIGTERM, or `ServerHandle::shutdown` in manual mode), and check that the server
//! exits 0 and every client's calls end with the "server is gone" error.

use std::time::{Duration, Instant};

use shared_tensor_tests::{free_port, helper_bin, Peer};

/// How a cycle's server is stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// SIGTERM to the server process.
    Sigterm,
    /// Its stdin closes: `ServerHandle::shutdown()` (manual mode only).
    Shutdown,
}

/// What the cycles saw.
#[derive(Debug, Default)]
pub struct Tally {
    pub cycles: usize,
    /// Clients whose last call failed with `ServerGone` (the call was in flight).
    pub gone: usize,
    /// Clients whose next call found no server: it had gone between two of their calls
    /// and the error did not say so (the client reports that as `ServerGone` too).
    pub unreachable: usize,
    pub calls: u64,
    pub slowest_stop: Duration,
}

/// One cycle: the server (role `server` with a GPU, manual mode in the local role
/// without), 4 clients, a stop. Panics on any crash, non-zero exit or hang.
pub fn cycle(gpu: bool, stop: Stop, tally: &mut Tally) {
    let server_exe = helper_bin("endpoint_server", env!("CARGO_BIN_EXE_endpoint_server"));
    let client_exe = helper_bin("load_client", env!("CARGO_BIN_EXE_load_client"));
    let port = free_port().to_string();
    // The role path with a GPU under SIGTERM; manual mode (local role) otherwise.
    let role = if gpu && stop == Stop::Sigterm { "server" } else { "local" };
    let stop_by = if stop == Stop::Shutdown { "stdin" } else { "signal" };
    let mut server = Peer::spawn(
        &server_exe,
        &[
            ("ST_TEST_SERVER", "stoppable"),
            ("ST_TEST_STOP", stop_by),
            ("SHARED_TENSOR_ROLE", role),
            ("SHARED_TENSOR_BASE_PORT", &port),
            ("SHARED_TENSOR_DEVICE", "0"),
        ],
    );
    assert_eq!(server.expect_line("READY"), port);
    let gpu_flag = if gpu { "1" } else { "0" };
    let mut clients: Vec<Peer> = (0..4)
        .map(|_| {
            let envs =
                [("SHARED_TENSOR_BASE_PORT", port.as_str()), ("SHARED_TENSOR_DEVICE", "0"), ("ST_TEST_GPU", gpu_flag)];
            Peer::spawn(&client_exe, &envs)
        })
        .collect();
    for client in &mut clients {
        client.expect_line("CALLING");
    }
    let stopping = Instant::now();
    match stop {
        Stop::Sigterm => server.signal("TERM"),
        Stop::Shutdown => server.close_stdin(),
    }
    let stopped = server.expect_line("STOPPED");
    let code = server.wait_code_within(Duration::from_secs(30));
    tally.slowest_stop = tally.slowest_stop.max(stopping.elapsed());
    assert_eq!(code, Some(0), "cycle {}: the server did not exit 0 after {stop:?} (STOPPED {stopped})", tally.cycles);
    assert_ne!(stopped, "false", "cycle {}: calls still ran after the grace period", tally.cycles);
    for (i, mut client) in clients.into_iter().enumerate() {
        let ended = client.expect_line("ENDED");
        let code = client.wait_code_within(Duration::from_secs(30));
        assert_eq!(code, Some(0), "cycle {} client {i}: {ended}", tally.cycles);
        let mut words = ended.splitn(3, ' ');
        match words.next() {
            Some("gone") => tally.gone += 1,
            Some("unreachable") => tally.unreachable += 1,
            other => panic!("cycle {} client {i}: unexpected end {other:?}: {ended}", tally.cycles),
        }
        tally.calls += words.next().and_then(|c| c.parse::<u64>().ok()).unwrap_or(0);
    }
    tally.cycles += 1;
}

/// `n` cycles with the same stop; prints what they saw and checks that each of the 4
/// clients of every cycle ended with the server gone.
pub fn run(gpu: bool, stop: Stop, n: usize) -> Tally {
    let started = Instant::now();
    let mut tally = Tally::default();
    for _ in 0..n {
        cycle(gpu, stop, &mut tally);
    }
    println!(
        "{} {stop:?} cycles under load in {:?} ({}): every server exited 0; clients ended with ServerGone {} \
         times, found the server gone between two calls {} times; {} calls made; slowest stop {:?}",
        tally.cycles,
        started.elapsed(),
        if gpu && stop == Stop::Sigterm { "server role" } else { "manual mode" },
        tally.gone,
        tally.unreachable,
        tally.calls,
        tally.slowest_stop
    );
    assert_eq!(tally.gone, 4 * n, "every client's calls end with the \"server is gone\" error");
    tally
}
