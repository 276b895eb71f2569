//! The client: one connection per process to the server of a device, shared by every
//! thread, with no async runtime required.
//!
//! A calling thread writes its request itself (with any pending releases in the same
//! write) and sleeps until the reader thread hands it the reply; it then opens the
//! reply's tensors on its own thread. Failures are contained: a call that times out fails
//! alone, a lost connection fails the calls in flight with [`Error::ServerGone`], and the
//! next call connects again.
//!
//! Most code never sees this type: `#[share]` functions use the process's client in the
//! client role. Use it directly for manual mode: calling a server by endpoint name from a
//! process that does not link the endpoint definitions.

use std::collections::HashMap;
use std::future::Future;
use std::io::Write;
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::task::AtomicWaker;
use parking_lot::{Condvar, Mutex};

use crate::auth::{self, Side};
use crate::config::Config;
use crate::endpoint::EndpointInfo;
use crate::error::{Error, Result};
use crate::handle::{from_answer, Backend, Output, TaskHandle};
use crate::ipc::ProcessId;
use crate::lease::Link;
use crate::managed::ObjectInfo;
use crate::payload::{Args, Encoded, Encoder, Node, Received};
use crate::server::ServerInfo;
use crate::task::{TaskInfo, TaskStatus};
use crate::wire::{self, ClientMessage, Hello, Request, Response, ServerMessage, Welcome};

/// A reply as the reader hands it over: a value's storages already pinned.
pub(crate) enum Answer {
    Value { object: Option<u64>, received: Received },
    Other(Response),
}

impl Answer {
    fn response(self, what: &str) -> Result<Response> {
        match self {
            Answer::Other(r) => Ok(r),
            Answer::Value { .. } => Err(Error::Protocol(format!("the server answered {what} with a value"))),
        }
    }
}

/// Where a reply lands: the waiting thread (or future) sleeps on it.
#[derive(Default)]
struct Slot {
    answer: Mutex<Option<Result<Answer>>>,
    cv: Condvar,
    waker: AtomicWaker,
}

impl Slot {
    fn fill(&self, answer: Result<Answer>) {
        *self.answer.lock() = Some(answer);
        self.cv.notify_one();
        self.waker.wake();
    }

    fn wait(&self, deadline: Option<Instant>) -> Option<Result<Answer>> {
        let mut answer = self.answer.lock();
        while answer.is_none() {
            match deadline {
                Some(d) => {
                    if self.cv.wait_until(&mut answer, d).timed_out() {
                        return answer.take();
                    }
                }
                None => self.cv.wait(&mut answer),
            }
        }
        answer.take()
    }
}

struct SlotFuture(Arc<Slot>);

impl Future for SlotFuture {
    type Output = Result<Answer>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Some(a) = self.0.answer.lock().take() {
            return Poll::Ready(a);
        }
        self.0.waker.register(cx.waker());
        match self.0.answer.lock().take() {
            Some(a) => Poll::Ready(a),
            None => Poll::Pending,
        }
    }
}

/// Releases of the server's leases, waiting to be sent.
#[derive(Default)]
struct Releases {
    queue: Mutex<Vec<u64>>,
    cv: Condvar,
}

struct Connection {
    addr: SocketAddr,
    writer: Mutex<TcpStream>,
    link: Arc<Link>,
    pending: Mutex<HashMap<u64, Arc<Slot>>>,
    next_id: AtomicU64,
    releases: Arc<Releases>,
    dead: AtomicBool,
    welcome: Welcome,
}

