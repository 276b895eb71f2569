//! The server: serves a process's endpoints to client processes on loopback.
//!
//! One tokio task reads each connection, another writes it. Endpoint bodies run on the
//! blocking pool, never on the reactor, so a slow endpoint does not stall other calls,
//! pings or other clients. When a connection closes (the client exited or was killed),
//! everything lent to it is released: its leases, and its references to managed objects.
//!
//! Start one with the server role (`SHARED_TENSOR_ROLE=server`), or in code with
//! [`serve_in_background`](crate::runtime::serve_in_background) (manual mode).

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr, TcpListener as StdListener};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_util::codec::{FramedRead, LengthDelimitedCodec};

use crate::auth::{self, Secret, Side};
use crate::endpoint::{EndpointDef, EndpointInfo, Registry};
use crate::error::{Error, Result};
use crate::exec::{Core, Counters, Outcome, Prepared};
use crate::ipc::ProcessId;
use crate::lease::{self, Link};
use crate::managed::Holder;
use crate::payload::{Decoder, Received, WirePayload, WireStorage};
use crate::wire::{self, Challenge, ClientMessage, Request, Response, ServerMessage, Welcome};

/// How long a new connection may take to say `Hello`.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A server's identity, counters and endpoints, as `server_info` reports them.
///
/// ```
/// fn summary(info: &shared_tensor_runtime::server::ServerInfo) -> String {
///     format!("{} serving {} endpoints, {} live leases", info.address, info.endpoints.len(), info.live_leases)
/// }
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerInfo {
    /// Random id drawn at start; a restarted server has a new one.
    pub server_id: u64,
    /// shared-tensor version.
    pub version: String,
    /// Protocol version.
    pub protocol: u32,
    /// Server process id.
    pub pid: u32,
    /// Milliseconds since the server started.
    pub uptime_ms: u64,
    /// Listening address.
    pub address: String,
    /// The CUDA device index the port was derived from.
    pub device_index: u32,
    /// The endpoints served.
    pub endpoints: Vec<EndpointInfo>,
    /// Request, error, cache and sharing counters.
    pub counters: Counters,
    /// Retained tasks by status.
    pub tasks: BTreeMap<String, u64>,
    /// Managed objects alive.
    pub managed_objects: u64,
    /// Storages lent to clients and not yet released.
    pub live_leases: u64,
    /// Storages this process holds from clients (argument tensors in use).
    pub imported_storages: u64,
    /// Mappings of clients' GPU memory open in this process (cached or in use).
    pub ipc_mappings: u64,
    /// Open client connections.
    pub connections: u64,
    /// Cache entries.
    pub cache_entries: u64,
    /// GPU memory of the server process on its device (`None` without CUDA).
    pub gpu_memory: Option<crate::cuda::MemoryStats>,
    /// Resident host memory of the server process, in bytes.
    pub host_rss_bytes: u64,
}

pub(crate) struct ServerState {
    core: Arc<Core>,
    secrets: Vec<Secret>,
    registry: Registry,
    addr: SocketAddr,
    device_index: u32,
    next_connection: AtomicU64,
    links: Mutex<HashMap<u64, Arc<Link>>>,
}

impl ServerState {
    fn info(&self) -> ServerInfo {
        let links: Vec<Arc<Link>> = self.links.lock().values().cloned().collect();
        ServerInfo {
            server_id: self.core.server_id,
            version: env!("CARGO_PKG_VERSION").into(),
            protocol: wire::PROTOCOL_VERSION,
            pid: std::process::id(),
            uptime_ms: self.core.started.elapsed().as_millis() as u64,
            address: self.addr.to_string(),
            device_index: self.device_index,
            endpoints: self.registry.infos(),
            counters: self.core.stats.snapshot(),
            tasks: self.core.tasks.count_by_status(),
            managed_objects: self.core.objects.count() as u64,
            live_leases: links.iter().map(|l| l.live_leases() as u64).sum(),
            imported_storages: lease::live_imports() as u64,
            ipc_mappings: crate::ipc::open_mappings(),
            connections: links.len() as u64,
            cache_entries: self.core.cache_len() as u64,
            gpu_memory: (crate::cuda::device_count() > 0)
                .then(|| crate::cuda::memory_stats(self.device_index).ok())
                .flatten(),
            host_rss_bytes: resident_bytes(),
        }
    }
}

