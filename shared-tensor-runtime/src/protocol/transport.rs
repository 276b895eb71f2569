//! The byte streams between a client and a server, and how a client opens one.
//!
//! A server listens on TCP loopback, `127.0.0.1:port`, and on the Unix domain socket
//! `<runtime dir>/server-<port>.sock`, next to its token file (see [`auth`]
//! for the runtime dir). The port stays the one address users configure: the socket is
//! found from it. A client takes the socket when it is there, TCP otherwise
//! ([`Transport::Auto`], the default): a round trip over a Unix socket skips the TCP
//! stack, about a quarter of loopback's cost.
//!
//! TCP stays for the processes that cannot reach the server's runtime folder: another
//! user let in by a shared token (`SHARED_TENSOR_TOKEN`; the folder is private to the
//! server's user), and a container that shares the host's network and GPU but not its
//! `/run` or `/tmp`. Both still pass the same handshake.
//!
//! ```
//! use shared_tensor_runtime::transport::{socket_path, Transport};
//! assert_eq!("unix".parse::<Transport>().unwrap(), Transport::Unix);
//! if let Some(path) = socket_path(2537) {
//!     assert!(path.ends_with("server-2537.sock"));
//! }
//! ```

use std::io::{Read, Write};
use std::mem::MaybeUninit;
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::info::ProcessId;
use crate::protocol::auth::{self, Side};
use crate::protocol::wire::{self, ClientMessage, Hello, ServerMessage, Welcome};

/// Which stream a client opens to its server (`SHARED_TENSOR_TRANSPORT`).
///
/// ```
/// use shared_tensor_runtime::{config::Config, transport::Transport};
/// // Force TCP loopback (the server keeps its Unix socket for others).
/// let config = Config::default().transport(Transport::Tcp);
/// assert_eq!(config.get_transport(), Transport::Tcp);
/// assert_eq!(Transport::default(), Transport::Auto);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Transport {
    /// The server's Unix socket when this process can reach it, else TCP loopback.
    #[default]
    Auto,
    /// The Unix socket only: a client fails rather than fall back to TCP, and a server
    /// that cannot create its socket does not start.
    Unix,
    /// TCP loopback only: a client never looks for the socket, and a server creates none.
    Tcp,
}

impl std::str::FromStr for Transport {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Transport, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" | "" => Ok(Transport::Auto),
            "unix" => Ok(Transport::Unix),
            "tcp" => Ok(Transport::Tcp),
            _ => Err("`auto`, `unix` or `tcp`".into()),
        }
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Transport::Auto => "auto",
            Transport::Unix => "unix",
            Transport::Tcp => "tcp",
        })
    }
}

/// The longest path a Unix socket address holds (`sun_path` is 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// The Unix socket of the server on `port`, `<runtime dir>/server-<port>.sock`; `None`
/// when that path is too long for a socket address (then only TCP is served).
///
/// ```
/// use shared_tensor_runtime::{auth::runtime_dir, transport::socket_path};
/// if let Some(path) = socket_path(7800) {
///     assert_eq!(path, runtime_dir().join("server-7800.sock"));
/// }
/// ```
pub fn socket_path(port: u16) -> Option<PathBuf> {
    let path = auth::runtime_dir().join(format!("server-{port}.sock"));
    (path.as_os_str().len() <= MAX_SOCKET_PATH).then_some(path)
}

/// [`socket_path`], or the error that says why the port has no socket (and what to do),
/// for the server that would bind it and the client that would connect to it.
pub(crate) fn usable_socket_path(port: u16) -> std::io::Result<PathBuf> {
    socket_path(port).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "the runtime folder {} is too long a path for a Unix socket (at most {MAX_SOCKET_PATH} bytes): set \
                 SHARED_TENSOR_RUNTIME_DIR to a shorter one",
                auth::runtime_dir().display()
            ),
        )
    })
}