impl Connection {
    fn open(addr: SocketAddr, window: Duration, shared_token: Option<&str>) -> Result<Arc<Connection>> {
        let started = Instant::now();
        let stream = loop {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                Ok(s) => break s,
                Err(e) if started.elapsed() >= window => {
                    return Err(Error::ServerUnreachable {
                        addr: addr.to_string(),
                        reason: e.to_string(),
                        waited_ms: started.elapsed().as_millis() as u64,
                    })
                }
                Err(_) => std::thread::sleep(Duration::from_millis(25)),
            }
        };
        let _ = stream.set_nodelay(true);
        let welcome = handshake(&stream, addr, shared_token)?;
        let mut reader = stream.try_clone().map_err(|e| Error::io("cloning the socket", &e))?;
        let releases = Arc::new(Releases::default());
        let sink = releases.clone();
        let link = Link::new(Box::new(move |lease| {
            let mut q = sink.queue.lock();
            q.push(lease);
            if q.len() == 1 {
                sink.cv.notify_one();
            }
        }));
        let conn = Arc::new(Connection {
            addr,
            writer: Mutex::new(stream),
            link,
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            releases,
            dead: AtomicBool::new(false),
            welcome,
        });
        let c = conn.clone();
        std::thread::Builder::new()
            .name("shared-tensor-reader".into())
            .spawn(move || c.read_loop(&mut reader))
            .map_err(|e| Error::io("starting the reader thread", &e))?;
        let c = conn.clone();
        std::thread::Builder::new()
            .name("shared-tensor-releases".into())
            .spawn(move || c.release_loop())
            .map_err(|e| Error::io("starting the release thread", &e))?;
        Ok(conn)
    }

    fn read_loop(&self, stream: &mut TcpStream) {
        let mut buf = Vec::new();
        let reason = loop {
            if let Err(e) = wire::read_frame(stream, &mut buf) {
                break if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    "the server closed the connection".to_string()
                } else {
                    e.to_string()
                };
            }
            match wire::decode::<ServerMessage>(&buf) {
                Ok(ServerMessage::Reply { id, result }) => {
                    let answer = result.map(|r| match r {
                        Response::Value { object, payload } => {
                            Answer::Value { object, received: payload.receive(&self.link) }
                        }
                        other => Answer::Other(other),
                    });
                    let slot = self.pending.lock().remove(&id);
                    // No slot: the call timed out; dropping the answer releases its leases.
                    if let Some(slot) = slot {
                        slot.fill(answer);
                    }
                }
                Ok(ServerMessage::Release(leases)) => self.link.released(&leases),
                Ok(ServerMessage::Refused(e)) => break e.to_string(),
                Ok(ServerMessage::Welcome(_) | ServerMessage::Challenge(_)) => {
                    break "the server sent a handshake message after the handshake".into()
                }
                Err(e) => break e.to_string(),
            }
        };
        self.fail(&reason);
    }

    /// Marks the connection dead and fails every call in flight.
    fn fail(&self, reason: &str) {
        if self.dead.swap(true, Ordering::AcqRel) {
            return;
        }
        tracing::debug!(addr = %self.addr, reason, "connection lost");
        let _ = self.writer.lock().shutdown(Shutdown::Both);
        self.link.close();
        crate::ipc::forget_producer(&self.welcome.server);
        let pending: Vec<Arc<Slot>> = self.pending.lock().drain().map(|(_, s)| s).collect();
        for slot in pending {
            slot.fill(Err(self.gone(reason)));
        }
        self.releases.cv.notify_one();
    }

    fn gone(&self, reason: &str) -> Error {
        Error::ServerGone { addr: self.addr.to_string(), reason: reason.to_string() }
    }

    fn release_loop(&self) {
        loop {
            let batch = {
                let mut q = self.releases.queue.lock();
                while q.is_empty() && !self.dead.load(Ordering::Acquire) {
                    self.releases.cv.wait(&mut q);
                }
                if self.dead.load(Ordering::Acquire) {
                    return;
                }
                std::mem::take(&mut *q)
            };
            let mut buf = Vec::new();
            if wire::write_frame(&ClientMessage::Release(batch), &mut buf).is_ok() {
                let _ = self.writer.lock().write_all(&buf);
            }
        }
    }

    /// Sends a request (with any queued releases) and registers its reply slot.
    fn send(&self, request: Request) -> Result<(u64, Arc<Slot>)> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let slot = Arc::new(Slot::default());
        let mut buf = Vec::new();
        let releases = std::mem::take(&mut *self.releases.queue.lock());
        if !releases.is_empty() {
            wire::write_frame(&ClientMessage::Release(releases), &mut buf)?;
        }
        wire::write_frame(&ClientMessage::Request { id, request }, &mut buf)?;
        self.pending.lock().insert(id, slot.clone());
        if self.dead.load(Ordering::Acquire) {
            self.pending.lock().remove(&id);
            return Err(self.gone("the connection was already lost"));
        }
        if let Err(e) = self.writer.lock().write_all(&buf) {
            self.pending.lock().remove(&id);
            self.fail(&e.to_string());
            return Err(self.gone(&e.to_string()));
        }
        Ok((id, slot))
    }

    fn shutdown(&self) {
        self.fail("the client was dropped");
    }
}

