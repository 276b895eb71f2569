//! A server of the test endpoints, for tests that need one in another process.
//!
//! - `ST_TEST_SERVER=role`: the server role (`SHARED_TENSOR_ROLE=server`, needs a GPU);
//!   serves until SIGTERM.
//! - `ST_TEST_SERVER=manual`: manual mode in the local role (no GPU needed); serves until
//!   its stdin closes.
//!
//! - `ST_TEST_SERVER=busy`: manual mode in the local role that, once serving, runs "its
//!   own work" for `ST_TEST_BUSY_MS` (prints `STOP REQUESTED` as soon as it sees
//!   `stop_requested()`, and `WORK DONE` at the end), then serves until SIGINT or SIGTERM
//!   (prints `STOPPED`): for the stop-signal tests.
//!
//! - `ST_TEST_SERVER=stoppable`: listens for stop signals from the start
//!   (`catch_stop_signals`), serves through a server object (in the server role with
//!   `SHARED_TENSOR_ROLE=server`, else manual mode in the local role), and stops on
//!   SIGTERM/SIGINT (`serve_until_signal`) or, with `ST_TEST_STOP=stdin`, when its stdin
//!   closes (`ServerHandle::shutdown`); prints `STOPPED <clean>` and returns from `main`.
//!   With `ST_TEST_RUNTIME=current_thread|multi_thread` it waits from inside a tokio
//!   runtime of that flavour (`ST_TEST_STOP=async`: with `serve_until_signal_async`).
//!
//! Prints `READY <port>` once it accepts connections. Either way it exits when its stdin
//! closes, so it never outlives the test that started it (even one that panicked or
//! kept it in a static).

#[path = "../endpoints.rs"]
mod endpoints;
#[path = "profiling.rs"]
mod profiling;

use std::io::{BufRead, Read};

use shared_tensor::config::{Config, Role};

/// Exits the process when stdin reaches end of file (the parent is gone). A line
/// `PROFILE` on stdin starts [`profile_for_a_while`] (the parent says when its calls begin).
fn exit_with_parent() {
    std::thread::spawn(|| {
        // Lines as bytes: whatever else arrives is read and ignored until end of file.
        for line in std::io::stdin().lock().split(b'\n') {
            match line {
                Ok(line) if line.trim_ascii() == b"PROFILE" => profile_for_a_while(),
                Ok(_) => {}
                Err(_) => break,
            }
        }
        std::process::exit(0);
    });
}

/// With `ST_PROFILE=<file>`: profiles this process for `ST_PROFILE_SECS` (default 8)
/// seconds from now, then writes the folded stacks to the file (`bench profile`, which
/// asks once the workload's first, possibly long, call has been made).
fn profile_for_a_while() {
    let Some(path) = std::env::var_os("ST_PROFILE") else { return };
    let secs: f64 = std::env::var("ST_PROFILE_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(8.0);
    let profile = profiling::Profile::start(path.into()).unwrap_or_else(|e| panic!("{e}"));
    std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs_f64(secs));
        match profile.finish() {
            Ok(samples) => eprintln!("endpoint_server: profile written ({samples} samples)"),
            Err(e) => eprintln!("endpoint_server: {e}"),
        }
    });
}

/// The `stoppable` mode (see the module docs).
fn stoppable() -> shared_tensor::Result<()> {
    shared_tensor::catch_stop_signals()?;
    let config = Config::from_env()?;
    let server = if config.get_role() == Role::Server {
        shared_tensor::configure(config)?; // the role starts its server
        None
    } else {
        shared_tensor::configure(config.role(Role::Local))?;
        Some(shared_tensor::server::Server::builder().start()?)
    };
    let port = shared_tensor::server_info()?.address.rsplit(':').next().unwrap_or_default().to_string();
    println!("READY {port}");
    match server {
        Some(server) if std::env::var("ST_TEST_STOP").is_ok_and(|v| v == "stdin") => {
            let _ = std::io::stdin().read_to_end(&mut Vec::new());
            println!("STOPPED {}", server.shutdown().is_clean());
        }
        Some(server) => {
            // Inside a tokio runtime (what an async application does), or plain sync code.
            let inside = |rt: tokio::runtime::Runtime| match std::env::var("ST_TEST_STOP").as_deref() {
                Ok("async") => rt.block_on(shared_tensor::serve_until_signal_async()),
                _ => rt.block_on(async { shared_tensor::serve_until_signal() }),
            };
            match std::env::var("ST_TEST_RUNTIME").as_deref() {
                Ok("current_thread") => inside(tokio::runtime::Builder::new_current_thread().build().unwrap())?,
                Ok("multi_thread") => inside(tokio::runtime::Builder::new_multi_thread().build().unwrap())?,
                _ => shared_tensor::serve_until_signal()?,
            }
            println!("STOPPED {}", server.join().is_clean());
        }
        None => {
            shared_tensor::serve_while_server()?;
            println!("STOPPED role");
        }
    }
    Ok(())
}

fn main() -> shared_tensor::Result<()> {
    let mode = std::env::var("ST_TEST_SERVER").unwrap_or_else(|_| "role".into());
    if mode == "stoppable" {
        return stoppable();
    }
    if mode == "busy" {
        shared_tensor::catch_stop_signals()?; // a signal during the work is kept
        shared_tensor::configure(Config::from_env()?.role(Role::Local))?;
        let addr = shared_tensor::serve_in_background(None)?;
        println!("READY {}", addr.port());
        exit_with_parent();
        let ms = std::env::var("ST_TEST_BUSY_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(1500);
        // The program's own work: steps of 1 ms, watching for a stop request between them.
        let end = std::time::Instant::now() + std::time::Duration::from_millis(ms);
        let mut told = false;
        while std::time::Instant::now() < end {
            if !told && shared_tensor::stop_requested() {
                println!("STOP REQUESTED");
                told = true;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        println!("WORK DONE");
        shared_tensor::serve_until_signal()?;
        println!("STOPPED");
        return Ok(());
    }
    if mode == "manual" {
        let config = Config::from_env()?.role(Role::Local);
        shared_tensor::configure(config)?;
        let addr = shared_tensor::serve_in_background(None)?;
        println!("READY {}", addr.port());
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        return Ok(());
    }
    let info = shared_tensor::server_info()?; // starts the runtime, and with it the server
    println!("READY {}", info.address.rsplit(':').next().unwrap_or_default());
    exit_with_parent();
    shared_tensor::serve_while_server()
}
