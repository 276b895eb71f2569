//! Same user only, by default.
//!
//! A server writes a random 32-byte token to `<runtime dir>/server-<port>.token`, a file
//! only its user can read (the folder is `0700`, the file `0600`, both owned by the
//! user). A client reads it and both sides prove that they know it, by challenge and
//! response, before anything else is served:
//!
//! 1. client → `Hello { nonce_c }`;
//! 2. server → `Challenge { nonce_s, proofs }`, each proof `HMAC-SHA256(secret, "server" ‖ nonce_c)`;
//!    the client checks one matches its secret (an impostor on the port cannot answer);
//! 3. client → `Auth { HMAC-SHA256(secret, "client" ‖ nonce_s) }`; the server checks it and
//!    answers `Welcome`, or `Refused` and closes.
//!
//! On the Unix socket the server also reads the peer's user from the kernel
//! (`SO_PEERCRED`) and refuses another user in answer to `Hello`, before any proof, with a
//! reason that names both users and the fix. The socket lives in the private runtime
//! folder, so another user cannot normally reach it at all; this check keeps the rule
//! should the folder's mode ever be loosened. Over TCP the kernel reports no user, and
//! the proofs are the whole check.
//!
//! The token itself never crosses the connection. To let chosen other users in, give
//! server and clients the same `SHARED_TENSOR_TOKEN` (any string): the server accepts it
//! besides its own token.
//!
//! The runtime dir is `SHARED_TENSOR_RUNTIME_DIR`, else `$XDG_RUNTIME_DIR/shared-tensor`,
//! else `/tmp/shared-tensor-<uid>`.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
// Writing a token file: the server's side, with the `cuda` feature.
#[cfg(feature = "cuda")]
use std::fs::{DirBuilder, OpenOptions};
#[cfg(feature = "cuda")]
use std::io::Write;
#[cfg(feature = "cuda")]
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::device::ffi;
use crate::error::{Error, Result};

/// A 32-byte random value or proof.
///
/// ```
/// use shared_tensor_runtime::auth::{nonce, Bytes32};
/// let n: Bytes32 = nonce();
/// let raw: [u8; 32] = *n;
/// assert_eq!(n, raw);
/// ```
pub type Bytes32 = serde_bytes::ByteArray<32>;

/// Who proves: the two sides use different labels, so a proof cannot be replayed back.
///
/// ```
/// use shared_tensor_runtime::auth::{Secret, Side};
/// let secret = Secret::shared("team-token");
/// let nonce = [1u8; 32];
/// assert_ne!(secret.proof(Side::Server, &nonce), secret.proof(Side::Client, &nonce));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Side {
    /// The server's proof.
    Server,
    /// The client's proof.
    Client,
}

/// A secret both sides know: the server's token, or a shared one.
///
/// ```
/// use shared_tensor_runtime::auth::{Secret, Side};
/// let s = Secret::shared("team-token");
/// let nonce = [7u8; 32];
/// assert!(s.verify(Side::Client, &nonce, &s.proof(Side::Client, &nonce)));
/// assert!(!s.verify(Side::Server, &nonce, &s.proof(Side::Client, &nonce)));
/// ```
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// A secret from a shared string (`SHARED_TENSOR_TOKEN`).
    ///
    /// ```
    /// use shared_tensor_runtime::auth::Secret;
    /// let secret = Secret::shared("team-token");
    /// assert_eq!(format!("{secret:?}"), "Secret(..)"); // never printed
    /// ```
    pub fn shared(token: &str) -> Secret {
        Secret(token.as_bytes().to_vec())
    }

    fn mac(&self, side: Side, nonce: &[u8; 32]) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        mac.update(match side {
            Side::Server => b"shared-tensor server",
            Side::Client => b"shared-tensor client",
        });
        mac.update(nonce);
        mac
    }

    /// The proof that `side` knows this secret, for the other side's nonce.
    ///
    /// ```
    /// use shared_tensor_runtime::auth::{nonce, Secret, Side};
    /// let client_nonce = nonce(); // sent by the client in Hello
    /// let proof = Secret::shared("team-token").proof(Side::Server, &client_nonce);
    /// assert_eq!(proof.len(), 32);
    /// ```
    pub fn proof(&self, side: Side, nonce: &[u8; 32]) -> Bytes32 {
        Bytes32::new(self.mac(side, nonce).finalize().into_bytes().into())
    }

    /// Checks a proof (in constant time).
    ///
    /// ```
    /// use shared_tensor_runtime::auth::{nonce, Secret, Side};
    /// let (ours, theirs) = (Secret::shared("team-token"), Secret::shared("another"));
    /// let n = nonce();
    /// assert!(ours.verify(Side::Client, &n, &ours.proof(Side::Client, &n)));
    /// assert!(!ours.verify(Side::Client, &n, &theirs.proof(Side::Client, &n)));
    /// ```
    pub fn verify(&self, side: Side, nonce: &[u8; 32], proof: &[u8; 32]) -> bool {
        self.mac(side, nonce).verify_slice(proof).is_ok()
    }
}

/// A fresh random nonce.
///
/// ```
/// use shared_tensor_runtime::auth::nonce;
/// let (a, b) = (nonce(), nonce());
/// assert_ne!(a, b);
/// ```
pub fn nonce() -> Bytes32 {
    let mut n = [0u8; 32];
    getrandom::getrandom(&mut n).expect("the operating system's random source failed");
    Bytes32::new(n)
}

