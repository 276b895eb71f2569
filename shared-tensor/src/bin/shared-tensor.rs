//! `shared-tensor`: look inside a running shared-tensor server.
//!
//! ```text
//! shared-tensor ping | info | endpoints | tasks [--status S] | objects | cache | release ID... | invalidate ENDPOINT [--key K]
//!               [--base-port P] [--device D] [--json]
//! ```
//! The server is found like the library finds it: `127.0.0.1:(base port + device)`, with
//! `SHARED_TENSOR_BASE_PORT` (default 2537) and `SHARED_TENSOR_DEVICE` (default 0 here).
//!
//! Exit codes: 0 ok, 1 the server answered with an error (an unknown endpoint, say),
//! 2 a usage error (bad argument or `SHARED_TENSOR_*` value), 3 no server to talk to.
//! With `--json`, errors are printed as JSON on stdout too:
//! `{"error": {"kind": ..., "message": ..., "exit_code": ...}}`. Logs go to stderr,
//! filtered by `RUST_LOG`. Built with the package's `cli` feature.

use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::{Parser, Subcommand};
use serde::Serialize;
use shared_tensor::config::Config;
use shared_tensor::control::{Control, ControlClient};
use shared_tensor::info::{EndpointInfo, TaskInfo, TaskStatus};
use shared_tensor::Error;

#[derive(Parser)]
#[command(name = "shared-tensor", version, about = "Look inside a running shared-tensor server")]
struct Cli {
    /// Base port (default: SHARED_TENSOR_BASE_PORT, else 2537).
    #[arg(long, global = true)]
    base_port: Option<u16>,
    /// CUDA device whose server to ask (default: SHARED_TENSOR_DEVICE, else 0).
    #[arg(long, global = true)]
    device: Option<u32>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Round-trip time to the server.
    Ping,
    /// Identity, uptime, counters, memory.
    Info,
    /// The endpoints and their options.
    Endpoints,
    /// Tasks, optionally of one status (pending, running, completed, failed, cancelled).
    Tasks {
        #[arg(long)]
        status: Option<TaskStatus>,
    },
    /// Managed objects.
    Objects,
    /// Cache entries: key, bytes, hits, last use (most recent first).
    Cache,
    /// Remove managed objects from the server's registry (their handles become stale;
    /// tensors already received stay valid).
    Release {
        #[arg(required = true)]
        ids: Vec<u64>,
    },
    /// Drop an endpoint's cache entries (or one, with --key); handles stay valid.
    Invalidate {
        endpoint: String,
        #[arg(long)]
        key: Option<String>,
    },
}

/// Exit codes (documented above).
const SERVER_FAILED: u8 = 1;
const USAGE: u8 = 2;
const NO_SERVER: u8 = 3;

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::builder()
        .with_default_directive(tracing_subscriber::filter::LevelFilter::WARN.into())
        .from_env_lossy();
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let json = std::env::args().any(|a| a == "--json");
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version: exit 0
        Err(e) if json => return fail("usage", &e.to_string(), USAGE, true),
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(USAGE);
        }
    };
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = match &e {
                Error::ServerUnreachable { .. } | Error::ServerGone { .. } => NO_SERVER,
                Error::Config { .. } => USAGE,
                _ => SERVER_FAILED,
            };
            fail(variant(&e), &e.to_string(), code, cli.json)
        }
    }
}

/// The variant's name (`ServerUnreachable`), for JSON errors.
fn variant(e: &Error) -> &'static str {
    match e {
        Error::ServerUnreachable { .. } => "ServerUnreachable",
        Error::ServerGone { .. } => "ServerGone",
        Error::Config { .. } => "Config",
        Error::UnknownEndpoint { .. } => "UnknownEndpoint",
        Error::Unauthorized { .. } => "Unauthorized",
        Error::ProtocolMismatch { .. } => "ProtocolMismatch",
        Error::Timeout { .. } => "Timeout",
        _ => "ServerError",
    }
}

/// Reports an error (as JSON on stdout with `--json`, else on stderr) and exits with `code`.
fn fail(kind: &str, message: &str, code: u8, json: bool) -> ExitCode {
    if json {
        let error = serde_json::json!({ "error": { "kind": kind, "message": message.trim_end(), "exit_code": code } });
        println!("{}", serde_json::to_string_pretty(&error).unwrap_or_default());
    } else {
        eprintln!("shared-tensor: {}", message.trim_end());
    }
    ExitCode::from(code)
}

fn print_json<T: Serialize>(value: &T) -> shared_tensor::Result<()> {
    println!("{}", serde_json::to_string_pretty(value).unwrap_or_else(|e| format!("\"{e}\"")));
    Ok(())
}

/// Left-aligned columns.
/// The `endpoints` table's columns.
const ENDPOINT_COLUMNS: [&str; 9] =
    ["endpoint", "parameters", "execution", "concurrency", "cache", "cache key", "singleflight", "managed", "keep"];

