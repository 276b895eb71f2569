//! Task retention: capacity (oldest finished evicted first; submit refused when all are
//! live) and TTL, in a process configured with small limits. No GPU needed.

#[path = "endpoints.rs"]
mod endpoints;

use std::time::Duration;

use shared_tensor::config::{Config, Role};
use shared_tensor::Error;

#[test]
fn capacity_and_ttl_bound_the_task_table() {
    shared_tensor::configure(
        Config::default().role(Role::Local).device_index(0).task_capacity(3).task_ttl(Duration::from_millis(600)),
    )
    .unwrap();
    let running: Vec<_> = (0..3).map(|_| endpoints::slow_task::submit(300).unwrap()).collect();
    match endpoints::slow_task::submit(1) {
        Err(Error::TaskCapacity { capacity }) => assert_eq!(capacity, 3),
        other => panic!("a fourth live task was accepted: {other:?}"),
    }
    for t in &running {
        t.wait().unwrap();
    }
    let oldest = running[0].id();
    let newer = endpoints::slow_task::submit(1).unwrap();
    assert_eq!(shared_tensor::list_tasks(None).unwrap().len(), 3, "one finished task made room");
    newer.wait().unwrap();
    let ids: Vec<u64> = shared_tensor::list_tasks(None).unwrap().iter().map(|t| t.id).collect();
    let evicted = running.iter().map(|t| t.id()).find(|id| !ids.contains(id)).expect("one was evicted");
    assert_eq!(shared_tensor::task_info(evicted).unwrap_err(), Error::UnknownTask { task: evicted });
    assert!(ids.contains(&newer.id()));
    let _ = oldest;

    std::thread::sleep(Duration::from_millis(700));
    let fresh = endpoints::slow_task::submit(1).unwrap();
    fresh.wait().unwrap();
    let left: Vec<u64> = shared_tensor::list_tasks(None).unwrap().iter().map(|t| t.id).collect();
    assert_eq!(left, vec![fresh.id()], "tasks past their TTL are evicted");
}
