//! The control plane: what a server says about itself (ping, info, endpoints, tasks,
//! objects, cache) and the administrative requests it takes (release objects, cancel
//! tasks, drop cache entries), declared once in [`Control`] for every kind of client.
//!
//! Two clients implement it:
//! - [`Client`](crate::net::client::Client), the full client, which also calls endpoints and
//!   receives tensors;
//! - [`ControlClient`], a connection that carries no tensor and reaches nothing of
//!   libtorch: a program that talks to a server only through it (the `shared-tensor`
//!   inspector) starts and works on a machine without libtorch or a GPU.
//!
//! Both open their connection the same way (connect within a window, then the
//! authenticated handshake of [`auth`](mod@crate::protocol::auth)) and speak the same frames
//! ([`wire`]).
//!
//! ```no_run
//! use shared_tensor_runtime::config::Config;
//! use shared_tensor_runtime::control::{Control, ControlClient};
//! let server = ControlClient::connect(&Config::from_env()?)?;
//! println!("{} endpoints, round trip {:?}", server.list_endpoints()?.len(), server.ping()?);
//! # Ok::<(), shared_tensor_runtime::Error>(())
//! ```

use std::io::Write;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::info::{EndpointInfo, ObjectInfo, ServerInfo, TaskInfo, TaskStatus};
use crate::protocol::config::Config;
use crate::protocol::transport::{self, Stream, Transport};
use crate::protocol::wire::{self, ClientMessage, Request, Response, ServerMessage, Welcome};

/// The answer's one expected variant, or a protocol error naming the request.
macro_rules! expect_reply {
    ($response:expr, $what:literal, $pattern:pat => $value:expr) => {
        match $response {
            $pattern => $value,
            other => return Err(unexpected($what, &other)),
        }
    };
}

/// The control requests, for any client: implement [`Control::control`] (send one request,
/// wait for its answer) and every other method comes with it.
///
/// ```no_run
/// use shared_tensor_runtime::control::Control;
/// // Works with the full client and with the tensor-free one alike.
/// fn report(server: &impl Control) -> shared_tensor_runtime::Result<()> {
///     let info = server.server_info()?;
///     println!("server {:016x}: {} endpoints, {} tasks", info.server_id, info.endpoints.len(), server.list_tasks(None)?.len());
///     Ok(())
/// }
/// ```
pub trait Control {
    /// Sends one control request and waits for its answer (within the client's call
    /// timeout). A call request (`Call`, `Submit`) is not a control request: use
    /// [`Client::call`](crate::net::client::Client::call) for those.
    ///
    /// ```no_run
    /// # fn demo(server: &impl shared_tensor_runtime::control::Control) -> shared_tensor_runtime::Result<()> {
    /// use shared_tensor_runtime::wire::{Request, Response};
    /// assert!(matches!(server.control(Request::Ping)?, Response::Pong));
    /// # Ok(()) }
    /// ```
    fn control(&self, request: Request) -> Result<Response>;

    /// Makes sure the connection is open (connecting if needed), so that a following
    /// request measures only itself.
    ///
    /// ```no_run
    /// # fn demo(server: &impl shared_tensor_runtime::control::Control) -> shared_tensor_runtime::Result<()> {
    /// server.ensure_connected()?; // fails fast when there is no server
    /// # Ok(()) }
    /// ```
    fn ensure_connected(&self) -> Result<()>;

    /// The round trip of one request that does nothing (connecting first, not timed).
    ///
    /// ```no_run
    /// # fn demo(server: &impl shared_tensor_runtime::control::Control) -> shared_tensor_runtime::Result<()> {
    /// println!("round trip: {:?}", server.ping()?);
    /// # Ok(()) }
    /// ```
    fn ping(&self) -> Result<Duration> {
        self.ensure_connected()?;
        let start = Instant::now();
        expect_reply!(self.control(Request::Ping)?, "Ping", Response::Pong => ());
        Ok(start.elapsed())
    }

    /// The server's identity, uptime, counters, cache and memory.
    ///
    /// ```no_run
    /// # fn demo(server: &impl shared_tensor_runtime::control::Control) -> shared_tensor_runtime::Result<()> {
    /// let info = server.server_info()?;
    /// println!("pid {}, up {} ms, {} requests", info.pid, info.uptime_ms, info.counters.requests);
    /// # Ok(()) }
    /// ```
    fn server_info(&self) -> Result<ServerInfo> {
        Ok(expect_reply!(self.control(Request::ServerInfo)?, "ServerInfo", Response::ServerInfo(info) => *info))
    }

