//! The control plane end to end over a real loopback socket, without a GPU.
//!
//! This process is a client (the `#[share]` stubs become requests) and also runs a server
//! for the same endpoints in the background, so the tests can read what the bodies did
//! (`endpoints::LOG`). Results are `()`: payloads that carry no GPU memory.

#[path = "endpoints.rs"]
mod endpoints;

use std::sync::{Arc, Barrier, OnceLock};
use std::thread;
use std::time::Duration;

use endpoints::*;
use shared_tensor::client::Client;
use shared_tensor::config::{Config, Role};
use shared_tensor::task::TaskStatus;
use shared_tensor::{Error, Managed};
use tch::Tensor;

static PORT: OnceLock<u16> = OnceLock::new();

/// Spinning on, whatever the host's default: every test here runs with the server's call
/// threads and the clients' readers looking for their next call or reply before sleeping.
const SPIN: Duration = Duration::from_micros(200);

fn config(port: u16) -> Config {
    Config::default().base_port(port).device_index(0).connect_timeout(Duration::from_secs(5)).spin(SPIN)
}

/// Configures this process as a client of a server it runs itself, once.
fn setup() -> u16 {
    *PORT.get_or_init(|| {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        shared_tensor::configure(config(port).role(Role::Client).call_timeout(Duration::from_secs(30))).unwrap();
        let addr = shared_tensor::serve_in_background(None).unwrap();
        assert_eq!(addr.port(), port);
        assert!(addr.ip().is_loopback(), "the server binds loopback only");
        port
    })
}

/// A second client with its own connection and settings.
fn client_with(f: impl FnOnce(Config) -> Config) -> Client {
    Client::new(&f(config(setup()))).unwrap()
}

fn overlaps(runs: &[Run]) -> bool {
    runs.iter().any(|a| runs.iter().any(|b| !std::ptr::eq(a, b) && a.start < b.end && b.start < a.end))
}

#[test]
fn handshake_dispatch_and_introspection() {
    setup();
    noop().unwrap();
    let rtt = shared_tensor::ping().unwrap();
    assert!(rtt < Duration::from_secs(1), "ping took {rtt:?}");
    let info = shared_tensor::server_info().unwrap();
    assert_eq!(info.pid, std::process::id());
    assert!(info.address.starts_with("127.0.0.1:"));
    let names: Vec<String> = shared_tensor::list_endpoints().unwrap().into_iter().map(|e| e.name).collect();
    for expected in ["identity", "noop", "sleepy", "make_object", "keyed", "slow_task"] {
        assert!(names.contains(&expected.to_string()), "{expected} missing from {names:?}");
    }
    let keyed_info = info.endpoints.iter().find(|e| e.name == "keyed").unwrap();
    assert_eq!(keyed_info.cache_key.as_deref(), Some("k:<n>"));
    assert_eq!(keyed_info.params, vec!["n".to_string()]);
    assert!(info.counters.requests >= 1);
}