/// Hello, Challenge, Auth, Welcome (see [`auth`](crate::auth)).
fn handshake(stream: &TcpStream, addr: SocketAddr, shared_token: Option<&str>) -> Result<Welcome> {
    let mut writer = stream;
    let mut reader = stream;
    let send = |msg: &ClientMessage, w: &mut &TcpStream| -> Result<()> {
        let mut buf = Vec::new();
        wire::write_frame(msg, &mut buf)?;
        w.write_all(&buf).map_err(|e| Error::io("sending the handshake", &e))
    };
    let mut buf = Vec::new();
    let mut receive = |r: &mut &TcpStream| -> Result<ServerMessage> {
        wire::read_frame(r, &mut buf).map_err(|e| Error::ServerGone {
            addr: addr.to_string(),
            reason: format!("no answer to the handshake: {e}"),
        })?;
        wire::decode::<ServerMessage>(&buf)
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let nonce = auth::nonce();
    send(
        &ClientMessage::Hello(Hello { protocol: wire::PROTOCOL_VERSION, client: ProcessId::current(), nonce }),
        &mut writer,
    )?;
    let challenge = match receive(&mut reader)? {
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
    send(&ClientMessage::Auth(secret.proof(Side::Client, &challenge.nonce)), &mut writer)?;
    let welcome = match receive(&mut reader)? {
        ServerMessage::Welcome(w) => w,
        ServerMessage::Refused(e) => return Err(e),
        _ => return Err(Error::Protocol("the server did not answer Auth with Welcome".into())),
    };
    let _ = stream.set_read_timeout(None);
    Ok(welcome)
}

struct ClientInner {
    addr: SocketAddr,
    config: Config,
    conn: Mutex<Option<Arc<Connection>>>,
    connected_once: AtomicBool,
}

impl Drop for ClientInner {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.lock().take() {
            conn.shutdown();
        }
    }
}

/// A connection to the server of one device. Cheap to clone (clones share the connection).
///
/// ```no_run
/// use shared_tensor_runtime::{client::Client, config::Config};
/// let client = Client::new(&Config::from_env()?)?;
/// println!("round trip: {:?}", client.ping()?);
/// for endpoint in client.list_endpoints()? {
///     println!("{}({})", endpoint.name, endpoint.params.join(", "));
/// }
/// # Ok::<(), shared_tensor_runtime::Error>(())
/// ```
#[derive(Clone)]
pub struct Client {
    inner: Arc<ClientInner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("addr", &self.inner.addr).finish()
    }
}