/// One endpoint's row. With no `cache_key` template a keyed endpoint (cache or
/// singleflight) is keyed by its name plus every argument's value.
fn endpoint_row(e: EndpointInfo) -> Vec<String> {
    let yes = |b: bool| if b { "yes" } else { "no" }.to_string();
    let keyed = e.cache || e.singleflight;
    vec![
        e.name,
        e.params.join(", "),
        e.execution.to_string(),
        e.concurrency.to_string(),
        yes(e.cache),
        e.cache_key.unwrap_or_else(|| if keyed { "(endpoint + arguments)".into() } else { "-".into() }),
        yes(e.singleflight),
        yes(e.managed),
        yes(e.keep),
    ]
}

fn table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    if rows.is_empty() {
        println!("(none)");
    }
    for row in rows {
        line(row);
    }
}

fn ago(t: Option<SystemTime>) -> String {
    match t.and_then(|t| SystemTime::now().duration_since(t).ok()) {
        Some(d) if d < Duration::from_secs(120) => format!("{:.1} s ago", d.as_secs_f64()),
        Some(d) => format!("{} min ago", d.as_secs() / 60),
        None => "-".into(),
    }
}

/// A task's progress: its last report while it runs, "finished" once it ended.
fn progress(t: &TaskInfo) -> String {
    let last = t.progress.as_ref().map(|p| format!("{:.0}% {}", p.fraction * 100.0, p.message));
    match (t.status.is_finished(), last) {
        (true, Some(last)) => format!("finished (last report: {last})"),
        (true, None) => "finished".into(),
        (false, Some(last)) => last,
        (false, None) => "-".into(),
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn run(cli: &Cli) -> shared_tensor::Result<()> {
    let mut config = Config::from_env()?.connect_timeout(Duration::ZERO).call_timeout(Duration::from_secs(10));
    if let Some(port) = cli.base_port {
        config = config.base_port(port);
    }
    // No CUDA probe here: the device picks the port only (SHARED_TENSOR_DEVICE, checked by
    // Config::from_env, else 0).
    let device = cli.device.or(config.get_device_index()).unwrap_or(0);
    config = config.device_index(device);
    // Control requests only: nothing of libtorch is reached, so the inspector starts on
    // a machine without it.
    let client = ControlClient::connect(&config)?;
    match &cli.command {
        Cmd::Ping => {
            let rtt = client.ping()?;
            if cli.json {
                print_json(&serde_json::json!({
                    "address": client.addr().to_string(),
                    "transport": client.transport().to_string(),
                    "rtt_us": rtt.as_secs_f64() * 1e6,
                }))?;
            } else {
                println!("pong from {} ({}) in {:.0} µs", client.addr(), client.transport(), rtt.as_secs_f64() * 1e6);
            }
        }
        Cmd::Info => {
            let i = client.server_info()?;
            if cli.json {
                return print_json(&i);
            }
            let c = &i.counters;
            let gpu = i.gpu_memory.map_or("-".into(), |m| {
                format!(
                    "{} allocated, {} reserved, {} free of {}",
                    mib(m.allocated_bytes),
                    mib(m.reserved_bytes),
                    mib(m.free_bytes),
                    mib(m.total_bytes)
                )
            });
            let tasks: Vec<String> = i.tasks.iter().map(|(s, n)| format!("{n} {s}")).collect();
            table(
                &["", ""],
                vec![
                    vec!["address".into(), i.address.clone()],
                    vec!["unix socket".into(), i.unix_socket.clone().unwrap_or_else(|| "none (TCP only)".into())],
                    vec!["server id".into(), format!("{:016x}", i.server_id)],
                    vec!["version".into(), format!("shared-tensor {} (protocol {})", i.version, i.protocol)],
                    vec!["pid".into(), i.pid.to_string()],
                    vec!["uptime".into(), format!("{:.1} s", i.uptime_ms as f64 / 1e3)],
                    vec!["device".into(), format!("cuda:{}", i.device_index)],
                    vec!["endpoints".into(), i.endpoints.len().to_string()],
                    vec!["connections".into(), i.connections.to_string()],
                    vec!["requests".into(), format!("{} ({} failed)", c.requests, c.errors)],
                    vec![
                        "cache".into(),
                        format!("{} entries, {} hits, {} misses", i.cache_entries, c.cache_hits, c.cache_misses),
                    ],
                    vec!["singleflight joins".into(), c.singleflight_joins.to_string()],
                    vec!["tasks".into(), if tasks.is_empty() { "none".into() } else { tasks.join(", ") }],
                    vec!["managed objects".into(), i.managed_objects.to_string()],
                    vec!["leases".into(), format!("{} lent, {} held from clients", i.live_leases, i.imported_storages)],
                    vec!["shared".into(), format!("{} of GPU memory handed out", mib(c.bytes_shared))],
                    vec!["GPU memory".into(), gpu],
                    vec!["host memory".into(), mib(i.host_rss_bytes)],
                ],
            );
        }
        Cmd::Endpoints => {
            let e = client.list_endpoints()?;
            if cli.json {
                return print_json(&e);
            }
            table(&ENDPOINT_COLUMNS, e.into_iter().map(endpoint_row).collect());
        }
        Cmd::Tasks { status } => {
            let t = client.list_tasks(*status)?;
            if cli.json {
                return print_json(&t);
            }
            table(
                &["id", "endpoint", "status", "submitted", "started", "finished", "progress", "error"],
                t.into_iter()
                    .map(|t| {
                        vec![
                            t.id.to_string(),
                            t.endpoint.clone(),
                            t.status.to_string(),
                            ago(Some(t.submitted_at)),
                            ago(t.started_at),
                            ago(t.finished_at),
                            progress(&t),
                            t.error.unwrap_or_else(|| "-".into()),
                        ]
                    })
                    .collect(),
            );
        }
        Cmd::Objects => {
            let o = client.list_objects()?;
            if cli.json {
                return print_json(&o);
            }
            table(
                &["id", "endpoint", "cache key", "refcount", "created", "last access"],
                o.into_iter()
                    .map(|o| {
                        vec![
                            o.object_id.to_string(),
                            o.endpoint,
                            o.cache_key.unwrap_or_else(|| "-".into()),
                            o.refcount.to_string(),
                            ago(Some(o.created_at)),
                            ago(Some(o.last_accessed_at)),
                        ]
                    })
                    .collect(),
            );
        }
        Cmd::Cache => {
            let i = client.server_info()?;
            if cli.json {
                return print_json(&i.cache);
            }
            let budget = i.cache_budget_bytes.map_or("unlimited".into(), mib);
            let held: u64 = i.cache.iter().map(|e| e.bytes).sum();
            println!("{} entries, {} of a budget of {budget}", i.cache.len(), mib(held));
            table(
                &["endpoint", "key", "bytes", "hits", "last use", "kind"],
                i.cache
                    .into_iter()
                    .map(|e| {
                        let kind = match (e.managed, e.kept) {
                            (true, true) => "managed, kept",
                            (true, false) => "managed",
                            _ => "value",
                        };
                        vec![e.endpoint, e.key, mib(e.bytes), e.hits.to_string(), ago(Some(e.last_used)), kind.into()]
                    })
                    .collect(),
            );
        }
        Cmd::Release { ids } => {
            let done = client.drop_objects(ids)?;
            if cli.json {
                let out: Vec<_> =
                    ids.iter().zip(&done).map(|(id, r)| serde_json::json!({"id": id, "released": r})).collect();
                return print_json(&out);
            }
            for (id, released) in ids.iter().zip(done) {
                println!("object {id}: {}", if released { "released" } else { "no such object (nothing done)" });
            }
        }
        Cmd::Invalidate { endpoint, key } => {
            let n = match key {
                Some(k) => u64::from(client.invalidate_cache_key(endpoint, k)?),
                None => client.invalidate_endpoint_cache(endpoint)?,
            };
            if cli.json {
                return print_json(&serde_json::json!({ "endpoint": endpoint, "invalidated": n }));
            }
            println!("{endpoint}: {n} cache entr{} dropped", if n == 1 { "y" } else { "ies" });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared_tensor::info::Execution;

    fn info(cache: bool, singleflight: bool, cache_key: Option<&str>, keep: bool) -> EndpointInfo {
        EndpointInfo {
            name: "load".into(),
            path: "demo::load".into(),
            params: vec!["name".into(), "size".into()],
            execution: Execution::Direct,
            concurrency: Default::default(),
            cache,
            cache_key: cache_key.map(Into::into),
            singleflight,
            managed: keep,
            keep,
        }
    }

    #[test]
    fn the_endpoints_table_shows_the_real_default_key_and_keep() {
        let col = |name: &str| ENDPOINT_COLUMNS.iter().position(|c| *c == name).unwrap();
        let row = endpoint_row(info(true, true, None, true));
        assert_eq!(row.len(), ENDPOINT_COLUMNS.len());
        assert_eq!(row[col("cache key")], "(endpoint + arguments)");
        assert_eq!(row[col("keep")], "yes");
        let row = endpoint_row(info(false, true, None, false));
        assert_eq!(row[col("cache key")], "(endpoint + arguments)", "singleflight alone is keyed too");
        assert_eq!(row[col("keep")], "no");
        assert_eq!(endpoint_row(info(false, false, None, false))[col("cache key")], "-");
        assert_eq!(endpoint_row(info(true, true, Some("m:{name}"), false))[col("cache key")], "m:{name}");
    }
}