    /// The endpoints the server serves.
    ///
    /// ```no_run
    /// # fn demo(server: &impl shared_tensor_runtime::control::Control) -> shared_tensor_runtime::Result<()> {
    /// for e in server.list_endpoints()? {
    ///     println!("{}({})", e.name, e.params.join(", "));
    /// }
    /// # Ok(()) }
    /// ```
    fn list_endpoints(&self) -> Result<Vec<EndpointInfo>> {
        Ok(expect_reply!(self.control(Request::ListEndpoints)?, "ListEndpoints", Response::Endpoints(e) => e))
    }

    /// The server's tasks, or those of one status.
    ///
    /// ```no_run
    /// # fn demo(server: &impl shared_tensor_runtime::control::Control) -> shared_tensor_runtime::Result<()> {
    /// use shared_tensor_runtime::task::TaskStatus;
    /// println!("{} running", server.list_tasks(Some(TaskStatus::Running))?.len());
    /// # Ok(()) }
    /// ```
    fn list_tasks(&self, status: Option<TaskStatus>) -> Result<Vec<TaskInfo>> {
        Ok(expect_reply!(self.control(Request::ListTasks(status))?, "ListTasks", Response::Tasks(t) => t))
    }

    /// One task's state.
    ///
    /// ```no_run
    /// # fn demo(server: &impl shared_tensor_runtime::control::Control) -> shared_tensor_runtime::Result<()> {
    /// let task = server.task_info(42)?;
    /// println!("{}: {:?}", task.endpoint, task.status);
    /// # Ok(()) }
    /// ```
    fn task_info(&self, task: u64) -> Result<TaskInfo> {
        Ok(expect_reply!(self.control(Request::TaskInfo(task))?, "TaskInfo", Response::TaskInfo(t) => t))
    }

    /// Cancels a task that has not started; `false` if it already runs or has finished.
    ///
    /// ```no_run
    /// # fn demo(server: &impl shared_tensor_runtime::control::Control) -> shared_tensor_runtime::Result<()> {
    /// if !server.cancel_task(42)? {
    ///     println!("task 42 already started");
    /// }
    /// # Ok(()) }
    /// ```
    fn cancel_task(&self, task: u64) -> Result<bool> {
        Ok(expect_reply!(self.control(Request::CancelTask(task))?, "CancelTask", Response::Cancelled(c) => c))
    }

    /// Releases one reference to each managed object (what dropping a handle does), and
    /// says for each whether it was known.
    ///
    /// ```no_run
    /// # fn demo(server: &impl shared_tensor_runtime::control::Control) -> shared_tensor_runtime::Result<()> {
    /// let known = server.release_many(&[7, 8])?;
    /// assert_eq!(known.len(), 2);
    /// # Ok(()) }
    /// ```
    fn release_many(&self, ids: &[u64]) -> Result<Vec<bool>> {
        Ok(
            expect_reply!(self.control(Request::ReleaseObjects(ids.to_vec()))?, "ReleaseObjects", Response::Released(r) => r),
        )
    }

    /// Removes managed objects from the server's registry whatever their reference
    /// counts (their handles become stale; tensors already received stay valid).
    ///
    /// ```no_run
    /// # fn demo(server: &impl shared_tensor_runtime::control::Control) -> shared_tensor_runtime::Result<()> {
    /// let dropped = server.drop_objects(&[7])?;
    /// println!("object 7: {}", if dropped[0] { "dropped" } else { "unknown" });
    /// # Ok(()) }
    /// ```
    fn drop_objects(&self, ids: &[u64]) -> Result<Vec<bool>> {
        Ok(expect_reply!(self.control(Request::DropObjects(ids.to_vec()))?, "DropObjects", Response::Released(r) => r))
    }

    /// One managed object's state, if the server has it.
    ///
    /// ```no_run
    /// # fn demo(server: &impl shared_tensor_runtime::control::Control) -> shared_tensor_runtime::Result<()> {
    /// if let Some(o) = server.object_info(7)? {
    ///     println!("object 7 of {}: {} references", o.endpoint, o.refcount);
    /// }
    /// # Ok(()) }
    /// ```
    fn object_info(&self, id: u64) -> Result<Option<ObjectInfo>> {
        Ok(expect_reply!(self.control(Request::ObjectInfo(id))?, "ObjectInfo", Response::ObjectInfo(i) => i))
    }