impl Client {
    /// A client for the server of `config`'s device (`127.0.0.1:base_port + device`).
    /// It connects on first use, retrying for the connect timeout while the server starts.
    ///
    /// ```no_run
    /// # fn main() -> shared_tensor_runtime::Result<()> {
    /// use shared_tensor_runtime::{client::Client, config::Config};
    /// let client = Client::new(&Config::from_env()?.device_index(1))?;
    /// println!("server of device 1: {}", client.addr());
    /// # Ok(()) }
    /// ```
    pub fn new(config: &Config) -> Result<Client> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, config.port()?));
        Ok(Client::at(addr, config.clone()))
    }

    pub(crate) fn at(addr: SocketAddr, config: Config) -> Client {
        Client {
            inner: Arc::new(ClientInner {
                addr,
                config,
                conn: Mutex::new(None),
                connected_once: AtomicBool::new(false),
            }),
        }
    }

    /// The server's address.
    ///
    /// ```no_run
    /// # fn demo(client: &shared_tensor_runtime::client::Client) -> shared_tensor_runtime::Result<()> {
    /// assert!(client.addr().ip().is_loopback());
    /// println!("calling the server on port {}", client.addr().port());
    /// # Ok(()) }
    /// ```
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    fn connection(&self) -> Result<Arc<Connection>> {
        let mut current = self.inner.conn.lock();
        if let Some(conn) = current.as_ref() {
            if !conn.dead.load(Ordering::Acquire) {
                return Ok(conn.clone());
            }
        }
        // The retry window covers the start-up race; after a loss, one attempt: a call
        // to a server that is gone fails at once, and a restarted one is reconnected to.
        let window = if self.inner.connected_once.load(Ordering::Acquire) {
            Duration::ZERO
        } else {
            self.inner.config.connect_timeout
        };
        let conn = Connection::open(self.inner.addr, window, self.inner.config.shared_token.as_deref())?;
        self.inner.connected_once.store(true, Ordering::Release);
        *current = Some(conn.clone());
        Ok(conn)
    }

    /// Connects now (normally done by the first call).
    ///
    /// ```no_run
    /// # fn demo(client: &shared_tensor_runtime::client::Client) -> shared_tensor_runtime::Result<()> {
    /// // Fail fast at start-up instead of on the first call.
    /// client.connect()?;
    /// # Ok(()) }
    /// ```
    pub fn connect(&self) -> Result<()> {
        self.connection().map(|_| ())
    }

    /// The id of the server currently connected to.
    ///
    /// ```no_run
    /// # fn demo(client: &shared_tensor_runtime::client::Client) -> shared_tensor_runtime::Result<()> {
    /// let first = client.server_id()?;
    /// // ... later: another id means the server restarted (managed handles are stale).
    /// if client.server_id()? != first {
    ///     println!("the server restarted");
    /// }
    /// # Ok(()) }
    /// ```
    pub fn server_id(&self) -> Result<u64> {
        Ok(self.connection()?.welcome.server_id)
    }

    fn name_of(request: &Request) -> String {
        match request {
            Request::Call { endpoint, .. } | Request::Submit { endpoint, .. } => endpoint.clone(),
            Request::WaitTask(task) => format!("task {task}"),
            other => format!("{other:?}").split(['(', ' ', '{']).next().unwrap_or("request").to_string(),
        }
    }

    /// Sends a request and waits for its answer (blocking).
    pub(crate) fn request(&self, request: Request, timeout: Option<Duration>) -> Result<Answer> {
        let name = Self::name_of(&request);
        let conn = self.connection()?;
        let (id, slot) = conn.send(request)?;
        let deadline = timeout.map(|t| Instant::now() + t);
        match slot.wait(deadline) {
            Some(answer) => answer,
            None => {
                conn.pending.lock().remove(&id);
                Err(Error::Timeout { endpoint: name, timeout_ms: timeout.unwrap_or_default().as_millis() as u64 })
            }
        }
    }

    /// Sends a request and awaits its answer.
    pub(crate) async fn request_async(&self, request: Request, timeout: Option<Duration>) -> Result<Answer> {
        let name = Self::name_of(&request);
        let conn = self.connection()?;
        let (id, slot) = conn.send(request)?;
        let fut = SlotFuture(slot);
        match timeout {
            None => fut.await,
            Some(t) => match tokio::time::timeout(t, fut).await {
                Ok(answer) => answer,
                Err(_) => {
                    conn.pending.lock().remove(&id);
                    Err(Error::Timeout { endpoint: name, timeout_ms: t.as_millis() as u64 })
                }
            },
        }
    }

    /// A call's request: lends the encoded arguments over the current connection.
    pub(crate) fn call_request(&self, endpoint: &str, args: &Encoded, submit: bool) -> Result<Request> {
        let conn = self.connection()?;
        let args = args.lend(&conn.link)?;
        let endpoint = endpoint.to_string();
        Ok(if submit { Request::Submit { endpoint, args } } else { Request::Call { endpoint, args } })
    }

    pub(crate) fn call_timeout(&self) -> Duration {
        self.inner.config.call_timeout
    }

    fn encode<V>(args: &impl Args<V>) -> Result<Encoded> {
        let mut enc = Encoder::new("");
        let nodes = args.encode_args(&mut enc)?;
        Ok(enc.finish(Node::Seq(nodes)))
    }

    /// Calls an endpoint by name with typed arguments (manual mode: no need to link the
    /// endpoint's definition). `O` is the result type, or `Managed<result>` for a managed
    /// endpoint.
    ///
    /// ```no_run
    /// # fn demo(client: &shared_tensor_runtime::client::Client, x: &tch::Tensor) -> shared_tensor_runtime::Result<()> {
    /// let y: tch::Tensor = client.call("identity", (x,))?;
    /// # Ok(()) }
    /// ```
    pub fn call<O: Output, V>(&self, endpoint: &str, args: impl Args<V>) -> Result<O> {
        let encoded = Self::encode(&args)?;
        drop(args);
        let request = self.call_request(endpoint, &encoded, false)?;
        let answer = self.request(request, Some(self.call_timeout()))?;
        drop(encoded);
        from_answer(answer, &Backend::remote(self.clone()), endpoint)
    }

    /// Submits an endpoint call by name as a task.
    ///
    /// ```no_run
    /// # fn demo(client: &shared_tensor_runtime::client::Client) -> shared_tensor_runtime::Result<()> {
    /// use shared_tensor_runtime::handle::TaskHandle;
    /// let task: TaskHandle<tch::Tensor> = client.submit("train_step", (4i64,))?;
    /// println!("submitted task {}", task.id());
    /// let loss = task.wait()?;
    /// # let _ = loss;
    /// # Ok(()) }
    /// ```
    pub fn submit<O: Output, V>(&self, endpoint: &str, args: impl Args<V>) -> Result<TaskHandle<O>> {
        let encoded = Self::encode(&args)?;
        drop(args);
        let request = self.call_request(endpoint, &encoded, true)?;
        match self.request(request, Some(self.call_timeout()))? {
            Answer::Other(Response::Task(id)) => Ok(TaskHandle::new(id, endpoint, Backend::remote(self.clone()))),
            _ => Err(Error::Protocol(format!("the server answered a submit of {endpoint} without a task id"))),
        }
    }

    /// A handle to a task known by id.
    ///
    /// ```no_run
    /// # fn demo(client: &shared_tensor_runtime::client::Client) -> shared_tensor_runtime::Result<()> {
    /// // A task submitted elsewhere (another thread or process), known by its id.
    /// let handle = client.task::<tch::Tensor>(42)?;
    /// let result = handle.wait()?;
    /// # let _ = result;
    /// # Ok(()) }
    /// ```
    pub fn task<O: Output>(&self, task: u64) -> Result<TaskHandle<O>> {
        let endpoint = self.task_info(task)?.endpoint;
        Ok(TaskHandle::new(task, &endpoint, Backend::remote(self.clone())))
    }

    fn control(&self, request: Request) -> Result<Response> {
        let what = Self::name_of(&request);
        self.request(request, Some(self.call_timeout()))?.response(&what)
    }

    /// Round-trip time of a request that does no work.
    ///
    /// ```no_run
    /// # fn demo(client: &shared_tensor_runtime::client::Client) -> shared_tensor_runtime::Result<()> {
    /// let rtt = client.ping()?;
    /// println!("round trip: {rtt:?}");
    /// # Ok(()) }
    /// ```
    pub fn ping(&self) -> Result<Duration> {
        self.connection()?;
        let start = Instant::now();
        self.control(Request::Ping)?;
        Ok(start.elapsed())
    }

    /// The server's identity, counters and endpoints.
    ///
    /// ```no_run
    /// # fn demo(client: &shared_tensor_runtime::client::Client) -> shared_tensor_runtime::Result<()> {
    /// let info = client.server_info()?;
    /// println!("server {} (pid {}), {} endpoints", info.server_id, info.pid, info.endpoints.len());
    /// println!("{} live leases, {} managed objects", info.live_leases, info.managed_objects);
    /// # Ok(()) }
    /// ```
    pub fn server_info(&self) -> Result<ServerInfo> {
        match self.control(Request::ServerInfo)? {
            Response::ServerInfo(info) => Ok(*info),
            other => Err(unexpected("ServerInfo", &other)),
        }
    }

    /// The server's endpoints.
    ///
    /// ```no_run
    /// # fn demo(client: &shared_tensor_runtime::client::Client) -> shared_tensor_runtime::Result<()> {
    /// for endpoint in client.list_endpoints()? {
    ///     println!("{}({}) cached: {}", endpoint.name, endpoint.params.join(", "), endpoint.cache);
    /// }
    /// # Ok(()) }
    /// ```
    pub fn list_endpoints(&self) -> Result<Vec<EndpointInfo>> {
        match self.control(Request::ListEndpoints)? {
            Response::Endpoints(e) => Ok(e),
            other => Err(unexpected("ListEndpoints", &other)),
        }
    }

    /// Tasks on the server, optionally only those with `status`.
    ///
    /// ```no_run
    /// # fn demo(client: &shared_tensor_runtime::client::Client) -> shared_tensor_runtime::Result<()> {
    /// use shared_tensor_runtime::task::TaskStatus;
    /// for task in client.list_tasks(Some(TaskStatus::Running))? {
    ///     println!("task {} running {}", task.id, task.endpoint);
    /// }
    /// # Ok(()) }
    /// ```
    pub fn list_tasks(&self, status: Option<TaskStatus>) -> Result<Vec<TaskInfo>> {
        match self.control(Request::ListTasks(status))? {
            Response::Tasks(t) => Ok(t),
            other => Err(unexpected("ListTasks", &other)),
        }
    }

    /// One task's status.
    ///
    /// ```no_run
    /// # fn demo(client: &shared_tensor_runtime::client::Client) -> shared_tensor_runtime::Result<()> {
    /// let info = client.task_info(42)?;
    /// println!("task 42 ({}): {:?}", info.endpoint, info.status);
    /// # Ok(()) }
    /// ```
    pub fn task_info(&self, task: u64) -> Result<TaskInfo> {
        match self.control(Request::TaskInfo(task))? {
            Response::TaskInfo(t) => Ok(t),
            other => Err(unexpected("TaskInfo", &other)),
        }
    }

    /// Cancels a pending task; false if it already started or ended.
    ///
    /// ```no_run
    /// # fn demo(client: &shared_tensor_runtime::client::Client) -> shared_tensor_runtime::Result<()> {
    /// if !client.cancel_task(42)? {
    ///     println!("task 42 already started or ended");
    /// }
    /// # Ok(()) }
    /// ```
    pub fn cancel_task(&self, task: u64) -> Result<bool> {
        match self.control(Request::CancelTask(task))? {
            Response::Cancelled(c) => Ok(c),
            other => Err(unexpected("CancelTask", &other)),
        }
    }

    /// Releases one reference to each managed object; per id, whether this client held
    /// it (an unknown id is a no-op that answers false).
    ///
    /// ```no_run
    /// # fn demo(client: &shared_tensor_runtime::client::Client) -> shared_tensor_runtime::Result<()> {
    /// let held = client.release_many(&[7, 8])?;
    /// assert_eq!(held.len(), 2);
    /// # Ok(()) }
    /// ```
    pub fn release_many(&self, ids: &[u64]) -> Result<Vec<bool>> {
        match self.control(Request::ReleaseObjects(ids.to_vec()))? {
            Response::Released(r) => Ok(r),
            other => Err(unexpected("ReleaseObjects", &other)),
        }
    }

    /// Removes managed objects from the server's registry whatever their references (an
    /// operator's action): handles to them become stale, tensors already received stay
    /// valid. Per id, whether it existed.
    ///
    /// ```no_run
    /// # fn demo(client: &shared_tensor_runtime::client::Client) -> shared_tensor_runtime::Result<()> {
    /// // Evict every managed object of one endpoint, whoever holds it.
    /// let objects = client.list_objects()?;
    /// let ids: Vec<u64> = objects.iter().filter(|o| o.endpoint == "load_model").map(|o| o.object_id).collect();
    /// client.drop_objects(&ids)?;
    /// # Ok(()) }
    /// ```
    pub fn drop_objects(&self, ids: &[u64]) -> Result<Vec<bool>> {
        match self.control(Request::DropObjects(ids.to_vec()))? {
            Response::Released(r) => Ok(r),
            other => Err(unexpected("DropObjects", &other)),
        }
    }

    /// A managed object's registry entry, if it exists.
    ///
    /// ```no_run
    /// # fn demo(client: &shared_tensor_runtime::client::Client) -> shared_tensor_runtime::Result<()> {
    /// match client.object_info(7)? {
    ///     Some(o) => println!("object 7 of {}: {} references", o.endpoint, o.refcount),
    ///     None => println!("object 7 is gone"),
    /// }
    /// # Ok(()) }
    /// ```
    pub fn object_info(&self, id: u64) -> Result<Option<ObjectInfo>> {
        match self.control(Request::ObjectInfo(id))? {
            Response::ObjectInfo(i) => Ok(i),
            other => Err(unexpected("ObjectInfo", &other)),
        }
    }

    /// All managed objects on the server.
    ///
    /// ```no_run
    /// # fn demo(client: &shared_tensor_runtime::client::Client) -> shared_tensor_runtime::Result<()> {
    /// for o in client.list_objects()? {
    ///     println!("{} {} key={:?} refs={}", o.object_id, o.endpoint, o.cache_key, o.refcount);
    /// }
    /// # Ok(()) }
    /// ```
    pub fn list_objects(&self) -> Result<Vec<ObjectInfo>> {
        match self.control(Request::ListObjects)? {
            Response::Objects(o) => Ok(o),
            other => Err(unexpected("ListObjects", &other)),
        }
    }

    /// Drops every cache entry of an endpoint on the server; returns how many there were.
    /// Handles already issued stay valid.
    ///
    /// ```no_run
    /// # fn demo(client: &shared_tensor_runtime::client::Client) -> shared_tensor_runtime::Result<()> {
    /// let dropped = client.invalidate_endpoint_cache("load_model")?;
    /// println!("dropped {dropped} cached results");
    /// # Ok(()) }
    /// ```
    pub fn invalidate_endpoint_cache(&self, endpoint: &str) -> Result<u64> {
        match self.control(Request::InvalidateEndpoint(endpoint.into()))? {
            Response::Invalidated(n) => Ok(n),
            other => Err(unexpected("InvalidateEndpoint", &other)),
        }
    }

    /// Drops one cache entry (by its key); true if it existed.
    ///
    /// ```no_run
    /// # fn demo(client: &shared_tensor_runtime::client::Client) -> shared_tensor_runtime::Result<()> {
    /// // The key as rendered from `cache_key = "model:{hidden_size}"`.
    /// let existed = client.invalidate_cache_key("load_model", "model:1024")?;
    /// # let _ = existed;
    /// # Ok(()) }
    /// ```
    pub fn invalidate_cache_key(&self, endpoint: &str, key: &str) -> Result<bool> {
        match self.control(Request::InvalidateKey { endpoint: endpoint.into(), key: key.into() })? {
            Response::Invalidated(n) => Ok(n > 0),
            other => Err(unexpected("InvalidateKey", &other)),
        }
    }
}

fn unexpected(what: &str, got: &Response) -> Error {
    Error::Protocol(format!("the server answered {what} with {got:?}"))
}
