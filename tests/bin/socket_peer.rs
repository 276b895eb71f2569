//! Connects to a Unix socket, writes what it reads on stdin (the frames to send), and
//! prints the first frame that comes back as hex (`FRAME <hex>`), or `ERR <reason>`.
//! Uses only std, so that it runs as another user (who cannot load libtorch from our
//! home); the test encodes and decodes the messages.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

fn exchange(path: &str, out: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    s.write_all(out)?;
    let mut len = [0u8; 4];
    s.read_exact(&mut len)?;
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut body)?;
    Ok(body)
}

fn main() {
    let path = std::env::args().nth(1).expect("a socket path");
    let mut out = Vec::new();
    std::io::stdin().read_to_end(&mut out).expect("the frames to send, on stdin");
    match exchange(&path, &out) {
        Ok(body) => println!("FRAME {}", body.iter().map(|b| format!("{b:02x}")).collect::<String>()),
        Err(e) => println!("ERR {e}"),
    }
}
