//! Task retention through the public configuration: the capacity refuses a submit when
//! every retained task is live, and the TTL evicts finished tasks at the next submit. The
//! TTL is zero here, so no test waits for time to pass; how tasks age (not a nanosecond
//! before their TTL) and which go first past the capacity (those whose result was
//! collected, then the oldest finished) are tested on a hand-driven clock in the runtime's
//! unit tests (`exec::task`). No GPU needed.

#[path = "endpoints.rs"]
mod endpoints;

use std::time::Duration;

use shared_tensor::config::{Config, Role};
use shared_tensor::Error;

#[test]
fn capacity_and_ttl_bound_the_task_table() {
    shared_tensor::configure(
        Config::default().role(Role::Local).device_index(0).task_capacity(3).task_ttl(Duration::ZERO),
    )
    .unwrap();
    // Each body runs 300 ms: all three are live when the fourth is submitted.
    let running: Vec<_> = (0..3).map(|_| endpoints::slow_task::submit(300).unwrap()).collect();
    match endpoints::slow_task::submit(1) {
        Err(Error::TaskCapacity { capacity }) => assert_eq!(capacity, 3),
        other => panic!("a fourth live task was accepted: {other:?}"),
    }
    for t in &running {
        t.wait().unwrap();
    }
    // Finished tasks stay listed until the next submit evicts them.
    assert_eq!(shared_tensor::list_tasks(None).unwrap().len(), 3);
    let fresh = endpoints::slow_task::submit(1).unwrap();
    fresh.wait().unwrap();
    let left: Vec<u64> = shared_tensor::list_tasks(None).unwrap().iter().map(|t| t.id).collect();
    assert_eq!(left, vec![fresh.id()], "tasks past their TTL are evicted");
    for t in &running {
        assert_eq!(shared_tensor::task_info(t.id()).unwrap_err(), Error::UnknownTask { task: t.id() });
    }
}
