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

#[path = "endpoints.rs"]
mod endpoints;

mod in_process {
    //! Servers of this process (manual mode) stopped with `shutdown()`: what their queued
    //! and running calls see.
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    use shared_tensor::client::Client;
    use shared_tensor::config::Config;
    use shared_tensor::control::Control;
    use shared_tensor::server::{Server, ServerBuilder, ServerHandle};
    use shared_tensor::Error;

    use super::endpoints;
    use shared_tensor_tests::wait_until as until;

    /// The process's counters are shared: these tests run one at a time.
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

    /// This process is a client that serves in the background (no GPU needed).
    fn setup() {
        static DONE: std::sync::Once = std::sync::Once::new();
        DONE.call_once(|| {
            let config = Config::default().role(shared_tensor::config::Role::Client).device_index(0);
            shared_tensor::configure(config).unwrap();
        });
    }

    /// A server of one endpoint, device 0, on a free port.
    fn one_endpoint(endpoint: &'static shared_tensor::endpoint::EndpointDef) -> ServerBuilder {
        Server::builder().endpoints([endpoint]).device(0).port(0)
    }

    fn client(server: &ServerHandle) -> Client {
        let config = Config::default()
            .base_port(server.addr().port())
            .device_index(0)
            .connect_timeout(Duration::from_secs(5))
            .call_timeout(Duration::from_secs(60));
        Client::new(&config).unwrap()
    }

    /// Callers queued at a serialized endpoint when the stop begins are answered with
    /// the server gone; none of their bodies starts, and the stop does not wait for them.
    #[test]
    fn queued_callers_of_a_serialized_endpoint_get_the_stop_and_never_run() {
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        setup();
        let grace = Duration::from_millis(1500);
        let server = one_endpoint(endpoints::gated_serial::endpoint()).grace(grace).start().unwrap();
        let before = server.info().counters.requests;
        // The first caller holds the endpoint (its body waits for the test's gate).
        let first = {
            let c = client(&server);
            std::thread::spawn(move || c.call::<(), _>("gated_serial", (1i64,)))
        };
        until("the first body to start", || endpoints::runs("gated_serial", None).len() == 1);
        // Four more queue at the endpoint's gate.
        let queued: Vec<_> = (2..6i64)
            .map(|tag| {
                let c = client(&server);
                std::thread::spawn(move || c.call::<(), _>("gated_serial", (tag,)))
            })
            .collect();
        until("five calls inside the server", || server.info().counters.requests >= before + 5);

        let started = Instant::now();
        let stopped = server.shutdown();
        let took = started.elapsed();
        assert!(took < grace + Duration::from_secs(2), "shutdown took {took:?} (grace {grace:?})");
        assert_eq!(stopped.calls_left, 1, "only the running body outlives the grace period: {stopped:?}");
        assert_eq!(endpoints::runs("gated_serial", None).len(), 1, "no body started after shutdown began");
        for caller in queued {
            let err = caller.join().unwrap().unwrap_err();
            assert!(matches!(err, Error::ServerGone { .. }), "a queued caller gets the stop: {err:?}");
            assert!(err.to_string().contains("shutting down") || err.to_string().contains("gone"), "{err}");
        }
        // Let the running body end: still no other body starts.
        endpoints::SERIAL_GATE.open();
        let _ = first.join().unwrap();
        assert_eq!(endpoints::runs("gated_serial", None).len(), 1, "no queued body ran after the gate opened");
    }

    /// A running body sees its server stop through `task::is_cancelled()` and ends early:
    /// the stop is clean well within the grace period.
    #[test]
    fn a_running_body_sees_its_server_stop() {
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        setup();
        let grace = Duration::from_secs(8);
        let server = one_endpoint(endpoints::cooperative::endpoint()).grace(grace).start().unwrap();
        let before = server.info().counters.requests;
        let caller = {
            let c = client(&server);
            std::thread::spawn(move || c.call::<(), _>("cooperative", (77i64,)))
        };
        until("the body to run", || server.info().counters.requests > before);
        let started = Instant::now();
        let stopped = server.shutdown();
        let took = started.elapsed();
        assert!(stopped.is_clean(), "the body ended within the grace period: {stopped:?}");
        assert!(took < Duration::from_secs(4), "the body stopped early, not at the grace period's end: {took:?}");
        assert_eq!(endpoints::runs("cooperative", Some(77)).len(), 1, "the body saw is_cancelled() turn true");
        let _ = caller.join().unwrap();
    }

    /// A task a client submitted (no call of it in flight) and that runs when the stop
    /// begins: the stop waits for it, woken by its end, and is clean well within the grace
    /// period (a stop that missed the end would take the whole 8 s).
    #[test]
    fn a_running_submitted_task_is_waited_for_and_the_stop_is_clean() {
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        setup();
        let server = one_endpoint(endpoints::cooperative::endpoint()).grace(Duration::from_secs(8)).start().unwrap();
        let running = |s: &ServerHandle| s.info().tasks.get("running").copied().unwrap_or(0);
        let task = client(&server).submit::<(), _>("cooperative", (79i64,)).unwrap();
        until("the task to run", || running(&server) == 1);
        let started = Instant::now();
        let stopped = server.shutdown();
        let took = started.elapsed();
        assert!(stopped.is_clean(), "the task ended within the grace period: {stopped:?}");
        assert!(took < Duration::from_secs(4), "the stop did not see the task end: {took:?}");
        assert_eq!(endpoints::runs("cooperative", Some(79)).len(), 1, "the task saw its server stop");
        drop(task);
    }