/// The loopback TCP address of the server on `port`.
pub(crate) fn tcp_addr(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// A client's connected stream: a Unix socket or TCP loopback.
#[derive(Debug)]
pub(crate) enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    /// Which transport it is.
    pub(crate) fn transport(&self) -> Transport {
        match self {
            Stream::Unix(_) => Transport::Unix,
            Stream::Tcp(_) => Transport::Tcp,
        }
    }

    // The full client's (with the `cuda` feature); the control client needs none of it.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn try_clone(&self) -> std::io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    pub(crate) fn set_read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(timeout),
            Stream::Tcp(s) => s.set_read_timeout(timeout),
        }
    }

    // The full client's and the server's (with the `cuda` feature); the control client
    // needs none of it.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    /// Ends `how` of the socket, for every descriptor of it: `Both` closes the connection;
    /// `Write` ends this side's sending (the peer reads the end of the stream once it has
    /// read what was sent).
    pub(crate) fn shutdown(&self, how: Shutdown) -> std::io::Result<()> {
        match self {
            Stream::Unix(s) => s.shutdown(how),
            Stream::Tcp(s) => s.shutdown(how),
        }
    }

    // The full client's (with the `cuda` feature); the control client needs none of it.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    /// Waits (up to the read timeout) until data or the end of the stream is there,
    /// without consuming anything: `Ok(0)` is the end, `Ok(1)` data to read.
    pub(crate) fn peek_byte(&self) -> std::io::Result<usize> {
        socket2::SockRef::from(self).peek(&mut [MaybeUninit::uninit(); 1])
    }

    #[cfg(feature = "cuda")]
    /// Waits up to `timeout` until a read would return at once (data, the end of the
    /// stream, an error; `Ok(true)`) or `stop` is readable (`Ok(false)`); for a
    /// nonblocking stream (a server connection's reader), whose reads never wait.
    pub(crate) fn wait_readable(&self, stop: std::os::fd::BorrowedFd<'_>, timeout: Duration) -> std::io::Result<bool> {
        use std::os::fd::AsFd;
        crate::device::ffi::wait_readable(self.as_fd(), stop, timeout)
    }

    #[cfg(feature = "cuda")]
    /// Writes what the socket takes now, never waiting (`WouldBlock` when it takes
    /// nothing) and never raising SIGPIPE in a process that did not ignore it (a server
    /// embedded in a host program): a peer gone is an `Err`, as on any socket.
    pub(crate) fn try_send(&self, buf: &[u8]) -> std::io::Result<usize> {
        socket2::SockRef::from(self).send_with_flags(buf, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
    }

    // The full client's (with the `cuda` feature); the control client needs none of it.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    /// Whether a read would return at once (data, the end of the stream, or an error),
    /// without waiting and without consuming anything.
    pub(crate) fn poll_readable(&self) -> bool {
        match socket2::SockRef::from(self)
            .recv_with_flags(&mut [MaybeUninit::uninit(); 1], libc::MSG_PEEK | libc::MSG_DONTWAIT)
        {
            Ok(_) => true,
            Err(e) => !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted),
        }
    }
}

/// The socket either transport holds (socket2's `SockRef` takes it through this).
impl std::os::fd::AsFd for Stream {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            Stream::Unix(s) => s.as_fd(),
            Stream::Tcp(s) => s.as_fd(),
        }
    }
}

impl Read for &Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => (&*s).read(buf),
            Stream::Tcp(s) => (&*s).read(buf),
        }
    }
}