#[test]
fn many_threads_call_at_once_over_one_connection() {
    setup();
    let before = shared_tensor::server_info().unwrap().counters.requests;
    let threads: Vec<_> = (0..32)
        .map(|_| {
            thread::spawn(|| {
                for _ in 0..25 {
                    noop().unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let after = shared_tensor::server_info().unwrap().counters.requests;
    assert!(after - before >= 800, "{} requests counted", after - before);
}

#[test]
fn spinning_and_sleeping_callers_get_every_reply_quick_or_slow() {
    use shared_tensor::control::Control;
    setup();
    // A reply within the spin window, one long past it, from one caller and from four
    // threads sharing a connection (one reads and spins, the others are handed replies),
    // with a client that spins and one that never does.
    for spin in [SPIN, Duration::ZERO] {
        let client = client_with(|c| c.spin(spin));
        for _ in 0..200 {
            client.call::<(), _>("noop", ()).unwrap();
        }
        let start = std::time::Instant::now();
        client.call::<(), _>("sleepy", (20u64,)).unwrap();
        assert!(start.elapsed() >= Duration::from_millis(20), "the reply came before the body ended");
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let client = client.clone();
                thread::spawn(move || {
                    for i in 0..50 {
                        if (i + t) % 10 == 0 {
                            client.call::<(), _>("sleepy", (2u64,)).unwrap();
                        } else {
                            client.call::<(), _>("noop", ()).unwrap();
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(client.ping().unwrap() < Duration::from_secs(1));
    }
}

#[test]
fn endpoint_errors_and_panics_reach_the_caller_and_the_server_keeps_serving() {
    setup();
    match fails("disk on fire".into()) {
        Err(Error::Endpoint { endpoint, message }) => {
            assert_eq!((endpoint.as_str(), message.as_str()), ("fails", "disk on fire"))
        }
        other => panic!("{other:?}"),
    }
    match panics("kaboom".into()) {
        Err(Error::EndpointPanicked { endpoint, message }) => {
            assert_eq!((endpoint.as_str(), message.as_str()), ("panics", "kaboom"))
        }
        other => panic!("{other:?}"),
    }
    noop().unwrap();
}

#[test]
fn bad_calls_by_name_are_refused_with_the_reason() {
    let client = client_with(|c| c);
    match client.call::<(), _>("no_such_endpoint", ()) {
        Err(Error::UnknownEndpoint { name, available }) => {
            assert_eq!(name, "no_such_endpoint");
            assert!(available.contains("noop"), "{available}");
        }
        other => panic!("{other:?}"),
    }
    match client.call::<(), _>("sleepy", (1u64, 2u64)) {
        Err(Error::BadArguments { endpoint, reason }) => {
            assert_eq!(endpoint, "sleepy");
            assert!(reason.contains("expected 1 argument(s) (ms), got 2"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    match client.call::<(), _>("sleepy", ("ten".to_string(),)) {
        Err(Error::BadArguments { reason, .. }) => assert!(reason.starts_with("ms:"), "{reason}"),
        other => panic!("{other:?}"),
    }
    // A managed endpoint asked for a plain value, and the reverse.
    assert!(matches!(client.call::<(), _>("make_uncached_object", (1i64,)), Err(Error::BadArguments { .. })));
    assert!(matches!(client.call::<Managed<()>, _>("noop", ()), Err(Error::BadArguments { .. })));
    client.call::<(), _>("noop", ()).unwrap();
}

#[test]
fn a_cpu_tensor_argument_is_refused_before_sending() {
    setup();
    let cpu = Tensor::ones([4], (tch::Kind::Float, tch::Device::Cpu));
    match takes_tensor(cpu.shallow_clone()) {
        Err(Error::NotCuda { path, device }) => {
            assert_eq!((path.as_str(), device.as_str()), ("tensor", "Cpu"))
        }
        other => panic!("{other:?}"),
    }
    // Nothing listens on this port: had the client tried to send, it would say so.
    let nowhere = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let client = Client::new(&config(nowhere).connect_timeout(Duration::ZERO)).unwrap();
    assert!(matches!(client.call::<(), _>("takes_tensor", (cpu,)), Err(Error::NotCuda { .. })));
    assert!(matches!(client.call::<(), _>("noop", ()), Err(Error::ServerUnreachable { .. })));
}

#[test]
fn parallel_executions_overlap_and_serialized_ones_never_do() {
    setup();
    let calls = |f: fn(i64) -> shared_tensor::Result<()>| {
        let barrier = Arc::new(Barrier::new(6));
        let threads: Vec<_> = (0..6)
            .map(|i| {
                let b = barrier.clone();
                thread::spawn(move || {
                    b.wait();
                    f(i).unwrap()
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
    };
    calls(parallel_work);
    calls(serialized_work);
    let parallel = runs("parallel_work", None);
    let serialized = runs("serialized_work", None);
    assert_eq!((parallel.len(), serialized.len()), (6, 6));
    assert!(overlaps(&parallel), "parallel executions should overlap");
    assert!(!overlaps(&serialized), "serialized executions overlapped: {serialized:?}");
}

fn concurrently(n: usize, f: impl Fn() + Send + Sync + 'static) {
    let f = Arc::new(f);
    let barrier = Arc::new(Barrier::new(n));
    let threads: Vec<_> = (0..n)
        .map(|_| {
            let (f, b) = (f.clone(), barrier.clone());
            thread::spawn(move || {
                b.wait();
                f()
            })
        })
        .collect();
    threads.into_iter().for_each(|t| t.join().unwrap());
}

#[test]
fn singleflight_runs_identical_concurrent_calls_once() {
    setup();
    concurrently(32, || singleflight_on(7).unwrap());
    assert_eq!(runs("singleflight_on", Some(7)).len(), 1);
    concurrently(32, || singleflight_off(7).unwrap());
    assert_eq!(runs("singleflight_off", Some(7)).len(), 32);
    let info = shared_tensor::server_info().unwrap();
    assert!(info.counters.singleflight_joins >= 31, "{:?}", info.counters);
}

#[test]
fn cache_keys_come_from_arguments_and_invalidation_stops_reuse() {
    setup();
    for n in [1, 1, 2, 1, 2] {
        keyed(n).unwrap();
    }
    assert_eq!((runs("keyed", Some(1)).len(), runs("keyed", Some(2)).len()), (1, 1));
    // The default key is the endpoint plus every argument: each value has its own entry.
    default_key(10).unwrap();
    default_key(11).unwrap();
    default_key(10).unwrap();
    assert_eq!((runs("default_key", Some(10)).len(), runs("default_key", Some(11)).len()), (1, 1));

    assert!(keyed::invalidate(1).unwrap());
    assert!(!keyed::invalidate(1).unwrap(), "already gone");
    keyed(1).unwrap();
    keyed(2).unwrap();
    assert_eq!((runs("keyed", Some(1)).len(), runs("keyed", Some(2)).len()), (2, 1));
    assert_eq!(shared_tensor::invalidate_endpoint_cache("keyed").unwrap(), 2);
    keyed(2).unwrap();
    assert_eq!(runs("keyed", Some(2)).len(), 2);
}

#[test]
fn managed_objects_count_references_and_die_at_zero() {
    setup();
    let a: Managed<()> = make_object(1).unwrap();
    let b = make_object(1).unwrap(); // cache hit: same object, one more reference
    assert_eq!(a.object_id(), b.object_id());
    assert_eq!(runs("make_object", Some(1)).len(), 1);
    let info = a.info().unwrap();
    assert_eq!((info.refcount, info.endpoint.as_str(), info.cache_key.as_deref()), (2, "make_object", Some("m:1")));
    assert!(a.release());
    assert!(!a.release(), "a second release does nothing");
    assert!(!a.is_live(), "a released handle is not live");
    assert_eq!(b.info().unwrap().refcount, 1);
    let id = b.object_id();
    drop(b); // the last reference: the object and its cache entry go
    assert_eq!(shared_tensor::object_info(id).unwrap(), None);
    let c = make_object(1).unwrap();
    assert_ne!(c.object_id(), id, "a destroyed object is rebuilt, not revived");
    assert_eq!(runs("make_object", Some(1)).len(), 2);

    // Releasing an unknown id is a no-op that says so.
    assert_eq!(shared_tensor::release_many(&[u64::MAX]).unwrap(), vec![false]);

    // detach keeps the reference past the handle; release_many gives it back.
    let (_, kept) = make_object(1).unwrap().detach();
    assert_eq!(shared_tensor::object_info(kept).unwrap().unwrap().refcount, 2);
    assert_eq!(shared_tensor::release_many(&[kept]).unwrap(), vec![true]);
    assert_eq!(c.info().unwrap().refcount, 1);
}

#[test]
fn singleflight_joiners_each_get_their_own_reference() {
    setup();
    let handles = Arc::new(std::sync::Mutex::new(Vec::new()));
    let h = handles.clone();
    concurrently(8, move || h.lock().unwrap().push(make_object(2).unwrap()));
    let handles = std::mem::take(&mut *handles.lock().unwrap());
    assert_eq!(runs("make_object", Some(2)).len(), 1);
    let id = handles[0].object_id();
    assert!(handles.iter().all(|h| h.object_id() == id));
    assert_eq!(shared_tensor::object_info(id).unwrap().unwrap().refcount, 8);
    drop(handles);
    assert_eq!(shared_tensor::object_info(id).unwrap(), None, "eight releases destroy it");
}

#[test]
fn invalidation_never_revokes_issued_handles() {
    setup();
    let a = make_object(3).unwrap();
    // Its own key only: the endpoint-wide invalidation would race the other tests of
    // this binary that use make_object's cache at the same time.
    assert!(make_object::invalidate(3).unwrap());
    assert!(a.is_live(), "invalidation stops reuse only");
    let b = make_object(3).unwrap();
    assert_ne!(a.object_id(), b.object_id(), "after invalidation the next call builds anew");
}

#[test]
fn tasks_run_in_the_background_report_status_and_push_completion() {
    setup();
    let task = slow_task::submit(300).unwrap();
    let early = task.status().unwrap();
    assert!(matches!(early.status, TaskStatus::Pending | TaskStatus::Running), "{early:?}");
    assert_eq!(early.endpoint, "slow_task");
    // Another handle, from the id alone.
    let other = shared_tensor::task::<()>(task.id()).unwrap();
    other.wait().unwrap();
    task.wait().unwrap();
    let done = task.status().unwrap();
    assert_eq!(done.status, TaskStatus::Completed);
    assert!(done.started_at.is_some() && done.finished_at >= done.started_at);
    assert_eq!(done.progress.unwrap().message, "half way");
    assert!(shared_tensor::list_tasks(Some(TaskStatus::Completed)).unwrap().iter().any(|t| t.id == task.id()));
    // A sync call of a task endpoint runs as a task too.
    slow_task(10).unwrap();
    assert!(shared_tensor::list_tasks(None).unwrap().iter().any(|t| t.endpoint == "slow_task" && !t.awaitable));
}

#[test]
fn a_pending_task_can_be_cancelled_and_a_running_one_cannot() {
    setup();
    let first = serialized_task::submit(1).unwrap();
    shared_tensor_tests::wait_until("the first task to run", || first.status().unwrap().status == TaskStatus::Running);
    let second = serialized_task::submit(2).unwrap(); // waits for the serialized endpoint
    assert_eq!(second.status().unwrap().status, TaskStatus::Pending);
    assert!(second.cancel().unwrap());
    assert!(!first.cancel().unwrap(), "a running task cannot be cancelled");
    first.wait().unwrap();
    assert!(matches!(second.wait(), Err(Error::Cancelled { .. })));
    assert_eq!(second.status().unwrap().status, TaskStatus::Cancelled);
    // A later task of the same serialized endpoint has run to its end: the cancelled one,
    // queued before it, would have run by then.
    serialized_task::submit(3).unwrap().wait().unwrap();
    assert_eq!(runs("serialized_task", Some(3)).len(), 1);
    assert_eq!(runs("serialized_task", Some(2)).len(), 0, "the cancelled body never ran");
}

#[test]
fn managed_task_results_transfer_then_add_references() {
    setup();
    let task = managed_task::submit(1).unwrap();
    let first: Managed<()> = task.wait().unwrap();
    let second = task.wait().unwrap();
    assert_eq!(first.object_id(), second.object_id());
    assert_eq!(first.info().unwrap().refcount, 2, "the task's reference went to the first waiter");
    let id = first.object_id();
    drop((first, second));
    assert_eq!(shared_tensor::object_info(id).unwrap(), None, "no reference is left with the task");
}

#[test]
fn a_call_that_times_out_fails_alone() {
    let client = client_with(|c| c.call_timeout(Duration::from_millis(150)));
    match client.call::<(), _>("sleepy", (2000u64,)) {
        Err(Error::Timeout { endpoint, timeout_ms }) => assert_eq!((endpoint.as_str(), timeout_ms), ("sleepy", 150)),
        other => panic!("{other:?}"),
    }
    client.call::<(), _>("noop", ()).unwrap();
    let task = client.submit::<(), _>("slow_task", (500u64,)).unwrap();
    assert!(matches!(task.wait_timeout(Duration::from_millis(50)), Err(Error::Timeout { .. })));
    task.wait().unwrap();
}

#[test]
fn async_calls_and_awaitable_tasks() {
    setup();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let call = tokio::spawn(noop::call_async()); // the future is Send
        call.await.unwrap().unwrap();
        let task = slow_task::submit(20).unwrap();
        task.await.unwrap();
        assert!(matches!(fails::call_async("no".into()).await, Err(Error::Endpoint { .. })));
    });
}

/// The tensor-free client answers what the full one answers, keeps its connection through
/// a server-side error, and refuses a call (it carries no tensors).
#[test]
fn the_control_client_speaks_every_control_request_and_no_call() {
    use shared_tensor::control::{Control, ControlClient};
    use shared_tensor::wire::{Request, Response};
    let port = setup();
    let full = client_with(|c| c);
    let control = ControlClient::connect(&config(port)).unwrap();
    assert_eq!(control.addr().port(), port);
    assert_eq!(control.server_id(), shared_tensor::server_info().unwrap().server_id);
    let names = |e: Vec<shared_tensor::info::EndpointInfo>| e.into_iter().map(|e| e.name).collect::<Vec<_>>();
    assert_eq!(names(control.list_endpoints().unwrap()), names(full.list_endpoints().unwrap()));
    assert_eq!(control.server_info().unwrap().pid, std::process::id());
    assert!(control.ping().unwrap() < Duration::from_secs(1));
    // A task submitted by the full client is seen, by id, through the other connection.
    let task = slow_task::submit(1).unwrap();
    let seen = control.task_info(task.id()).unwrap();
    assert_eq!((seen.id, seen.endpoint.as_str()), (task.id(), "slow_task"));
    task.wait().unwrap();
    // The server's own error is an error, and the connection goes on.
    match control.invalidate_endpoint_cache("no_such_endpoint") {
        Err(Error::UnknownEndpoint { name, .. }) => assert_eq!(name, "no_such_endpoint"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(control.control(Request::Ping).unwrap(), Response::Pong));
    let call =
        Request::Submit { endpoint: "noop".into(), args: shared_tensor::wire::PackedPayload::from_bytes(vec![]) };
    let err = control.control(call).unwrap_err().to_string();
    assert!(err.contains("carries no tensors"), "{err}");
    assert_eq!(control.object_info(u64::MAX).unwrap(), None);
}

/// No server: one clear error at connect, not at the first request.
#[test]
fn the_control_client_says_when_no_server_answers() {
    use shared_tensor::control::ControlClient;
    let nowhere = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    match ControlClient::connect(&Config::default().base_port(nowhere).device_index(0).connect_timeout(Duration::ZERO))
    {
        Err(Error::ServerUnreachable { addr, .. }) => assert_eq!(addr, format!("127.0.0.1:{nowhere}")),
        other => panic!("{other:?}"),
    }
}
