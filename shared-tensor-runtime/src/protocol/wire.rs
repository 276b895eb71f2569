//! The wire protocol between a client process and a server process.
//!
//! One connection per client process, local only: the server's Unix socket or TCP
//! loopback (see [`transport`](crate::protocol::transport)). Every message is a frame: a
//! 4-byte big-endian length, then a MessagePack body, written by [`write_frame`] and read
//! by one codec on both ends ([`frame_len`] is its rule). A frame longer than
//! [`MAX_FRAME_BYTES`] is refused from its length prefix alone, before any buffer is
//! allocated for it. The connection is multiplexed: requests carry ids, replies come back
//! in any order, and many threads call at once over one connection.
//!
//! The conversation:
//! 1. the handshake: `Hello`, `Challenge`, `Auth`, then `Welcome` (or `Refused` with the
//!    reason, and the connection closes); both sides prove they share a secret (see
//!    [`auth`](crate::protocol::auth)) before anything else is served;
//! 2. the client sends `Request`s; the server answers each with one `Reply`;
//! 3. either side sends `Release` when it has dropped the last tensor over storages the
//!    other side lent it (leases).
//!
//! Tensors are never in a frame by value: a value's tensors are IPC descriptors.

use std::fmt;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::info::{EndpointInfo, ObjectInfo, ProcessId, ServerInfo, TaskInfo, TaskStatus};
use crate::protocol::auth::Bytes32;

/// Version of this protocol; both sides must speak the same.
///
/// ```
/// use shared_tensor_runtime::wire::PROTOCOL_VERSION;
/// let peer_protocol = 5; // from the peer's `Challenge` or `Welcome`
/// assert_eq!(peer_protocol, PROTOCOL_VERSION, "both sides must speak the same protocol");
/// ```
pub const PROTOCOL_VERSION: u32 = 5;

pub use super::frame::{frame_len, read_frame, write_frame, FrameTooLarge, MAX_FRAME_BYTES, PREFIX_BYTES};

/// The client's first message.
///
/// ```
/// # fn main() -> shared_tensor_runtime::Result<()> {
/// use shared_tensor_runtime::{auth, ipc::ProcessId, wire};
/// let hello = wire::Hello { protocol: wire::PROTOCOL_VERSION, client: ProcessId::current(), nonce: auth::nonce() };
/// let mut out = Vec::new();
/// wire::write_frame(&wire::ClientMessage::Hello(hello), &mut out)?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// The client's protocol version.
    pub protocol: u32,
    /// The client process.
    pub client: ProcessId,
    /// The client's challenge to the server (see [`auth`](crate::protocol::auth)).
    pub nonce: Bytes32,
}

/// The server's answer to `Hello`: its proofs over the client's nonce, and its own
/// challenge.
///
/// ```
/// use shared_tensor_runtime::auth::{self, Secret, Side};
/// use shared_tensor_runtime::wire::{Challenge, PROTOCOL_VERSION};
/// let (secret, client_nonce) = (Secret::shared("team-token"), auth::nonce());
/// let proofs = vec![secret.proof(Side::Server, &client_nonce)];
/// let challenge = Challenge { protocol: PROTOCOL_VERSION, nonce: auth::nonce(), proofs };
/// assert!(secret.verify(Side::Server, &client_nonce, &challenge.proofs[0]));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Challenge {
    /// The server's protocol version.
    pub protocol: u32,
    /// The server's challenge to the client.
    pub nonce: Bytes32,
    /// One proof per secret the server accepts.
    pub proofs: Vec<Bytes32>,
}

/// The server's answer to a good `Auth`: the connection is open for requests.
///
/// ```
/// use shared_tensor_runtime::{ipc::ProcessId, wire::{ServerMessage, Welcome}};
/// # let reply = ServerMessage::Welcome(Welcome {
/// #     protocol: 1, server_id: 42, server: ProcessId::current(), version: "0.1.0".into() });
/// if let ServerMessage::Welcome(w) = reply {
///     println!("server {} (pid {}), shared-tensor {}", w.server_id, w.server.pid, w.version);
/// }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The server's protocol version.
    pub protocol: u32,
    /// The server's id, new at each start (handles use it to tell a restarted server).
    pub server_id: u64,
    /// The server process.
    pub server: ProcessId,
    /// The server's shared-tensor version.
    pub version: String,
}