    /// During a stop the client keeps sending: a request sent while a call still runs is
    /// answered `ServerGone` (not a broken pipe, not a hang), the running call ends as a
    /// stop ends it (`ServerGone`, its connection's clean-up having run), and the stop is
    /// clean once the body returns.
    #[test]
    fn requests_sent_during_the_stop_are_refused_and_the_stop_is_clean() {
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        setup();
        let server = one_endpoint(endpoints::sleepy::endpoint()).grace(Duration::from_secs(8)).start().unwrap();
        let before = server.info().counters.requests;
        let c = client(&server);
        let running = {
            let c = c.clone();
            std::thread::spawn(move || c.call::<(), _>("sleepy", (1500u64,)))
        };
        until("the body to run", || server.info().counters.requests > before);
        let stopper = {
            let server = server.clone();
            std::thread::spawn(move || server.shutdown())
        };
        until("the stop to begin", || server.is_stopping());
        let started = Instant::now();
        match c.ping() {
            Err(Error::ServerGone { .. }) => {}
            other => panic!("a request during the stop: {other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(5), "the refusal took {:?}", started.elapsed());
        match running.join().unwrap() {
            Ok(()) | Err(Error::ServerGone { .. }) => {}
            other => panic!("the running call: {other:?}"),
        }
        assert!(stopper.join().unwrap().is_clean());
    }

    /// A server's stop touches only its own clients' work: another server of the same
    /// process keeps running its body, and the stop does not wait for it.
    #[test]
    fn a_stop_leaves_other_servers_work_alone() {
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        setup();
        let builder = || one_endpoint(endpoints::cooperative::endpoint());
        let other = builder().grace(Duration::from_secs(8)).start().unwrap();
        let stopping = builder().grace(Duration::from_secs(3)).start().unwrap();
        let running = |s: &ServerHandle| s.info().tasks.get("running").copied().unwrap_or(0);
        let caller = {
            let c = client(&other);
            std::thread::spawn(move || c.call::<(), _>("cooperative", (78i64,)))
        };
        until("the other server's body to run", || running(&other) == 1);
        let started = Instant::now();
        let stopped = stopping.shutdown();
        assert!(stopped.is_clean(), "nothing of its own was running: {stopped:?}");
        assert!(started.elapsed() < Duration::from_secs(2), "it did not wait for the other server's body");
        assert!(endpoints::runs("cooperative", Some(78)).is_empty(), "the other server's body still runs");
        let stopped = other.shutdown();
        assert!(stopped.is_clean(), "{stopped:?}");
        assert_eq!(endpoints::runs("cooperative", Some(78)).len(), 1, "it saw its own server stop");
        let _ = caller.join().unwrap();
    }

    /// Two servers of one process share the process's managed objects; closing a
    /// connection of one releases only that connection's references.
    #[test]
    fn closing_one_servers_connection_leaves_the_other_servers_objects() {
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        setup();
        let builder = || one_endpoint(endpoints::make_uncached_object::endpoint());
        let (a, b) = (builder().start().unwrap(), builder().start().unwrap());
        let (client_a, client_b) = (client(&a), client(&b));
        let make = |c: &Client, n: i64| {
            let handle: shared_tensor::Managed<()> = c.call("make_uncached_object", (n,)).unwrap();
            handle.detach().1 // the reference stays with the connection
        };
        let (of_a, of_b) = (make(&client_a, 1), make(&client_b, 2));
        assert_eq!(client_b.object_info(of_b).unwrap().map(|i| i.refcount), Some(1));
        drop(client_a); // closes a's connection: its references go
        until("a's object to go with its connection", || client_b.object_info(of_a).unwrap().is_none());
        let info = client_b.object_info(of_b).unwrap();
        assert_eq!(info.map(|i| i.refcount), Some(1), "b's object stays with b's connection");
        assert_eq!(client_b.release_many(&[of_b]).unwrap(), vec![true]);
        assert!(a.shutdown().is_clean() && b.shutdown().is_clean());
    }

    /// A managed call that ends during the grace period, after its connection's clean-up,
    /// gives its reference back: no object is left behind for the process's life.
    #[test]
    fn a_late_managed_result_after_the_connection_clean_up_is_released() {
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        setup();
        let grace = Duration::from_secs(10);
        let server = one_endpoint(endpoints::late_object::endpoint()).grace(grace).start().unwrap();
        let objects_before = server.info().managed_objects;
        let caller = {
            let c = client(&server);
            std::thread::spawn(move || c.call::<shared_tensor::Managed<()>, _>("late_object", (9i64,)).map(|_| ()))
        };
        let running = |s: &ServerHandle| s.info().tasks.get("running").copied().unwrap_or(0);
        until("the body to run", || running(&server) == 1);
        let stopper = {
            let s = server.clone();
            std::thread::spawn(move || s.shutdown())
        };
        // The body saw the stop; the connection's clean-up has run (its link is gone).
        until("the body to see the stop", || endpoints::runs("late_object", Some(9)).len() == 1);
        until("the connection's clean-up", || server.info().connections == 0);
        endpoints::LATE_GATE.open(); // the managed result comes now, late
        let stopped = stopper.join().unwrap();
        assert!(stopped.is_clean(), "{stopped:?}");
        let err = caller.join().unwrap().unwrap_err();
        assert!(matches!(err, Error::ServerGone { .. }), "{err:?}");
        assert_eq!(server.info().managed_objects, objects_before, "the late reference was released");
    }
}
