//! Bad input on the wire: each gets an error reply or a closed connection, and the server
//! keeps serving everyone else. No GPU needed.

#[path = "endpoints.rs"]
mod endpoints;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::OnceLock;
use std::time::Duration;

use shared_tensor::auth::{self, Side};
use shared_tensor::client::Client;
use shared_tensor::config::{Config, Role};
use shared_tensor::ipc::ProcessId;
use shared_tensor::payload::{Node, PackedPayload, WirePayload};
use shared_tensor::wire::{self, ClientMessage, Hello, Request, Response, ServerMessage, PROTOCOL_VERSION};
use shared_tensor::Error;
use shared_tensor_tests::free_port;

static PORT: OnceLock<u16> = OnceLock::new();

fn port() -> u16 {
    *PORT.get_or_init(|| {
        let port = free_port();
        shared_tensor::configure(Config::default().role(Role::Local).base_port(port).device_index(0)).unwrap();
        shared_tensor::serve_in_background(None).unwrap();
        port
    })
}

fn raw() -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port())).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

fn send(s: &mut TcpStream, msg: &ClientMessage) {
    let mut buf = Vec::new();
    wire::write_frame(msg, &mut buf).unwrap();
    s.write_all(&buf).unwrap();
}

fn recv(s: &mut TcpStream) -> Option<ServerMessage> {
    let mut buf = Vec::new();
    wire::read_frame(s, &mut buf).ok().map(|_| wire::decode(&buf).unwrap())
}

/// The whole handshake, as a client of this user does it.
fn hello(s: &mut TcpStream) {
    let nonce = auth::nonce();
    send(s, &ClientMessage::Hello(Hello { protocol: PROTOCOL_VERSION, client: ProcessId::current(), nonce }));
    let Some(ServerMessage::Challenge(c)) = recv(s) else { panic!("no challenge") };
    let secret = auth::client_secret(port(), None).unwrap();
    assert!(c.proofs.iter().any(|p| secret.verify(Side::Server, &nonce, p)), "the server proves itself");
    send(s, &ClientMessage::Auth(secret.proof(Side::Client, &c.nonce)));
    assert!(matches!(recv(s), Some(ServerMessage::Welcome(_))));
}

/// The connection ends (EOF) after at most one more frame.
fn closes(s: &mut TcpStream) -> Option<ServerMessage> {
    let first = recv(s);
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "the server kept talking after refusing");
    first
}

/// Someone else is still served.
fn still_serving() {
    let client = Client::new(&Config::default().base_port(port()).device_index(0)).unwrap();
    client.call::<(), _>("noop", ()).unwrap();
}

#[test]
fn a_length_prefix_over_the_limit_closes_that_connection_only() {
    let mut s = raw();
    hello(&mut s);
    s.write_all(&u32::MAX.to_be_bytes()).unwrap();
    s.write_all(&[0u8; 64]).unwrap();
    match closes(&mut s) {
        Some(ServerMessage::Refused(Error::Protocol(m))) => assert!(m.contains("frame"), "{m}"),
        other => panic!("{other:?}"),
    }
    still_serving();
}

#[test]
fn malformed_messagepack_is_refused() {
    let mut s = raw();
    hello(&mut s);
    s.write_all(&[0, 0, 0, 3, 0xc1, 0xff, 0x00]).unwrap();
    assert!(matches!(closes(&mut s), Some(ServerMessage::Refused(Error::Protocol(_)))));
    still_serving();
}

#[test]
fn a_handshake_with_another_version_is_refused_with_both_versions() {
    let mut s = raw();
    send(&mut s, &ClientMessage::Hello(Hello { protocol: 999, client: ProcessId::current(), nonce: auth::nonce() }));
    match closes(&mut s) {
        Some(ServerMessage::Refused(Error::ProtocolMismatch { ours, theirs })) => {
            assert_eq!((ours, theirs), (PROTOCOL_VERSION, 999))
        }
        other => panic!("{other:?}"),
    }
    still_serving();
}

#[test]
fn requests_before_the_handshake_are_refused() {
    let mut s = raw();
    send(&mut s, &ClientMessage::Request { id: 1, request: Request::Ping });
    assert!(matches!(closes(&mut s), Some(ServerMessage::Refused(Error::Protocol(_)))));
    still_serving();
}