/// What a client asks.
///
/// ```
/// use shared_tensor_runtime::payload::{Node, PackedPayload, WirePayload};
/// use shared_tensor_runtime::wire::{ClientMessage, Request};
/// let args = PackedPayload::pack(&WirePayload::plain(Node::Seq(vec![]))).unwrap();
/// let call = Request::Call { endpoint: "identity".into(), args, deadline_ms: Some(30_000) };
/// let msg = ClientMessage::Request { id: 1, request: call };
/// # let _ = msg;
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// Call an endpoint and wait for its result.
    Call {
        /// The endpoint.
        endpoint: String,
        /// The arguments: a sequence node, one element per parameter.
        args: PackedPayload,
        /// How long the caller waits, in milliseconds from when the server reads the
        /// request: past it, a call still pending there (queued, or waiting for a
        /// serialized endpoint) is cancelled, and a running body sees
        /// [`task::is_cancelled`](crate::exec::task::is_cancelled). `None`: no deadline.
        #[serde(default)]
        deadline_ms: Option<u64>,
    },
    /// Submit an endpoint call as a task; the reply is the task id.
    Submit {
        /// The endpoint.
        endpoint: String,
        /// The arguments.
        args: PackedPayload,
    },
    /// A round trip with no work.
    Ping,
    /// The server's identity, counters and endpoints.
    ServerInfo,
    /// The server's endpoints.
    ListEndpoints,
    /// One task's status.
    TaskInfo(u64),
    /// The result of a task, replied when it ends.
    WaitTask(u64),
    /// Cancel a pending task.
    CancelTask(u64),
    /// Tasks, optionally of one status.
    ListTasks(Option<TaskStatus>),
    /// Release one reference each to these managed objects.
    ReleaseObjects(Vec<u64>),
    /// Remove managed objects whatever their references (an operator's decision).
    DropObjects(Vec<u64>),
    /// One managed object's registry entry.
    ObjectInfo(u64),
    /// All managed objects.
    ListObjects,
    /// Drop every cache entry of an endpoint.
    InvalidateEndpoint(String),
    /// Drop one cache entry.
    InvalidateKey {
        /// The endpoint.
        endpoint: String,
        /// The cache key.
        key: String,
    },
}

impl Request {
    /// The request's kind, as errors and logs name it (`"Ping"`, `"ListTasks"`, ...).
    ///
    /// ```
    /// use shared_tensor_runtime::wire::Request;
    /// assert_eq!(Request::ListTasks(None).kind(), "ListTasks");
    /// assert_eq!(Request::InvalidateKey { endpoint: "m".into(), key: "k".into() }.kind(), "InvalidateKey");
    /// ```
    pub fn kind(&self) -> &'static str {
        match self {
            Request::Call { .. } => "Call",
            Request::Submit { .. } => "Submit",
            Request::Ping => "Ping",
            Request::ServerInfo => "ServerInfo",
            Request::ListEndpoints => "ListEndpoints",
            Request::TaskInfo(_) => "TaskInfo",
            Request::WaitTask(_) => "WaitTask",
            Request::CancelTask(_) => "CancelTask",
            Request::ListTasks(_) => "ListTasks",
            Request::ReleaseObjects(_) => "ReleaseObjects",
            Request::DropObjects(_) => "DropObjects",
            Request::ObjectInfo(_) => "ObjectInfo",
            Request::ListObjects => "ListObjects",
            Request::InvalidateEndpoint(_) => "InvalidateEndpoint",
            Request::InvalidateKey { .. } => "InvalidateKey",
        }
    }
}