    /// The managed objects the server holds.
    ///
    /// ```no_run
    /// # fn demo(server: &impl shared_tensor_runtime::control::Control) -> shared_tensor_runtime::Result<()> {
    /// println!("{} managed objects", server.list_objects()?.len());
    /// # Ok(()) }
    /// ```
    fn list_objects(&self) -> Result<Vec<ObjectInfo>> {
        Ok(expect_reply!(self.control(Request::ListObjects)?, "ListObjects", Response::Objects(o) => o))
    }

    /// Drops every cache entry of an endpoint; the number dropped. An unknown endpoint
    /// is [`Error::UnknownEndpoint`].
    ///
    /// ```no_run
    /// # fn demo(server: &impl shared_tensor_runtime::control::Control) -> shared_tensor_runtime::Result<()> {
    /// println!("{} entries dropped", server.invalidate_endpoint_cache("load_model")?);
    /// # Ok(()) }
    /// ```
    fn invalidate_endpoint_cache(&self, endpoint: &str) -> Result<u64> {
        Ok(expect_reply!(
            self.control(Request::InvalidateEndpoint(endpoint.into()))?,
            "InvalidateEndpoint",
            Response::Invalidated(n) => n
        ))
    }

    /// Drops one cache entry of an endpoint by its key; whether there was one.
    ///
    /// ```no_run
    /// # fn demo(server: &impl shared_tensor_runtime::control::Control) -> shared_tensor_runtime::Result<()> {
    /// server.invalidate_cache_key("load_model", "model:4096")?;
    /// # Ok(()) }
    /// ```
    fn invalidate_cache_key(&self, endpoint: &str, key: &str) -> Result<bool> {
        let request = Request::InvalidateKey { endpoint: endpoint.into(), key: key.into() };
        Ok(expect_reply!(self.control(request)?, "InvalidateKey", Response::Invalidated(n) => n > 0))
    }
}

/// A reply of the wrong kind.
fn unexpected(what: &str, got: &Response) -> Error {
    Error::Protocol(format!("the server answered {what} with {got:?}"))
}

/// A connection to a server for control requests only: no tensor crosses it, and
/// nothing of libtorch or CUDA is reached through it. Requests are answered in order,
/// one at a time (a `&self` method waits for the one before it).
///
/// It connects at once ([`ControlClient::connect`], within the config's connect
/// timeout) and waits for each answer up to the config's call timeout. A lost server is
/// [`Error::ServerGone`]; there is no reconnect (make a new one).
///
/// ```no_run
/// use shared_tensor_runtime::config::Config;
/// use shared_tensor_runtime::control::{Control, ControlClient};
/// let server = ControlClient::connect(&Config::from_env()?.device_index(1))?;
/// for task in server.list_tasks(None)? {
///     println!("task {} of {}: {:?}", task.id, task.endpoint, task.status);
/// }
/// # Ok::<(), shared_tensor_runtime::Error>(())
/// ```
pub struct ControlClient {
    addr: SocketAddr,
    transport: Transport,
    welcome: Welcome,
    timeout: Duration,
    conn: Mutex<ControlConn>,
}

struct ControlConn {
    stream: Stream,
    buf: Vec<u8>,
    next_id: u64,
    /// Set once a request failed on the socket: the stream's state is unknown after it.
    broken: Option<String>,
}

impl std::fmt::Debug for ControlClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlClient").field("addr", &self.addr).field("server_id", &self.welcome.server_id).finish()
    }
}

impl ControlClient {
    /// Connects to the server of `config`'s device (`127.0.0.1:base_port + device`; with
    /// no device index configured, device 0: this client never probes CUDA), retrying for
    /// the connect timeout while it starts. Fails with
    /// [`Error::ServerUnreachable`] when nothing answers, [`Error::Unauthorized`] when
    /// what answers cannot prove it is a shared-tensor server of this user.
    ///
    /// ```no_run
    /// # fn main() -> shared_tensor_runtime::Result<()> {
    /// use std::time::Duration;
    /// use shared_tensor_runtime::{config::Config, control::ControlClient};
    /// // Fail at once when no server runs (no retry window).
    /// let server = ControlClient::connect(&Config::from_env()?.connect_timeout(Duration::ZERO))?;
    /// println!("connected to {}", server.addr());
    /// # Ok(()) }
    /// ```
    pub fn connect(config: &Config) -> Result<ControlClient> {
        let port = config.port_of(config.get_device_index().unwrap_or(0))?;
        let (stream, welcome) =
            transport::open_stream(port, config.transport, config.connect_timeout, config.shared_token.as_deref())?;
        let transport = stream.transport();
        let conn = ControlConn { stream, buf: Vec::new(), next_id: 1, broken: None };
        let addr = transport::tcp_addr(port);
        Ok(ControlClient { addr, transport, welcome, timeout: config.call_timeout, conn: Mutex::new(conn) })
    }