#[test]
fn a_truncated_frame_then_a_hang_up_leaves_the_server_fine() {
    let mut s = raw();
    hello(&mut s);
    s.write_all(&[0, 0, 0, 100, 1, 2, 3]).unwrap();
    drop(s);
    still_serving();
}

#[test]
fn a_thousand_idle_connections_do_not_stop_others_from_being_served() {
    // Half never say anything, half finish the handshake and then stay silent.
    let mut idle: Vec<TcpStream> = (0..500).map(|_| raw()).collect();
    for _ in 0..500 {
        let mut s = raw();
        hello(&mut s);
        idle.push(s);
    }
    let started = std::time::Instant::now();
    still_serving();
    println!("1,000 idle connections open; another client was served in {:?}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// Sends a call and returns its reply, collecting the releases that come before it.
fn call(
    s: &mut TcpStream,
    id: u64,
    endpoint: &str,
    args: WirePayload,
    released: &mut Vec<u64>,
) -> Result<Response, Error> {
    call_packed(s, id, endpoint, PackedPayload::pack(&args).unwrap(), released)
}

/// [`call`] with arguments already packed (or deliberately malformed).
fn call_packed(
    s: &mut TcpStream,
    id: u64,
    endpoint: &str,
    args: PackedPayload,
    released: &mut Vec<u64>,
) -> Result<Response, Error> {
    send(
        s,
        &ClientMessage::Request { id, request: Request::Call { endpoint: endpoint.into(), args, deadline_ms: None } },
    );
    loop {
        match recv(s) {
            Some(ServerMessage::Reply { id: got, result }) => {
                assert_eq!(got, id);
                return result;
            }
            Some(ServerMessage::Release(leases)) => released.extend(leases),
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn bad_calls_get_error_replies_on_a_connection_that_stays_up() {
    let mut s = raw();
    hello(&mut s);
    let mut released = Vec::new();
    let no_args = || WirePayload::plain(Node::Seq(vec![]));
    assert!(matches!(call(&mut s, 1, "nope", no_args(), &mut released), Err(Error::UnknownEndpoint { .. })));
    let wrong = WirePayload::plain(Node::Seq(vec![Node::Unit]));
    assert!(matches!(call(&mut s, 2, "noop", wrong, &mut released), Err(Error::BadArguments { .. })));
    let not_a_seq = WirePayload::plain(Node::Unit);
    assert!(matches!(call(&mut s, 3, "noop", not_a_seq, &mut released), Err(Error::BadArguments { .. })));
    // A descriptor whose IPC handle is garbage is refused before any tensor is built.
    let bogus = shared_tensor::payload::one_shared_f32x4(
        vec![7; 66],
        ProcessId { pid: 1, instance: 1 },
        Node::Seq(vec![Node::Tensor(0)]),
    );
    match call(&mut s, 4, "identity", bogus, &mut released) {
        Err(Error::CudaUnavailable { .. } | Error::Cuda { .. } | Error::DeviceNotVisible { .. }) => {}
        other => panic!("{other:?}"),
    }
    // A tensor index that is not in the message.
    let dangling = WirePayload::plain(Node::Seq(vec![Node::Tensor(9)]));
    assert!(matches!(call(&mut s, 5, "identity", dangling, &mut released), Err(Error::BadArguments { .. })));
    // Arguments whose packed form is corrupt: an error naming the fault, not a closed connection.
    // (No regions, one storage whose tag is 7.)
    let corrupt = PackedPayload::from_bytes([0, 0, 0, 0, 1, 0, 0, 0, 7].into_iter().chain([0; 20]).collect());
    match call_packed(&mut s, 7, "noop", corrupt, &mut released) {
        Err(Error::Protocol(m)) => assert!(m.contains("malformed payload: unknown storage tag 7"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(call(&mut s, 6, "noop", no_args(), &mut released), Ok(Response::Value { object: None, .. })));
    // The storage it never opened was released to us, the "client", at once.
    assert_eq!(released, vec![1]);
    still_serving();
}