/// What a server answers.
///
/// ```
/// use shared_tensor_runtime::wire::{Response, ServerMessage};
/// let reply = ServerMessage::Reply { id: 7, result: Ok(Response::Cancelled(true)) };
/// if let ServerMessage::Reply { id, result: Ok(Response::Cancelled(done)) } = reply {
///     println!("request {id}: the task was cancelled: {done}");
/// }
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// A value; `object` is set for a managed result.
    Value {
        /// The managed object id.
        object: Option<u64>,
        /// The value.
        payload: PackedPayload,
    },
    /// A submitted task's id.
    Task(u64),
    /// Answer to `Ping`.
    Pong,
    /// Answer to `ServerInfo`.
    ServerInfo(Box<ServerInfo>),
    /// Answer to `ListEndpoints`.
    Endpoints(Vec<EndpointInfo>),
    /// Answer to `TaskInfo`.
    TaskInfo(TaskInfo),
    /// Answer to `ListTasks`.
    Tasks(Vec<TaskInfo>),
    /// Answer to `CancelTask`: whether it was pending and is now cancelled.
    Cancelled(bool),
    /// Answer to `ReleaseObjects`: per id, whether this connection held it.
    Released(Vec<bool>),
    /// Answer to `ObjectInfo`.
    ObjectInfo(Option<ObjectInfo>),
    /// Answer to `ListObjects`.
    Objects(Vec<ObjectInfo>),
    /// Answer to the invalidations: how many cache entries went.
    Invalidated(u64),
}

/// A message from client to server.
///
/// ```
/// # fn main() -> shared_tensor_runtime::Result<()> {
/// use shared_tensor_runtime::wire::{write_frame, ClientMessage, Request};
/// let mut out = Vec::new();
/// write_frame(&ClientMessage::Request { id: 1, request: Request::Ping }, &mut out)?;
/// write_frame(&ClientMessage::Release(vec![3, 4]), &mut out)?; // leases given back
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ClientMessage {
    /// The handshake's first step.
    Hello(Hello),
    /// The handshake's last step: the client's proof over the server's nonce.
    Auth(Bytes32),
    /// A request, answered by the `Reply` with the same id.
    Request {
        /// Chosen by the client, unique among its pending requests.
        id: u64,
        /// What is asked.
        request: Request,
    },
    /// Leases of the server that the client has released.
    Release(Vec<u64>),
    /// Managed objects whose handles the client dropped: one reference each is
    /// released. Not answered (`Request::ReleaseObjects` is, for callers that want the
    /// outcome); ordered before every later request of the client.
    ReleaseObjects(Vec<u64>),
}

/// A message from server to client.
///
/// ```
/// # fn main() -> shared_tensor_runtime::Result<()> {
/// use shared_tensor_runtime::{wire::{write_frame, ServerMessage}, Error};
/// let refused = ServerMessage::Refused(Error::Protocol("no secret matches the client's proof".into()));
/// let mut out = Vec::new();
/// write_frame(&refused, &mut out)?; // then the server closes the connection
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ServerMessage {
    /// The handshake's second step.
    Challenge(Challenge),
    /// The handshake succeeded.
    Welcome(Welcome),
    /// The handshake failed; the server closes the connection.
    Refused(Error),
    /// The answer to a request.
    Reply {
        /// The request's id.
        id: u64,
        /// The answer, or the error.
        result: std::result::Result<Response, Error>,
    },
    /// Leases of the client that the server has released.
    Release(Vec<u64>),
}

/// Decodes a frame body.
///
/// ```
/// # fn main() -> shared_tensor_runtime::Result<()> {
/// use shared_tensor_runtime::wire::{decode, write_frame, ClientMessage};
/// let mut frame = Vec::new();
/// write_frame(&ClientMessage::Release(vec![7]), &mut frame)?;
/// let msg: ClientMessage = decode(&frame[4..])?; // the body follows the 4-byte length
/// assert_eq!(msg, ClientMessage::Release(vec![7]));
/// # Ok(()) }
/// ```
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T> {
    rmp_serde::from_slice(body).map_err(|e| Error::Protocol(format!("malformed message: {e}")))
}

