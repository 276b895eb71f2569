//! `call_async` and `wait_async` on any executor (no Tokio reactor needed), sync stubs
//! inside Tokio runtimes, and futures dropped early, over a real loopback server (this
//! process is a client of a server it runs in the background); no GPU needed.

#[path = "endpoints.rs"]
mod endpoints;

use std::time::Duration;

use shared_tensor::client::Client;
use shared_tensor::config::Config;
use shared_tensor::control::Control;
use shared_tensor::{Error, Managed};
use shared_tensor_tests::{loopback_config, serve_here, wait_until as until};

fn config(port: u16) -> Config {
    loopback_config(port)
}

fn setup() -> u16 {
    serve_here(|c| c)
}

fn objects_of(endpoint: &str) -> usize {
    shared_tensor::list_objects().unwrap().iter().filter(|o| o.endpoint == endpoint).count()
}

#[test]
fn call_async_and_wait_async_under_futures_block_on() {
    setup();
    futures::executor::block_on(async {
        endpoints::default_key::call_async(40).await.unwrap();
        let err = endpoints::fails::call_async("no".into()).await.unwrap_err();
        assert!(matches!(err, Error::Endpoint { ref message, .. } if message == "no"), "{err:?}");
        let task = endpoints::slow_task::submit(1).unwrap();
        let () = task.wait_async().await.unwrap();
    });
    assert_eq!(endpoints::runs("default_key", Some(40)).len(), 1);
}

#[test]
fn call_async_and_sync_stubs_in_a_current_thread_runtime() {
    setup();
    // No time driver, no IO driver: the futures must not need them.
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    rt.block_on(async {
        endpoints::default_key::call_async(41).await.unwrap();
        endpoints::default_key(42).unwrap(); // a sync stub on the runtime's only thread
        endpoints::noop().unwrap();
        let task = endpoints::slow_task::submit(2).unwrap();
        let () = task.wait_async().await.unwrap();
    });
    assert_eq!(endpoints::runs("default_key", Some(41)).len(), 1);
    assert_eq!(endpoints::runs("default_key", Some(42)).len(), 1);
}

#[test]
fn call_async_and_sync_stubs_in_a_multi_thread_runtime() {
    setup();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let calls: Vec<_> = (43..51).map(|n| tokio::spawn(endpoints::default_key::call_async(n))).collect();
        for c in calls {
            c.await.unwrap().unwrap();
        }
        let sync = tokio::spawn(async { endpoints::default_key(51) });
        sync.await.unwrap().unwrap();
    });
    for n in 43..52 {
        assert_eq!(endpoints::runs("default_key", Some(n)).len(), 1, "default_key({n})");
    }
}

#[test]
fn a_dropped_future_and_a_timed_out_call_release_their_late_managed_replies() {
    setup();
    assert_eq!(objects_of("gated_object"), 0);
    // An async call dropped before its reply: the request was sent, its object is built
    // after the caller left.
    let fut = endpoints::gated_object::call_async(1);
    until("the body to start", || endpoints::runs("gated_object", Some(1)).len() == 1);
    drop(fut);
    // A sync call that times out (its own client, with a short call timeout).
    let impatient = Client::new(&config(setup()).call_timeout(Duration::from_millis(200))).unwrap();
    let err = impatient.call::<Managed<()>, _>("gated_object", (2i64,)).unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    endpoints::OBJECT_GATE.open();
    // Both late replies are released at once, not when the connections close.
    until("both late objects to be released", || {
        let _ = impatient.ping(); // a request on that connection, which also carries its releases
        endpoints::runs("gated_object", None).len() == 2 && objects_of("gated_object") == 0
    });
    // A call that waits still gets its object.
    let kept: Managed<()> = endpoints::gated_object(3).unwrap();
    assert_eq!(objects_of("gated_object"), 1);
    assert!(kept.release());
}
