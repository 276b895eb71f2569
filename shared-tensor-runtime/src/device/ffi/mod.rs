//! The one module with `unsafe` code: the C ABI of `csrc/st_ipc.cpp` and safe wrappers
//! around it ([`torch`], with the `cuda` feature), and the few libc calls the runtime
//! makes (here). Each `unsafe` block states its invariants next to it.

#[cfg(feature = "cuda")]
mod torch;
#[cfg(feature = "cuda")]
pub use torch::Dims;
#[cfg(feature = "cuda")]
pub(crate) use torch::*;

/// This process's effective user id.
pub(crate) fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

#[cfg(feature = "cuda")]
/// Raises this process's open-file limit to its hard limit (a server holds one socket
/// per client connection); returns the new soft limit.
pub(crate) fn raise_open_files_limit() -> std::io::Result<u64> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `lim` is a valid out-pointer for getrlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: `lim` is a valid, initialised rlimit for setrlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_cur)
}

#[cfg(feature = "cuda")]
/// Gives SIGINT and SIGTERM back their default action (end the process), after the first
/// stop signal was caught: a second one then ends the process the ordinary way.
pub(crate) fn restore_default_stop_signals() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: installs the default disposition for a standard signal; no handler
        // function of ours is involved, and the previous (tokio's) handler is not needed
        // any more once the one stop it was for has been received.
        unsafe { libc::signal(sig, libc::SIG_DFL) };
    }
}