    /// The server's address (its TCP address, which names it even when the connection
    /// is its Unix socket: see [`ControlClient::transport`]).
    ///
    /// ```no_run
    /// # fn demo(server: &shared_tensor_runtime::control::ControlClient) {
    /// assert!(server.addr().ip().is_loopback());
    /// # }
    /// ```
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The stream this connection is on: [`Transport::Unix`] or [`Transport::Tcp`].
    ///
    /// ```no_run
    /// # fn demo(server: &shared_tensor_runtime::control::ControlClient) {
    /// println!("connected over {}", server.transport());
    /// # }
    /// ```
    pub fn transport(&self) -> Transport {
        self.transport
    }

    /// The id of the server this connection reached (another id later means a restart).
    ///
    /// ```no_run
    /// # fn demo(server: &shared_tensor_runtime::control::ControlClient) {
    /// println!("server {:016x}", server.server_id());
    /// # }
    /// ```
    pub fn server_id(&self) -> u64 {
        self.welcome.server_id
    }

    fn gone(&self, reason: String) -> Error {
        Error::ServerGone { addr: self.addr.to_string(), reason }
    }
}

impl Control for ControlClient {
    fn control(&self, request: Request) -> Result<Response> {
        if matches!(request, Request::Call { .. } | Request::Submit { .. }) {
            return Err(Error::Protocol(
                "a ControlClient carries no tensors: call endpoints through shared_tensor::client::Client".into(),
            ));
        }
        let mut guard = self.conn.lock();
        let conn = &mut *guard;
        if let Some(reason) = &conn.broken {
            return Err(self.gone(reason.clone()));
        }
        let id = conn.next_id;
        conn.next_id += 1;
        conn.buf.clear();
        wire::write_frame(&ClientMessage::Request { id, request }, &mut conn.buf)?;
        /// How a request failed.
        enum Failure {
            /// The server's answer was an error (an unknown endpoint, say): the
            /// connection is fine.
            Server(Error),
            /// No answer in time, or one we could not read: the stream is out of step.
            OutOfStep(Error),
            /// The socket failed: the server is gone.
            Gone(String),
        }
        let result = (|| -> std::result::Result<Response, Failure> {
            conn.stream.write_all(&conn.buf).map_err(|e| Failure::Gone(format!("sending a request failed: {e}")))?;
            let _ = conn.stream.set_read_timeout(Some(self.timeout.max(Duration::from_millis(1))));
            let started = Instant::now();
            loop {
                wire::read_frame(&mut conn.stream, &mut conn.buf).map_err(|e| match e.kind() {
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                        Failure::OutOfStep(Error::Timeout {
                            endpoint: "control request".into(),
                            timeout_ms: started.elapsed().as_millis() as u64,
                        })
                    }
                    _ => Failure::Gone(format!("the connection closed: {e}")),
                })?;
                match wire::decode::<ServerMessage>(&conn.buf).map_err(Failure::OutOfStep)? {
                    ServerMessage::Reply { id: answered, result } if answered == id => {
                        return result.map_err(Failure::Server)
                    }
                    // Nothing is lent on this connection; a stray release names nothing of ours.
                    ServerMessage::Release(_) => continue,
                    other => {
                        return Err(Failure::OutOfStep(Error::Protocol(format!(
                            "unexpected message from the server: {other:?}"
                        ))))
                    }
                }
            }
        })();
        match result {
            Ok(response) => Ok(response),
            Err(Failure::Server(e)) => Err(e),
            Err(Failure::OutOfStep(e)) => {
                conn.broken = Some(e.to_string());
                Err(e)
            }
            Err(Failure::Gone(reason)) => {
                conn.broken = Some(reason.clone());
                Err(self.gone(reason))
            }
        }
    }

    fn ensure_connected(&self) -> Result<()> {
        match &self.conn.lock().broken {
            Some(reason) => Err(self.gone(reason.clone())),
            None => Ok(()),
        }
    }
}