/// Resident memory of this process (Linux `/proc/self/status`), 0 if unreadable.
fn resident_bytes() -> u64 {
    // VmRSS is in kB whatever the page size (statm counts pages).
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = status.lines().find_map(|l| l.strip_prefix("VmRSS:")?.trim().strip_suffix("kB")?.trim().parse().ok());
    kib.unwrap_or(0u64) * 1024
}

/// A running server. Dropping it stops accepting connections; [`ServerHandle::shutdown`]
/// does so explicitly.
///
/// ```no_run
/// # fn demo(server: &shared_tensor_runtime::server::ServerHandle) {
/// let info = server.info();
/// println!("{} on {}: {} connections", info.server_id, server.addr(), info.connections);
/// server.shutdown();
/// # }
/// ```
pub struct ServerHandle {
    state: Arc<ServerState>,
    stop: watch::Sender<bool>,
}

impl std::fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandle").field("addr", &self.state.addr).finish()
    }
}

impl ServerHandle {
    /// The address it listens on.
    ///
    /// ```no_run
    /// # fn demo(server: &shared_tensor_runtime::server::ServerHandle) {
    /// assert!(server.addr().ip().is_loopback());
    /// println!("listening on port {}", server.addr().port());
    /// # }
    /// ```
    pub fn addr(&self) -> SocketAddr {
        self.state.addr
    }

    /// Its identity and counters.
    ///
    /// ```no_run
    /// # fn demo(server: &shared_tensor_runtime::server::ServerHandle) {
    /// let info = server.info();
    /// println!("{} requests, {} bytes shared", info.counters.requests, info.counters.bytes_shared);
    /// # }
    /// ```
    pub fn info(&self) -> ServerInfo {
        self.state.info()
    }

    /// Stops accepting connections and closes open ones.
    ///
    /// ```no_run
    /// # fn demo(server: &shared_tensor_runtime::server::ServerHandle) {
    /// server.shutdown(); // clients' next calls fail with Error::ServerGone
    /// # }
    /// ```
    pub fn shutdown(&self) {
        self.stop.send_replace(true);
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Decodes an endpoint's arguments (and computes its cache key).
fn decode(def: &'static EndpointDef, received: Received) -> Result<Prepared> {
    (def.dispatch)(&mut Decoder::new(received, ""))
}

/// Binds `127.0.0.1:port` and serves `registry` through `core` on `rt`.
pub(crate) fn start(
    rt: &tokio::runtime::Handle,
    core: Arc<Core>,
    registry: Registry,
    port: u16,
    device_index: u32,
    shared_token: Option<&str>,
) -> Result<ServerHandle> {
    if let Err(e) = crate::ffi::raise_open_files_limit() {
        tracing::warn!(error = %e, "cannot raise the open-files limit; many clients may exhaust it");
    }
    let want = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let std_listener =
        StdListener::bind(want).map_err(|e| Error::Bind { addr: want.to_string(), reason: e.to_string() })?;
    std_listener.set_nonblocking(true).map_err(|e| Error::io("configuring the listener", &e))?;
    let addr = std_listener.local_addr().map_err(|e| Error::io("reading the listener's address", &e))?;
    let listener = {
        let _enter = rt.enter();
        TcpListener::from_std(std_listener).map_err(|e| Error::io("registering the listener", &e))?
    };
    // After binding (a server already on the port keeps its token), before accepting
    // (clients read the token once challenged).
    let secrets = auth::server_secrets(addr.port(), shared_token)?;
    let state = Arc::new(ServerState {
        core,
        secrets,
        registry,
        addr,
        device_index,
        next_connection: AtomicU64::new(1),
        links: Mutex::new(HashMap::new()),
    });
    let (stop, stopped) = watch::channel(false);
    rt.spawn(accept_loop(listener, state.clone(), stopped));
    tracing::info!(%addr, "shared-tensor server listening");
    Ok(ServerHandle { state, stop })
}

async fn accept_loop(listener: TcpListener, state: Arc<ServerState>, stopped: watch::Receiver<bool>) {
    let mut stop = stopped.clone();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(connection(state.clone(), stream, stopped.clone()));
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = until_stopped(&mut stop) => break,
        }
    }
}

/// Resolves when the server is told to stop (the guard `wait_for` returns is not `Send`,
/// so it is dropped here rather than held in a `select!`).
async fn until_stopped(stopped: &mut watch::Receiver<bool>) {
    let _ = stopped.wait_for(|s| *s).await;
}

