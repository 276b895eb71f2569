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
/// Waits until `fd` has data to read (or its end, or an error), `stop` is readable, or
/// `timeout` passes; `Ok(true)` when a read of `fd` would return at once. For a
/// nonblocking socket read by a thread of its own (the server's connection readers, whose
/// server makes `stop` readable when it stops).
pub(crate) fn wait_readable(
    fd: std::os::fd::BorrowedFd<'_>,
    stop: std::os::fd::BorrowedFd<'_>,
    timeout: std::time::Duration,
) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    let mut fds = [
        libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: stop.as_raw_fd(), events: libc::POLLIN, revents: 0 },
    ];
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: `fds` is an array of two valid, initialised pollfds and the count says two;
    // both descriptors are borrowed, so open, for the whole call. poll only writes `revents`.
    match unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) } {
        -1 => {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            }
        }
        _ => Ok(fds[0].revents != 0),
    }
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
