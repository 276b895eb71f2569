//! The same-user rule on the Unix socket comes from the kernel's peer credentials
//! (`SO_PEERCRED`): a peer of another uid is refused in answer to its `Hello`, before any
//! proof, even when it can reach the socket. No GPU needed.
//!
//! This process has a runtime folder of its own (it opens the folder and the socket to
//! everyone, which no other server must share). Becoming another user needs root: as
//! root the test also runs the peer as `nobody`; otherwise it checks the own-user path only
//! and says so.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use shared_tensor::config::{Config, Role};
use shared_tensor::ipc::ProcessId;
use shared_tensor::wire::{self, ClientMessage, Hello, ServerMessage, PROTOCOL_VERSION};
use shared_tensor::Error;
use shared_tensor_tests::{free_port, helper_bin};

/// Sends Hello from a `socket_peer` process (as `uid`, when given) and decodes the answer.
fn hello_from(socket: &std::path::Path, uid: Option<u32>) -> ServerMessage {
    let mut frame = Vec::new();
    let hello = Hello { protocol: PROTOCOL_VERSION, client: ProcessId::current(), nonce: shared_tensor::auth::nonce() };
    wire::write_frame(&ClientMessage::Hello(hello), &mut frame).unwrap();
    let mut cmd = Command::new(helper_bin("socket_peer", env!("CARGO_BIN_EXE_socket_peer")));
    cmd.arg(socket).stdin(Stdio::piped()).stdout(Stdio::piped());
    if let Some(uid) = uid {
        cmd.uid(uid).gid(uid);
    }
    let mut child = cmd.spawn().unwrap();
    child.stdin.take().unwrap().write_all(&frame).unwrap();
    let out = child.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let hex = said.strip_prefix("FRAME ").unwrap_or_else(|| panic!("the peer (uid {uid:?}) got no answer: {said}"));
    let body: Vec<u8> = (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
    wire::decode(&body).unwrap()
}

#[test]
fn a_unix_peer_of_another_user_is_refused_from_its_credentials() {
    let dir = std::env::temp_dir().join(format!("shared-tensor-peercred-{}", std::process::id()));
    // Before any thread of this process reads the environment.
    std::env::set_var("SHARED_TENSOR_RUNTIME_DIR", &dir);
    let port = free_port();
    shared_tensor::configure(Config::default().role(Role::Local).base_port(port).device_index(0)).unwrap();
    shared_tensor::serve_in_background(None).unwrap();
    let socket = shared_tensor::transport::socket_path(port).unwrap();
    assert!(socket.exists(), "the server listens on {}", socket.display());
    // Anyone may now reach the socket: only the credentials check stands in the way.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711)).unwrap();
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o777)).unwrap();

    // This user is challenged (the handshake goes on).
    assert!(matches!(hello_from(&socket, None), ServerMessage::Challenge(_)));

    let me = std::fs::metadata("/proc/self").unwrap().uid();
    if me != 0 {
        println!("not root (uid {me}): cannot start a peer as another user; the own-user path above is what ran");
    } else {
        match hello_from(&socket, Some(65534)) {
            ServerMessage::Refused(Error::Unauthorized { reason }) => {
                println!("nobody's Hello: refused: {reason}");
                assert!(reason.contains("uid 65534") && reason.contains("(uid 0)"), "{reason}");
                assert!(reason.contains("SHARED_TENSOR_TOKEN"), "{reason}");
            }
            other => panic!("a peer of another user was not refused: {other:?}"),
        }
    }
    let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
}