/// What the writer task sends.
enum Out {
    /// A whole frame.
    Frame(Vec<u8>),
    /// A client lease this process has released; batched into one `Release` frame.
    Release(u64),
}

fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder().length_field_length(4).max_frame_length(wire::MAX_FRAME_BYTES).new_codec()
}

fn frame(msg: &ServerMessage) -> Vec<u8> {
    let mut out = Vec::new();
    if let Err(e) = wire::write_frame(msg, &mut out) {
        // Only a reply can be too large to frame: answer with the error instead.
        if let ServerMessage::Reply { id, .. } = msg {
            out.clear();
            let _ = wire::write_frame(&ServerMessage::Reply { id: *id, result: Err(e) }, &mut out);
        }
    }
    out
}

async fn write_loop(mut wr: OwnedWriteHalf, mut rx: mpsc::UnboundedReceiver<Out>) {
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut releases = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(out) = next {
            match out {
                Out::Frame(bytes) => buf.extend_from_slice(&bytes),
                Out::Release(lease) => releases.push(lease),
            }
            next = rx.try_recv().ok();
        }
        // Releases go after every frame queued before them (see lease::Link).
        if !releases.is_empty() {
            buf.extend(frame(&ServerMessage::Release(std::mem::take(&mut releases))));
        }
        if wr.write_all(&buf).await.is_err() {
            break;
        }
        buf.clear();
    }
}

async fn connection(state: Arc<ServerState>, stream: TcpStream, mut stopped: watch::Receiver<bool>) {
    let _ = stream.set_nodelay(true);
    let id = state.next_connection.fetch_add(1, Ordering::Relaxed);
    let (rd, wr) = stream.into_split();
    let mut frames = FramedRead::new(rd, codec());
    let (tx, rx) = mpsc::unbounded_channel::<Out>();
    let writer = tokio::spawn(write_loop(wr, rx));

    let peer = match handshake(&state, &mut frames, &tx).await {
        Ok(peer) => peer,
        Err(refusal) => {
            if let Some(error) = refusal {
                tracing::debug!(connection = id, %error, "handshake refused");
                let _ = tx.send(Out::Frame(frame(&ServerMessage::Refused(error))));
            }
            drop(tx);
            let _ = writer.await;
            return;
        }
    };
    let welcome = Welcome {
        protocol: wire::PROTOCOL_VERSION,
        server_id: state.core.server_id,
        server: ProcessId::current(),
        version: env!("CARGO_PKG_VERSION").into(),
    };
    let _ = tx.send(Out::Frame(frame(&ServerMessage::Welcome(welcome))));

    let sink = tx.clone();
    let link = Link::new(Box::new(move |lease| {
        let _ = sink.send(Out::Release(lease));
    }));
    state.links.lock().insert(id, link.clone());
    let conn = Conn { state: state.clone(), id, link: link.clone(), tx: tx.clone() };
    loop {
        let body = tokio::select! {
            next = frames.next() => match next {
                Some(Ok(body)) => body,
                Some(Err(e)) => {
                    tracing::debug!(connection = id, error = %e, "unreadable frame; closing");
                    let error = Error::Protocol(format!("unreadable frame: {e}"));
                    let _ = tx.send(Out::Frame(frame(&ServerMessage::Refused(error))));
                    break;
                }
                None => break,
            },
            _ = until_stopped(&mut stopped) => break,
        };
        match wire::decode::<ClientMessage>(&body) {
            Ok(ClientMessage::Release(leases)) => link.released(&leases),
            Ok(ClientMessage::Request { id: request_id, request }) => conn.handle(request_id, request),
            Ok(ClientMessage::Hello(_) | ClientMessage::Auth(_)) => {
                let error = Error::Protocol("a handshake message after the handshake".into());
                let _ = tx.send(Out::Frame(frame(&ServerMessage::Refused(error))));
                break;
            }
            Err(error) => {
                tracing::debug!(connection = id, %error, "malformed message; closing");
                let _ = tx.send(Out::Frame(frame(&ServerMessage::Refused(error))));
                break;
            }
        }
    }
    // Everything lent to this client goes back; its managed references are released.
    state.links.lock().remove(&id);
    link.close();
    state.core.release_holder(Holder::Connection(id));
    // Keep no mapping of a departed client's memory alive for it.
    crate::ipc::forget_producer(&peer);
    drop(frames);
    // Every sender must go for the writer to finish: the link's release sink holds one,
    // calls still running hold theirs until they reply.
    drop((conn, link, tx));
    let _ = writer.await;
}

