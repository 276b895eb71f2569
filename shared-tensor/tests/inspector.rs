//! The `shared-tensor` inspector against a live loopback server (no GPU needed).

use std::process::Command;
use std::sync::OnceLock;

use shared_tensor::config::{Config, Role};
use shared_tensor::{share, Managed};

#[share(managed, cache_key = "thing:{n}")]
fn make_thing(n: i64) {
    let _ = n;
}

#[share(execution = "task", cache = false)]
fn quick() {
    shared_tensor::report_progress(1.0, "done soon");
}

static PORT: OnceLock<u16> = OnceLock::new();

fn port() -> u16 {
    *PORT.get_or_init(|| {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        shared_tensor::configure(Config::default().role(Role::Local).base_port(port).device_index(0)).unwrap();
        shared_tensor::serve_in_background(None).unwrap();
        port
    })
}

/// The inspector under test: the libtorch-free build that `cargo xtask test` makes
/// (`SHARED_TENSOR_INSPECTOR`), else the one cargo built for this package.
fn inspector() -> std::path::PathBuf {
    std::env::var_os("SHARED_TENSOR_INSPECTOR").map_or_else(|| env!("CARGO_BIN_EXE_shared-tensor").into(), Into::into)
}

fn inspect(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(inspector())
        .args(["--base-port", &port().to_string(), "--device", "0"])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn json(args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.push("--json");
    let (code, out, err) = inspect(&all);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap()
}

#[test]
fn the_inspector_reads_a_live_server() {
    port();
    let thing: Managed<()> = make_thing(3).unwrap();
    quick::submit().unwrap().wait().unwrap();

    let (code, out, _) = inspect(&["ping"]);
    assert_eq!(code, 0);
    assert!(out.starts_with(&format!("pong from 127.0.0.1:{}", port())), "{out}");

    let info = json(&["info"]);
    assert_eq!(info["pid"], std::process::id());
    let (_, table, _) = inspect(&["info"]);
    assert!(table.contains("managed objects") && table.contains("requests"), "{table}");

    let endpoints = json(&["endpoints"]);
    let names: Vec<&str> = endpoints.as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap()).collect();
    assert_eq!(names, vec!["make_thing", "quick"]);
    let (_, table, _) = inspect(&["endpoints"]);
    assert!(table.contains("thing:{n}") && table.contains("task"), "{table}");

    let tasks = json(&["tasks", "--status", "completed"]);
    assert!(tasks
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["endpoint"] == "quick" && t["progress"]["message"] == "done soon"));
    let (_, table, _) = inspect(&["tasks"]);
    assert!(table.contains("finished (last report: 100% done soon)"), "{table}");

    let objects = json(&["objects"]);
    assert_eq!(objects[0]["object_id"], thing.object_id());
    assert_eq!(objects[0]["refcount"], 1);

    let (_, out, _) = inspect(&["invalidate", "make_thing"]);
    assert_eq!(out.trim(), "make_thing: 1 cache entry dropped");
    let released = json(&["release", &thing.object_id().to_string(), "999999"]);
    assert_eq!(released[0]["released"], true);
    assert_eq!(released[1]["released"], false);
    assert!(!thing.is_live(), "a released object's handle is stale");

    let (code, _, err) = inspect(&["tasks", "--status", "done"]);
    assert_eq!(code, 2, "a bad argument is a usage error");
    assert!(err.contains("not a task status"), "{err}");

    let (code, _, err) = inspect(&["invalidate", "nosuch"]);
    assert_eq!(code, 1, "an unknown endpoint is the server's error");
    assert!(err.contains("no endpoint named \"nosuch\"") && err.contains("make_thing"), "{err}");
    let (code, out, _) = inspect(&["invalidate", "nosuch", "--json"]);
    assert_eq!(code, 1);
    let error: serde_json::Value = serde_json::from_str(&out).expect("--json errors are JSON");
    assert_eq!(error["error"]["kind"], "UnknownEndpoint");
    assert_eq!(error["error"]["exit_code"], 1);
}

#[test]
fn no_server_is_one_clear_message() {
    let nowhere = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let out = Command::new(inspector())
        .args(["--base-port", &nowhere.to_string(), "--device", "0", "ping"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "no server is exit code 3");
    assert!(err.starts_with(&format!("shared-tensor: no shared-tensor server at 127.0.0.1:{nowhere}")), "{err}");
    assert!(err.contains("SHARED_TENSOR_ROLE=server"), "{err}");
}