#[cfg(feature = "cuda")]
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The folder holding token files.
///
/// ```
/// let dir = shared_tensor_runtime::auth::runtime_dir();
/// println!("token files live in {}", dir.display());
/// ```
pub fn runtime_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SHARED_TENSOR_RUNTIME_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR") {
        return PathBuf::from(dir).join("shared-tensor");
    }
    PathBuf::from(format!("/tmp/shared-tensor-{}", ffi::effective_uid()))
}

/// The token file of the server on `port`.
///
/// ```
/// use shared_tensor_runtime::auth::{runtime_dir, token_path};
/// assert_eq!(token_path(7800), runtime_dir().join("server-7800.token"));
/// ```
pub fn token_path(port: u16) -> PathBuf {
    runtime_dir().join(format!("server-{port}.token"))
}

fn unauthorized(reason: String) -> Error {
    Error::Unauthorized { reason }
}

/// Checks that a path is owned by this user and closed to everyone else.
fn check_private(path: &Path, what: &str) -> Result<()> {
    let meta =
        fs::metadata(path).map_err(|e| unauthorized(format!("cannot read the {what} {}: {e}", path.display())))?;
    let uid = ffi::effective_uid();
    if meta.uid() != uid || meta.mode() & 0o077 != 0 {
        return Err(unauthorized(format!(
            "the {what} {} is not private to this user (owner {}, mode {:o}; expected owner {uid}, no access for \
             others): remove it, or set SHARED_TENSOR_RUNTIME_DIR to a private folder",
            path.display(),
            meta.uid(),
            meta.mode() & 0o777
        )));
    }
    Ok(())
}

#[cfg(feature = "cuda")]
/// The secrets a server on `port` accepts: a new random token, written to its token
/// file, and the shared token if there is one.
pub(crate) fn server_secrets(port: u16, shared: Option<&str>) -> Result<Vec<Secret>> {
    let dir = runtime_dir();
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| unauthorized(format!("cannot create the runtime folder {}: {e}", dir.display())))?;
    check_private(&dir, "runtime folder")?;
    let token = nonce();
    let path = token_path(port);
    let tmp = dir.join(format!(".server-{port}.token.{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        f.write_all(hex(&*token).as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, &path)
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        unauthorized(format!("cannot write the token file {}: {e}", path.display()))
    })?;
    let mut secrets = vec![Secret(hex(&*token).into_bytes())];
    secrets.extend(shared.map(Secret::shared));
    Ok(secrets)
}

/// The secret a client uses for the server on `port`: the shared token if there is one,
/// else the server's token file (which must be private to this user).
///
/// ```
/// # fn main() -> shared_tensor_runtime::Result<()> {
/// use shared_tensor_runtime::auth::client_secret;
/// // With SHARED_TENSOR_TOKEN, the shared string is the secret and no file is read.
/// let shared = client_secret(7800, Some("team-token"))?;
/// // Without it, the token file of the server on the port (an error if there is none).
/// let from_file = client_secret(7800, None);
/// # let _ = (shared, from_file);
/// # Ok(()) }
/// ```
pub fn client_secret(port: u16, shared: Option<&str>) -> Result<Secret> {
    if let Some(token) = shared {
        return Ok(Secret::shared(token));
    }
    let path = token_path(port);
    check_private(&path, "token file")?;
    let token = fs::read(&path).map_err(|e| {
        unauthorized(format!(
            "cannot read the server's token file {}: {e}; a client must run as the server's user, or both must \
             share SHARED_TENSOR_TOKEN",
            path.display()
        ))
    })?;
    Ok(Secret(token))
}

/// The same-user rule for a peer whose user the socket itself reports (a Unix socket's
/// `SO_PEERCRED`, which the peer cannot forge): another user is refused before the
/// handshake, with a reason that says how to let them in, unless the server accepts a
/// shared token (`SHARED_TENSOR_TOKEN`), which is how other users are admitted on purpose.
/// Over TCP the kernel reports no user, and the token's proof is the whole check.
// The server's (with the `cuda` feature).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn check_peer_user(peer_uid: u32, server_uid: u32, shared_token: bool) -> Result<()> {
    if peer_uid == server_uid || shared_token {
        return Ok(());
    }
    Err(unauthorized(format!(
        "the client runs as uid {peer_uid}, and this server (uid {server_uid}) serves only its own user; to share \
         it with other users on purpose, give the server and its clients the same SHARED_TENSOR_TOKEN"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn another_user_is_refused_unless_a_shared_token_admits_them() {
        assert!(check_peer_user(1000, 1000, false).is_ok());
        assert!(check_peer_user(1001, 1000, true).is_ok(), "a shared token admits other users on purpose");
        match check_peer_user(1001, 1000, false) {
            Err(Error::Unauthorized { reason }) => {
                assert!(reason.contains("uid 1001") && reason.contains("(uid 1000)"), "{reason}");
                assert!(reason.contains("SHARED_TENSOR_TOKEN"), "the fix is named: {reason}");
            }
            other => panic!("another user was not refused: {other:?}"),
        }
        // Root is another user too: it could read the token, but the rule is the user's.
        assert!(check_peer_user(0, 1000, false).is_err());
    }

    #[test]
    fn proofs_bind_the_side_the_nonce_and_the_secret() {
        let a = Secret::shared("a");
        let b = Secret::shared("b");
        let n = *nonce();
        let m = *nonce();
        assert_ne!(n, m, "nonces are random");
        let p = a.proof(Side::Server, &n);
        assert!(a.verify(Side::Server, &n, &p));
        assert!(!a.verify(Side::Client, &n, &p), "a server proof is no client proof");
        assert!(!a.verify(Side::Server, &m, &p), "nor one for another nonce");
        assert!(!b.verify(Side::Server, &n, &p), "nor one for another secret");
    }
}