/// The next frame of the handshake, decoded; `None` if the client went silent or away.
async fn handshake_message(
    frames: &mut FramedRead<OwnedReadHalf, LengthDelimitedCodec>,
) -> Option<Result<ClientMessage>> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, frames.next()).await {
        Ok(Some(Ok(body))) => Some(wire::decode::<ClientMessage>(&body)),
        _ => None,
    }
}

/// Hello, Challenge, Auth (see [`auth`](crate::auth)). `Err(Some(e))` is refused with a
/// reason, `Err(None)` is a client that went silent or away.
async fn handshake(
    state: &ServerState,
    frames: &mut FramedRead<OwnedReadHalf, LengthDelimitedCodec>,
    tx: &mpsc::UnboundedSender<Out>,
) -> std::result::Result<ProcessId, Option<Error>> {
    let hello = match handshake_message(frames).await.ok_or(None)? {
        Ok(ClientMessage::Hello(h)) if h.protocol == wire::PROTOCOL_VERSION => h,
        Ok(ClientMessage::Hello(h)) => {
            return Err(Some(Error::ProtocolMismatch { ours: wire::PROTOCOL_VERSION, theirs: h.protocol }))
        }
        Ok(_) => return Err(Some(Error::Protocol("the first message must be Hello".into()))),
        Err(e) => return Err(Some(e)),
    };
    let nonce = auth::nonce();
    let proofs = state.secrets.iter().map(|s| s.proof(Side::Server, &hello.nonce)).collect();
    let challenge = Challenge { protocol: wire::PROTOCOL_VERSION, nonce, proofs };
    let _ = tx.send(Out::Frame(frame(&ServerMessage::Challenge(challenge))));
    match handshake_message(frames).await.ok_or(None)? {
        Ok(ClientMessage::Auth(proof)) if state.secrets.iter().any(|s| s.verify(Side::Client, &nonce, &proof)) => {
            Ok(hello.client)
        }
        Ok(ClientMessage::Auth(_)) => Err(Some(Error::Unauthorized {
            reason: "the client's proof matches no secret of this server: it does not run as the server's user \
                     and shares no SHARED_TENSOR_TOKEN with it"
                .into(),
        })),
        Ok(_) => Err(Some(Error::Unauthorized { reason: "the client sent a request before proving itself".into() })),
        Err(e) => Err(Some(e)),
    }
}

/// One client connection, as the request handlers see it.
#[derive(Clone)]
struct Conn {
    state: Arc<ServerState>,
    id: u64,
    link: Arc<Link>,
    tx: mpsc::UnboundedSender<Out>,
}

impl Conn {
    fn reply(&self, id: u64, result: Result<Response>) {
        let _ = self.tx.send(Out::Frame(frame(&ServerMessage::Reply { id, result })));
    }

    fn holder(&self) -> Holder {
        Holder::Connection(self.id)
    }

    /// Handles one request: calls and waits off the reactor, the rest inline.
    fn handle(&self, id: u64, request: Request) {
        let core = &self.state.core;
        let result = match request {
            Request::Call { endpoint, args } => return self.spawn_call(id, endpoint, args, false),
            Request::Submit { endpoint, args } => return self.spawn_call(id, endpoint, args, true),
            Request::WaitTask(task) => return self.spawn_wait(id, task),
            Request::Ping => Ok(Response::Pong),
            Request::ServerInfo => Ok(Response::ServerInfo(Box::new(self.state.info()))),
            Request::ListEndpoints => Ok(Response::Endpoints(self.state.registry.infos())),
            Request::TaskInfo(task) => core.tasks.get(task).map(|t| Response::TaskInfo(t.info())),
            Request::CancelTask(task) => core.tasks.get(task).map(|t| Response::Cancelled(t.cancel())),
            Request::ListTasks(status) => Ok(Response::Tasks(core.tasks.list(status))),
            Request::ReleaseObjects(ids) => Ok(Response::Released(core.release_objects(&ids, self.holder()))),
            Request::DropObjects(ids) => Ok(Response::Released(core.drop_objects(&ids))),
            Request::ObjectInfo(object) => Ok(Response::ObjectInfo(core.objects.info(object))),
            Request::ListObjects => Ok(Response::Objects(core.objects.list())),
            Request::InvalidateEndpoint(endpoint) => {
                Ok(Response::Invalidated(core.invalidate_endpoint(&endpoint) as u64))
            }
            Request::InvalidateKey { endpoint, key } => {
                Ok(Response::Invalidated(u64::from(core.invalidate_key(&endpoint, &key))))
            }
        };
        self.reply(id, result);
    }

