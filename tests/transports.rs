//! The two streams a client may open to a server (no GPU needed): the server's Unix
//! socket, found from the port in the runtime folder, and TCP loopback. What a user who
//! sets nothing gets (the socket), what each forced transport does, and the socket
//! file's life: replaced when a dead server left it, removed when the server stops.

#[path = "endpoints.rs"]
mod endpoints;

use std::time::Duration;

use shared_tensor::client::Client;
use shared_tensor::config::{Config, Role};
use shared_tensor::control::{Control, ControlClient};
use shared_tensor::server::{Server, ServerBuilder};
use shared_tensor::transport::{socket_path, Transport};
use shared_tensor::Error;
use shared_tensor_tests::loopback_config;

/// This process is a client that serves in the background (no GPU needed).
fn setup() {
    static DONE: std::sync::Once = std::sync::Once::new();
    DONE.call_once(|| shared_tensor::configure(Config::default().role(Role::Client).device_index(0)).unwrap());
}

fn server() -> ServerBuilder {
    setup();
    Server::builder().endpoints([endpoints::noop::endpoint(), endpoints::fails::endpoint()]).device(0).port(0)
}

/// A call that carries data each way: the argument comes back in the endpoint's error.
fn echo(client: &Client, message: &str) -> String {
    match client.call::<(), _>("fails", (message.to_string(),)) {
        Err(Error::Endpoint { message, .. }) => message,
        other => panic!("expected the endpoint's error, got {other:?}"),
    }
}

#[test]
fn a_client_that_sets_nothing_talks_over_the_unix_socket() {
    let server = server().start().unwrap();
    let port = server.addr().port();
    let path = socket_path(port).expect("the runtime folder is short enough for a socket");
    assert_eq!(server.unix_socket(), Some(path.as_path()));
    assert!(std::fs::metadata(&path).is_ok(), "{} exists while the server runs", path.display());
    assert_eq!(server.info().unix_socket.as_deref(), Some(path.to_str().unwrap()));

    let client = Client::new(&loopback_config(port)).unwrap();
    assert_eq!(client.transport(), None, "not connected before the first use");
    assert_eq!(echo(&client, "over the socket"), "over the socket");
    assert_eq!(client.transport(), Some(Transport::Unix));
    assert_eq!(client.addr(), server.addr(), "the TCP address still names the server");

    let control = ControlClient::connect(&loopback_config(port)).unwrap();
    assert_eq!(control.transport(), Transport::Unix);
    assert_eq!(control.server_info().unwrap().unix_socket.as_deref(), Some(path.to_str().unwrap()));
    drop((client, control));

    assert!(server.shutdown().is_clean());
    assert!(std::fs::metadata(&path).is_err(), "{} is removed when the server stops", path.display());
}

#[test]
fn tcp_forced_by_the_client_or_served_alone_still_works() {
    // The client forces TCP while the server offers both.
    let both = server().start().unwrap();
    let tcp_client = Client::new(&loopback_config(both.addr().port()).transport(Transport::Tcp)).unwrap();
    assert_eq!(echo(&tcp_client, "forced"), "forced");
    assert_eq!(tcp_client.transport(), Some(Transport::Tcp));
    drop(tcp_client);
    assert!(both.shutdown().is_clean());

    // The server serves TCP alone: a client that sets nothing falls back to it, one that
    // insists on the socket is told where it looked.
    let tcp_only = server().transport(Transport::Tcp).start().unwrap();
    let port = tcp_only.addr().port();
    assert_eq!(tcp_only.unix_socket(), None);
    assert!(std::fs::metadata(socket_path(port).unwrap()).is_err(), "no socket file for a TCP-only server");
    let auto = Client::new(&loopback_config(port)).unwrap();
    assert_eq!(echo(&auto, "fallback"), "fallback");
    assert_eq!(auto.transport(), Some(Transport::Tcp));
    let unix_only = loopback_config(port).transport(Transport::Unix).connect_timeout(Duration::ZERO);
    match ControlClient::connect(&unix_only) {
        Err(Error::ServerUnreachable { reason, .. }) => {
            assert!(reason.contains(&format!("server-{port}.sock")), "the reason names the socket: {reason}")
        }
        other => panic!("expected ServerUnreachable, got {other:?}"),
    }
    drop(auto);
    assert!(tcp_only.shutdown().is_clean());
}

#[test]
fn a_socket_left_by_a_dead_server_is_replaced_and_never_trusted() {
    setup();
    let port = shared_tensor_tests::free_port();
    let path = socket_path(port).unwrap();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    // What a killed server leaves: a socket file nobody listens on.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(std::fs::metadata(&path).is_ok());
    // A client meanwhile falls back to TCP, finds nothing, and says so.
    let none = loopback_config(port).connect_timeout(Duration::ZERO);
    assert!(matches!(ControlClient::connect(&none), Err(Error::ServerUnreachable { .. })));

    let server = server().port(port).start().unwrap();
    let client = Client::new(&loopback_config(port)).unwrap();
    assert_eq!(echo(&client, "fresh socket"), "fresh socket");
    assert_eq!(client.transport(), Some(Transport::Unix), "the new server's own socket");
    drop(client);
    assert!(server.shutdown().is_clean());
    assert!(std::fs::metadata(&path).is_err());
}

#[test]
fn a_client_started_before_its_server_ends_on_the_socket() {
    // The client retries while the server starts; whether it first reaches the port
    // before the socket exists or after, it ends on the socket.
    for _ in 0..3 {
        setup();
        let port = shared_tensor_tests::free_port();
        let early = std::thread::spawn(move || {
            let client = Client::new(&loopback_config(port)).unwrap();
            client.connect().unwrap();
            client
        });
        let server = server().port(port).start().unwrap();
        let client = early.join().unwrap();
        assert_eq!(client.transport(), Some(Transport::Unix));
        assert_eq!(echo(&client, "early"), "early");
        drop(client);
        assert!(server.shutdown().is_clean());
    }
}
