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