    fn spawn_call(&self, id: u64, endpoint: String, args: WirePayload, submit: bool) {
        // Pin returned storages now, in message order, before a later Release can drop them.
        let received = args.receive(&self.link);
        let def = match self.state.registry.get(&endpoint) {
            Ok(def) => def,
            Err(e) => return self.reply(id, Err(e)),
        };
        if submit {
            // Submitting decodes the arguments, creates the record and starts the task on
            // the blocking pool: nothing here waits or runs endpoint code, so no handoff.
            let result = decode(def, received).and_then(|p| self.state.core.submit(def, p.key, p.body));
            return self.reply(id, result.map(Response::Task));
        }
        if !def.options.cache {
            return self.spawn_run(id, def, move || decode(def, received));
        }
        // A cached endpoint's arguments are decoded here: a hit is answered at once,
        // without handing the call to another thread (no endpoint code runs for it).
        let prepared = match decode(def, received) {
            Ok(p) => p,
            Err(e) => return self.reply(id, Err(e)),
        };
        match prepared.key.as_deref().and_then(|k| self.state.core.try_hit(def, k, self.holder())) {
            Some(hit) => {
                let result = self.respond(&hit);
                self.reply(id, result);
                drop(hit); // after the reply, so releases it causes follow it
            }
            None => self.spawn_run(id, def, move || Ok(prepared)),
        }
    }

    /// Runs a call on the blocking pool (the body may take any time) and replies.
    fn spawn_run(
        &self,
        id: u64,
        def: &'static EndpointDef,
        prepare: impl FnOnce() -> Result<Prepared> + Send + 'static,
    ) {
        let conn = self.clone();
        tokio::task::spawn_blocking(move || {
            let (result, keep) = match prepare() {
                Ok(prepared) => conn.run(def, prepared),
                Err(e) => (Err(e), None),
            };
            conn.reply(id, result);
            // The outcome goes after the reply is queued, so releases it causes follow it.
            drop(keep);
        });
    }

    fn run(&self, def: &'static EndpointDef, prepared: Prepared) -> (Result<Response>, Option<Outcome>) {
        match self.state.core.call(def, prepared.key, self.holder(), prepared.body) {
            Ok(outcome) => (self.respond(&outcome), Some(outcome)),
            Err(e) => (Err(e), None),
        }
    }

    /// The reply for an outcome. A managed reference that cannot be delivered is released.
    fn respond(&self, outcome: &Outcome) -> Result<Response> {
        match outcome.lend(&self.link) {
            Ok((object, payload)) => {
                let bytes: u64 = payload
                    .storages
                    .iter()
                    .map(|s| match s {
                        WireStorage::Shared { storage, .. } => storage.nbytes,
                        WireStorage::Returned { .. } => 0,
                    })
                    .sum();
                self.state.core.stats.bytes_shared.fetch_add(bytes, Ordering::Relaxed);
                Ok(Response::Value { object, payload })
            }
            Err(e) => {
                if let Outcome::Object { id, .. } = outcome {
                    self.state.core.release_objects(&[*id], self.holder());
                }
                Err(e)
            }
        }
    }

    fn spawn_wait(&self, id: u64, task: u64) {
        let conn = self.clone();
        tokio::spawn(async move {
            let record = match conn.state.core.tasks.get(task) {
                Ok(r) => r,
                Err(e) => return conn.reply(id, Err(e)),
            };
            record.wait_async().await;
            // Collecting a finished task never waits and runs no endpoint code: answer here.
            let (result, keep) = match conn.state.core.collect(&record, conn.holder()) {
                Ok(o) => (conn.respond(&o), Some(o)),
                Err(e) => (Err(e), None),
            };
            conn.reply(id, result);
            drop(keep);
        });
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn resident_memory_is_read_in_bytes() {
        let before = super::resident_bytes();
        let block = vec![1u8; 64 << 20]; // touched: resident
        let after = super::resident_bytes();
        assert!(before > 1 << 20, "a running test process has more than 1 MiB resident: {before}");
        assert!(after >= before + (48 << 20), "64 MiB touched: {before} -> {after}");
        drop(block);
    }
}
