//! Examples of shared-tensor, and the one helper they share.

/// Logs to stderr, honouring `RUST_LOG` (warnings and errors when it is unset).
///
/// shared-tensor emits [`tracing`](https://docs.rs/tracing) events and installs no
/// subscriber: the application chooses. This is the choice the examples make.
///
/// ```
/// shared_tensor_examples::log_to_stderr();
/// ```
pub fn log_to_stderr() {
    use tracing_subscriber::filter::{EnvFilter, LevelFilter};
    let filter = EnvFilter::builder().with_default_directive(LevelFilter::WARN.into()).from_env_lossy();
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

/// In the server role, keeps a SIGINT or SIGTERM that arrives during the program's own
/// start-up work, so that `serve_while_server()` then returns at once and the process
/// exits 0 (without it, such a signal ends the process with the default action, status
/// 143 for SIGTERM). The other roles are left alone: their Ctrl-C ends them at once.
///
/// ```no_run
/// fn main() -> shared_tensor::Result<()> {
///     shared_tensor_examples::keep_stop_signals_in_server_role()?;
///     // ... start-up work and calls ...
///     shared_tensor::serve_while_server()
/// }
/// ```
pub fn keep_stop_signals_in_server_role() -> shared_tensor::Result<()> {
    if shared_tensor::role()? == shared_tensor::config::Role::Server {
        shared_tensor::catch_stop_signals()?;
    }
    Ok(())
}