/// A `WirePayload` (see `payload`) as it travels: one MessagePack binary in a compact fixed layout
/// (tag bytes and fixed-width fields, see `docs/architecture.md`), which is what call
/// arguments and results carry. A sender packs straight from its own tables (a cached
/// result is lent without copying them); [`PackedPayload::unpack`] checks every length,
/// tag and dtype, so a corrupt payload is an error naming what is wrong and where.
///
/// ```
/// # fn main() -> shared_tensor_runtime::Result<()> {
/// use shared_tensor_runtime::payload::{Node, PackedPayload, WirePayload};
/// let value = WirePayload::plain(Node::Seq(vec![Node::Unit, Node::Opt(None)]));
/// let packed = PackedPayload::pack(&value)?;
/// assert_eq!(packed.unpack()?, value);
/// assert!(PackedPayload::from_bytes(vec![9, 9]).unpack().is_err());
/// # Ok(()) }
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct PackedPayload(pub(crate) Vec<u8>);

impl PackedPayload {
    /// The packed bytes.
    ///
    /// ```
    /// use shared_tensor_runtime::payload::{Node, PackedPayload, WirePayload};
    /// let packed = PackedPayload::pack(&WirePayload::plain(Node::Unit)).unwrap();
    /// assert_eq!(packed.as_bytes().last(), Some(&0)); // the unit node's tag
    /// ```
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Wraps bytes received some other way (unchecked until [`PackedPayload::unpack`]).
    ///
    /// ```
    /// use shared_tensor_runtime::payload::{Node, PackedPayload, WirePayload};
    /// let packed = PackedPayload::pack(&WirePayload::plain(Node::Unit)).unwrap();
    /// let copy = PackedPayload::from_bytes(packed.as_bytes().to_vec());
    /// assert_eq!(copy, packed);
    /// ```
    pub fn from_bytes(bytes: Vec<u8>) -> PackedPayload {
        PackedPayload(bytes)
    }
}

impl fmt::Debug for PackedPayload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PackedPayload({} bytes)", self.0.len())
    }
}

impl Serialize for PackedPayload {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for PackedPayload {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        struct Bytes;
        impl<'de> serde::de::Visitor<'de> for Bytes {
            type Value = PackedPayload;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a packed payload (binary)")
            }
            fn visit_bytes<E: serde::de::Error>(self, bytes: &[u8]) -> std::result::Result<PackedPayload, E> {
                Ok(PackedPayload(bytes.to_vec()))
            }
            fn visit_byte_buf<E: serde::de::Error>(self, bytes: Vec<u8>) -> std::result::Result<PackedPayload, E> {
                Ok(PackedPayload(bytes))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<PackedPayload, A::Error> {
                // Formats without a binary type (JSON) carry the bytes as a sequence.
                let mut bytes = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 16));
                while let Some(b) = seq.next_element::<u8>()? {
                    bytes.push(b);
                }
                Ok(PackedPayload(bytes))
            }
        }
        deserializer.deserialize_bytes(Bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let msg = ClientMessage::Request {
            id: 7,
            request: Request::Call {
                endpoint: "identity".into(),
                // A payload's bytes travel as they are (they are checked when unpacked).
                args: PackedPayload::from_bytes(vec![0, 1, 2, 0xff]),
                deadline_ms: Some(5),
            },
        };
        let mut out = Vec::new();
        write_frame(&msg, &mut out).unwrap();
        write_frame(&ClientMessage::Release(vec![1, 2]), &mut out).unwrap();
        let mut cursor = std::io::Cursor::new(out);
        let mut buf = Vec::new();
        read_frame(&mut cursor, &mut buf).unwrap();
        assert_eq!(decode::<ClientMessage>(&buf).unwrap(), msg);
        read_frame(&mut cursor, &mut buf).unwrap();
        assert_eq!(decode::<ClientMessage>(&buf).unwrap(), ClientMessage::Release(vec![1, 2]));
    }

    #[test]
    fn malformed_messages_are_errors() {
        assert!(matches!(decode::<ClientMessage>(&[0xc1, 0xff, 0x00]), Err(Error::Protocol(_))));
    }
}
