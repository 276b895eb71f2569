//! Same user only, by default: a client proves it runs as the server's user (or shares
//! SHARED_TENSOR_TOKEN with it) before any request reaches an endpoint. No GPU needed.

#[path = "endpoints.rs"]
mod endpoints;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::sync::OnceLock;
use std::time::Duration;

use shared_tensor::auth::{self, Secret, Side};
use shared_tensor::client::Client;
use shared_tensor::config::{Config, Role};
use shared_tensor::ipc::ProcessId;
use shared_tensor::wire::{self, ClientMessage, Hello, Request, ServerMessage, PROTOCOL_VERSION};
use shared_tensor::Error;
use shared_tensor_tests::{free_port, helper_bin};

const SHARED: &str = "team-secret-for-tests";

static PORT: OnceLock<u16> = OnceLock::new();

/// A server that accepts its own user and holders of the shared token.
fn port() -> u16 {
    *PORT.get_or_init(|| {
        let port = free_port();
        shared_tensor::configure(
            Config::default().role(Role::Local).base_port(port).device_index(0).shared_token(SHARED),
        )
        .unwrap();
        shared_tensor::serve_in_background(None).unwrap();
        port
    })
}

fn frame(s: &mut TcpStream, msg: &ClientMessage) {
    let mut buf = Vec::new();
    wire::write_frame(msg, &mut buf).unwrap();
    s.write_all(&buf).unwrap();
}

fn answer(s: &mut TcpStream) -> Option<ServerMessage> {
    let mut buf = Vec::new();
    wire::read_frame(s, &mut buf).ok().map(|_| wire::decode(&buf).unwrap())
}

/// Sends Hello, returns the server's challenge.
fn challenged(s: &mut TcpStream) -> (auth::Bytes32, wire::Challenge) {
    let nonce = auth::nonce();
    frame(s, &ClientMessage::Hello(Hello { protocol: PROTOCOL_VERSION, client: ProcessId::current(), nonce }));
    match answer(s) {
        Some(ServerMessage::Challenge(c)) => (nonce, c),
        other => panic!("{other:?}"),
    }
}

fn connect() -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port())).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

fn refused_and_closed(s: &mut TcpStream) -> Error {
    let e = match answer(s) {
        Some(ServerMessage::Refused(e)) => e,
        other => panic!("{other:?}"),
    };
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "the server closes after refusing");
    e
}

#[test]
fn a_request_before_the_proof_never_reaches_an_endpoint() {
    let mut s = connect();
    challenged(&mut s);
    let args = shared_tensor::payload::WirePayload::plain(shared_tensor::payload::Node::Seq(vec![
        shared_tensor::payload::Node::Data(rmp_serde::to_vec(&4242i64).unwrap()),
    ]));
    let args = shared_tensor::payload::PackedPayload::pack(&args).unwrap();
    frame(
        &mut s,
        &ClientMessage::Request {
            id: 1,
            request: Request::Call { endpoint: "parallel_work".into(), args, deadline_ms: None },
        },
    );
    // The server closed the connection at the refusal: its reader ended there, so no
    // frame after it is ever dispatched (nothing to wait for).
    assert!(matches!(refused_and_closed(&mut s), Error::Unauthorized { .. }));
    assert!(endpoints::runs("parallel_work", Some(4242)).is_empty(), "the endpoint never ran");
}

#[test]
fn a_wrong_proof_is_refused_with_the_reason() {
    let mut s = connect();
    let (_, c) = challenged(&mut s);
    frame(&mut s, &ClientMessage::Auth(Secret::shared("guess").proof(Side::Client, &c.nonce)));
    match refused_and_closed(&mut s) {
        Error::Unauthorized { reason } => assert!(reason.contains("SHARED_TENSOR_TOKEN"), "{reason}"),
        other => panic!("{other:?}"),
    }
    // A client with another shared token learns the server cannot prove itself to it.
    let client = Client::new(&Config::default().base_port(port()).device_index(0).shared_token("other")).unwrap();
    match client.call::<(), _>("noop", ()) {
        Err(Error::Unauthorized { reason }) => assert!(reason.contains("could not prove"), "{reason}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_own_user_and_holders_of_the_shared_token_are_served() {
    let own = Client::new(&Config::default().base_port(port()).device_index(0)).unwrap();
    own.call::<(), _>("noop", ()).unwrap();
    let team = Client::new(&Config::default().base_port(port()).device_index(0).shared_token(SHARED)).unwrap();
    team.call::<(), _>("noop", ()).unwrap();
}

#[test]
fn the_token_is_private_to_the_user() {
    let path = auth::token_path(port());
    let meta = std::fs::metadata(&path).unwrap();
    let dir = std::fs::metadata(path.parent().unwrap()).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o600, "{}", path.display());
    assert_eq!(dir.mode() & 0o777, 0o700);
    let me = std::fs::metadata("/proc/self").unwrap().uid();
    assert_eq!((meta.uid(), dir.uid()), (me, me));
    if me != 0 {
        println!("not root: cannot start a process as another user; the file mode above is the check");
        return;
    }
    let exe = helper_bin("read_token", env!("CARGO_BIN_EXE_read_token"));
    let out = std::process::Command::new(exe).arg(&path).uid(65534).gid(65534).output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    println!("another user (nobody) reading {}: {}", path.display(), said.trim());
    assert!(said.starts_with("DENIED"), "another user could read the token: {said}");
}