impl Write for &Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => (&*s).write(buf),
            Stream::Tcp(s) => (&*s).write(buf),
        }
    }
    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        match self {
            Stream::Unix(s) => (&*s).write_all(buf),
            Stream::Tcp(s) => (&*s).write_all(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        (&*self).read(buf)
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        (&*self).write(buf)
    }
    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        (&*self).write_all(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Connects to a Unix socket without ever blocking: a connect to a socket whose backlog
/// is full (a server that stopped accepting) waits without bound when blocking, where this
/// fails with `WouldBlock` for the caller's retry loop, as a TCP connect times out.
fn connect_unix(path: &std::path::Path) -> std::io::Result<UnixStream> {
    let socket = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
    socket.set_nonblocking(true)?;
    socket.connect(&socket2::SockAddr::unix(path)?)?;
    socket.set_nonblocking(false)?;
    Ok(UnixStream::from(std::os::fd::OwnedFd::from(socket)))
}

/// One attempt to reach the server on `port` by `transport`. With `Auto`, a socket that
/// is missing, refuses (a server that died and left it) or is closed to this user falls
/// back to TCP.
fn connect_once(port: u16, transport: Transport, timeout: Duration) -> std::io::Result<Stream> {
    if transport != Transport::Tcp {
        let unix = usable_socket_path(port).and_then(|path| {
            connect_unix(&path)
                .map_err(|e| std::io::Error::new(e.kind(), format!("Unix socket {}: {e}", path.display())))
        });
        match unix {
            Ok(s) => return Ok(Stream::Unix(s)),
            Err(e) if transport == Transport::Unix => return Err(e),
            Err(_) => {}
        }
    }
    let s = TcpStream::connect_timeout(&tcp_addr(port), timeout)?;
    let _ = s.set_nodelay(true);
    Ok(Stream::Tcp(s))
}

/// Connects to the server on `port`, retrying for `window` while it starts (logging
/// once, at info level, past a second), then runs the handshake. The stream has no read
/// timeout.
pub(crate) fn open_stream(
    port: u16,
    transport: Transport,
    window: Duration,
    shared_token: Option<&str>,
) -> Result<(Stream, Welcome)> {
    let addr = tcp_addr(port);
    let started = Instant::now();
    let mut said = false;
    let stream = loop {
        let left = window.saturating_sub(started.elapsed()).clamp(Duration::from_millis(50), Duration::from_secs(1));
        match connect_once(port, transport, left) {
            Ok(s) => break s,
            Err(e) if started.elapsed() >= window => {
                return Err(Error::ServerUnreachable {
                    addr: addr.to_string(),
                    reason: e.to_string(),
                    waited_ms: started.elapsed().as_millis() as u64,
                })
            }
            Err(e) => {
                // Said once, so that a long orchestrated wait does not look like a hang.
                if !said && started.elapsed() >= Duration::from_secs(1) {
                    said = true;
                    tracing::info!(
                        "waiting for the shared-tensor server at {addr} ({e}); trying for up to {} ms",
                        window.as_millis()
                    );
                }
                std::thread::sleep(Duration::from_millis(25));
            }
        }
    };
    let welcome = handshake(&stream, addr, shared_token)?;
    // A server listens on TCP a moment before its socket exists (the port is its lock),
    // and answers a handshake only once both are up: a client that raced its start and
    // got TCP takes the socket now that it is there, and keeps TCP if it cannot.
    if transport == Transport::Auto && matches!(stream, Stream::Tcp(_)) {
        if let Some(path) = socket_path(port).filter(|p| p.exists()) {
            if let Ok(unix) = connect_unix(&path).map(Stream::Unix) {
                match handshake(&unix, addr, shared_token) {
                    Ok(again) if again.server_id == welcome.server_id => return Ok((unix, again)),
                    _ => {}
                }
            }
        }
    }
    Ok((stream, welcome))
}

/// Hello, Challenge, Auth, Welcome (see [`auth`](crate::protocol::auth)).
fn handshake(stream: &Stream, addr: SocketAddr, shared_token: Option<&str>) -> Result<Welcome> {
    let send = |msg: &ClientMessage| -> Result<()> {
        let mut buf = Vec::new();
        wire::write_frame(msg, &mut buf)?;
        let mut w = stream;
        w.write_all(&buf).map_err(|e| Error::io("sending the handshake", &e))
    };
    let mut buf = Vec::new();
    let mut receive = || -> Result<ServerMessage> {
        let mut r = stream;
        wire::read_frame(&mut r, &mut buf).map_err(|e| Error::ServerGone {
            addr: addr.to_string(),
            reason: format!("no answer to the handshake: {e}"),
        })?;
        wire::decode::<ServerMessage>(&buf)
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let nonce = auth::nonce();
    send(&ClientMessage::Hello(Hello { protocol: wire::PROTOCOL_VERSION, client: ProcessId::current(), nonce }))?;
    let challenge = match receive()? {
        ServerMessage::Challenge(c) if c.protocol == wire::PROTOCOL_VERSION => c,
        ServerMessage::Challenge(c) => {
            return Err(Error::ProtocolMismatch { ours: wire::PROTOCOL_VERSION, theirs: c.protocol })
        }
        ServerMessage::Refused(e) => return Err(e),
        _ => return Err(Error::Protocol("the server did not answer Hello with a challenge".into())),
    };
    // Read the secret now: the server wrote its token before it began to accept.
    let secret = auth::client_secret(addr.port(), shared_token)?;
    if !challenge.proofs.iter().any(|p| secret.verify(Side::Server, &nonce, p)) {
        return Err(Error::Unauthorized {
            reason: format!(
                "the process at {addr} could not prove it is a shared-tensor server of this user (another user's \
                 server, or another program on the port); nothing was sent to it"
            ),
        });
    }
    send(&ClientMessage::Auth(secret.proof(Side::Client, &challenge.nonce)))?;
    let welcome = match receive()? {
        ServerMessage::Welcome(w) => w,
        ServerMessage::Refused(e) => return Err(e),
        _ => return Err(Error::Protocol("the server did not answer Auth with Welcome".into())),
    };
    let _ = stream.set_read_timeout(None);
    Ok(welcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transports_parse_and_print_back() {
        for t in [Transport::Auto, Transport::Unix, Transport::Tcp] {
            assert_eq!(t.to_string().parse::<Transport>().unwrap(), t);
        }
        assert_eq!(" TCP ".parse::<Transport>().unwrap(), Transport::Tcp);
        assert!("udp".parse::<Transport>().unwrap_err().contains("`tcp`"));
    }

    #[test]
    fn a_unix_connect_to_a_full_backlog_fails_at_once_instead_of_blocking() {
        let dir = std::env::temp_dir().join(format!("st-backlog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let _ = std::fs::remove_file(&path);
        // A listener that never accepts: its backlog fills, then connects would block.
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let mut held = Vec::new();
        let refused = loop {
            match connect_unix(&path) {
                Ok(s) => held.push(s),
                Err(e) => break e,
            }
            assert!(held.len() < 100_000, "the backlog never filled");
        };
        assert_eq!(refused.kind(), std::io::ErrorKind::WouldBlock, "{refused}");
        assert!(!held.is_empty(), "connects succeed while the backlog has room");
        // A connected stream is blocking again (reads wait for data).
        assert!(!socket2::SockRef::from(&held[0]).nonblocking().unwrap());
        drop((held, listener));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A connected pair of each transport: (sending end, receiving end).
    fn connected_pairs() -> [(Stream, Stream); 2] {
        let (a, b) = UnixStream::pair().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (d, _) = listener.accept().unwrap();
        [(Stream::Unix(a), Stream::Unix(b)), (Stream::Tcp(c), Stream::Tcp(d))]
    }

    #[test]
    fn peek_sees_data_without_consuming_it_on_both_transports() {
        for (tx, rx) in &connected_pairs() {
            let mut w = tx;
            w.write_all(b"xy").unwrap();
            assert_eq!(rx.peek_byte().unwrap(), 1);
            let mut got = [0u8; 2];
            let mut r = rx;
            r.read_exact(&mut got).unwrap();
            assert_eq!(&got, b"xy", "peek consumed nothing");
            tx.shutdown(Shutdown::Both).unwrap();
            assert_eq!(rx.peek_byte().unwrap(), 0, "the end of the stream reads as 0");
        }
    }

    #[test]
    fn poll_readable_tells_data_and_the_end_apart_from_nothing_yet_without_waiting() {
        // Whether `rx` turns readable within a minute. A loaded test machine may make a
        // yield slow: the crowded rule is off here.
        let shows = |rx: &Stream| {
            let minute = Duration::from_secs(60);
            crate::protocol::spin::spin_with(minute, Duration::MAX, std::thread::yield_now, || rx.poll_readable())
        };
        for (tx, rx) in &connected_pairs() {
            // Blocking streams: it must answer at once rather than wait for data.
            rx.set_read_timeout(None).unwrap();
            assert!(!rx.poll_readable(), "nothing sent yet");
            let mut w = tx;
            w.write_all(b"xy").unwrap();
            assert!(shows(rx), "the data never showed");
            let mut got = [0u8; 2];
            let mut r = rx;
            r.read_exact(&mut got).unwrap();
            assert_eq!(&got, b"xy", "polling consumed nothing");
            assert!(!rx.poll_readable(), "everything was read");
            tx.shutdown(Shutdown::Both).unwrap();
            assert!(shows(rx), "the end of the stream never showed");
        }
    }
}
