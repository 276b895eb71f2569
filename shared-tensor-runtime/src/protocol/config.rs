//! Roles, ports and timeouts: what a process is (server, client, local) and where it
//! serves or connects.
//!
//! One binary runs in every role. The role comes from `SHARED_TENSOR_ROLE` (or
//! [`Config::role`] in code):
//!
//! | role | what calls to `#[share]` functions do |
//! | --- | --- |
//! | `server` | run locally, and a background server on `127.0.0.1:port` serves them to clients |
//! | `client` (or unset) | become calls to the server of this device |
//! | `local` | run locally, no server |
//!
//! The port is `base_port + device_index`: `SHARED_TENSOR_BASE_PORT` (default 2537) plus
//! the CUDA device index (default: the current CUDA device, probed when first needed), so
//! each GPU of a host has its own server.
//!
//! | variable | meaning | default |
//! | --- | --- | --- |
//! | `SHARED_TENSOR_ROLE` | `server`, `client` or `local` | `client` |
//! | `SHARED_TENSOR_BASE_PORT` | base port, 1-65535 | 2537 |
//! | `SHARED_TENSOR_DEVICE` | CUDA device index that picks the port | the current CUDA device |
//! | `SHARED_TENSOR_CONNECT_TIMEOUT_MS` | how long a client retries connecting (a longer wait for orchestrated start-up is a choice: set this, or call `Client::wait_for_server`) | 2000 |
//! | `SHARED_TENSOR_CALL_TIMEOUT_MS` | how long a client waits for one call | 600000 |
//! | `SHARED_TENSOR_CACHE_BYTES` | GPU memory cached results may hold; past it the least recently used unmanaged entries are evicted (managed and kept entries count toward it but are never evicted) | unset: unlimited |
//! | `SHARED_TENSOR_TASK_TTL_S` | how long finished tasks are kept | 3600 |
//! | `SHARED_TENSOR_TASK_CAPACITY` | how many tasks are kept | 1000 |
//! | `SHARED_TENSOR_TOKEN` | a secret shared on purpose with other users (see [`auth`](crate::protocol::auth)) | unset: same user only |
//! | `SHARED_TENSOR_TRANSPORT` | `auto` (the server's Unix socket when reachable, else TCP), `unix` or `tcp` (see [`transport`](crate::protocol::transport)) | `auto` |
//! | `SHARED_TENSOR_RUNTIME_DIR` | where servers write their token files and Unix sockets | `$XDG_RUNTIME_DIR/shared-tensor` or `/tmp/shared-tensor-<uid>` |
//! | `SHARED_TENSOR_SPIN_US` | how long a thread that waits for a reply, a request or a call looks before it sleeps (see [`Config::spin`]); 0 never spins, at most 10000 | 100 on hosts with 4 CPUs or more, else 0 |

use std::time::Duration;

use crate::error::{Error, Result};
pub use crate::protocol::transport::Transport;

/// Default retention of finished tasks.
///
/// ```
/// use shared_tensor_runtime::{config::Config, task::DEFAULT_TASK_TTL};
/// assert_eq!(DEFAULT_TASK_TTL.as_secs(), 3600);
/// let config = Config::default().task_ttl(DEFAULT_TASK_TTL * 24); // keep results for a day
/// ```
pub const DEFAULT_TASK_TTL: Duration = Duration::from_secs(3600);
/// Default number of tasks retained.
///
/// ```
/// use shared_tensor_runtime::{config::Config, task::DEFAULT_TASK_CAPACITY};
/// assert_eq!(DEFAULT_TASK_CAPACITY, 1000);
/// let config = Config::default().task_capacity(DEFAULT_TASK_CAPACITY * 10);
/// ```
pub const DEFAULT_TASK_CAPACITY: usize = 1000;

/// The default base port; the server of CUDA device `i` listens on `DEFAULT_BASE_PORT + i`.
///
/// ```
/// use shared_tensor_runtime::config::{Config, DEFAULT_BASE_PORT};
/// let config = Config::default().device_index(1);
/// assert_eq!(config.port().unwrap(), DEFAULT_BASE_PORT + 1);
/// ```
pub const DEFAULT_BASE_PORT: u16 = 2537;

/// How long a client tries to connect before [`Error::ServerUnreachable`]: short, so that
/// a missing server is reported at once rather than looking like a hang. Waiting longer
/// (a server that starts alongside) is explicit: `SHARED_TENSOR_CONNECT_TIMEOUT_MS`,
/// [`Config::connect_timeout`] or [`Client::wait_for_server`](crate::net::client::Client::wait_for_server).
///
/// ```
/// use shared_tensor_runtime::config::DEFAULT_CONNECT_TIMEOUT;
/// assert_eq!(DEFAULT_CONNECT_TIMEOUT.as_millis(), 2000);
/// ```
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a waiting thread spins by default on a host with [`SPIN_MIN_CPUS`] CPUs or
/// more (see [`Config::spin`]): a little longer than a small call's round trip, so that
/// the next call or reply of a busy caller is seen without a wake-up.
///
/// ```
/// use shared_tensor_runtime::config::{Config, DEFAULT_SPIN, SPIN_MIN_CPUS};
/// let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
/// let expected = if cpus >= SPIN_MIN_CPUS { DEFAULT_SPIN } else { std::time::Duration::ZERO };
/// assert_eq!(Config::default().get_spin(), expected);
/// ```
pub const DEFAULT_SPIN: Duration = Duration::from_micros(100);

/// Hosts with fewer CPUs than this do not spin by default: there a spinning thread would
/// share a core with the thread it waits for.
///
/// ```
/// assert_eq!(shared_tensor_runtime::config::SPIN_MIN_CPUS, 4);
/// ```
pub const SPIN_MIN_CPUS: usize = 4;

/// The longest spin window: waits longer than this are not worth a core; the call
/// sleeps and is woken.
///
/// ```
/// use shared_tensor_runtime::config::{Config, MAX_SPIN};
/// assert_eq!(MAX_SPIN.as_micros(), 10_000);
/// assert_eq!(Config::default().spin(MAX_SPIN * 2).get_spin(), MAX_SPIN);
/// ```
pub const MAX_SPIN: Duration = Duration::from_millis(10);

/// The default spin window for this host.
fn default_spin() -> Duration {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus >= SPIN_MIN_CPUS {
        DEFAULT_SPIN
    } else {
        Duration::ZERO
    }
}

/// What this process does with calls to `#[share]` functions.
///
/// ```
/// use shared_tensor_runtime::config::Role;
/// assert_eq!("server".parse::<Role>().unwrap(), Role::Server);
/// assert!("serve".parse::<Role>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Run calls locally and serve them to clients on loopback.
    Server,
    /// Send calls to the server of this device.
    Client,
    /// Run calls locally; no server, no connection.
    Local,
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Role, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "server" => Ok(Role::Server),
            "client" | "" => Ok(Role::Client),
            "local" => Ok(Role::Local),
            _ => Err("`server`, `client` or `local`".into()),
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Server => "server",
            Role::Client => "client",
            Role::Local => "local",
        })
    }
}

/// How a process serves or calls endpoints. Build one with [`Config::from_env`] (what
/// `#[share]` functions use by default) and adjust it in code.
///
/// ```
/// use shared_tensor_runtime::config::{Config, Role};
/// let config = Config::default().role(Role::Client).base_port(4000).device_index(1);
/// assert_eq!(config.port().unwrap(), 4001);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub(crate) role: Role,
    pub(crate) base_port: u16,
    pub(crate) device_index: Option<u32>,
    pub(crate) connect_timeout: Duration,
    pub(crate) call_timeout: Duration,
    pub(crate) task_ttl: Duration,
    pub(crate) task_capacity: usize,
    pub(crate) cache_bytes: Option<u64>,
    pub(crate) shared_token: Option<String>,
    pub(crate) transport: Transport,
    pub(crate) spin: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            role: Role::Client,
            base_port: DEFAULT_BASE_PORT,
            device_index: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            call_timeout: Duration::from_secs(600),
            task_ttl: DEFAULT_TASK_TTL,
            task_capacity: DEFAULT_TASK_CAPACITY,
            cache_bytes: None,
            shared_token: None,
            transport: Transport::Auto,
            spin: default_spin(),
        }
    }
}

fn env_var(name: &'static str) -> Option<String> {
    std::env::var(name).ok()
}

fn parse_env<T: std::str::FromStr>(name: &'static str, expected: &str) -> Result<Option<T>> {
    match env_var(name) {
        None => Ok(None),
        Some(value) => value.trim().parse::<T>().map(Some).map_err(|_| Error::config(name, value, expected)),
    }
}

impl Config {
    /// Reads the `SHARED_TENSOR_*` variables (see the module docs). A variable with a bad
    /// value is an [`Error::Config`] that names it, its value and what is expected.
    ///
    /// ```
    /// use shared_tensor_runtime::config::Config;
    /// let config = Config::from_env()?;
    /// println!("role {} (from SHARED_TENSOR_ROLE)", config.get_role());
    /// # Ok::<(), shared_tensor_runtime::Error>(())
    /// ```
    pub fn from_env() -> Result<Config> {
        let mut config = Config::default();
        if let Some(value) = env_var("SHARED_TENSOR_ROLE") {
            config.role =
                value.parse().map_err(|expected: String| Error::config("SHARED_TENSOR_ROLE", &value, expected))?;
        }
        if let Some(port) = parse_env::<u16>("SHARED_TENSOR_BASE_PORT", "a port number from 1 to 65535")? {
            if port == 0 {
                return Err(Error::config("SHARED_TENSOR_BASE_PORT", "0", "a port number from 1 to 65535"));
            }
            config.base_port = port;
        }
        config.device_index = parse_env::<u32>("SHARED_TENSOR_DEVICE", "a CUDA device index (0, 1, ...)")?;
        if let Some(ms) = parse_env::<u64>("SHARED_TENSOR_CONNECT_TIMEOUT_MS", "milliseconds")? {
            config.connect_timeout = Duration::from_millis(ms);
        }
        config.cache_bytes = parse_env::<u64>("SHARED_TENSOR_CACHE_BYTES", "a number of bytes")?;
        if let Some(ms) = parse_env::<u64>("SHARED_TENSOR_CALL_TIMEOUT_MS", "milliseconds (at least 1)")? {
            if ms == 0 {
                return Err(Error::config("SHARED_TENSOR_CALL_TIMEOUT_MS", "0", "milliseconds (at least 1)"));
            }
            config.call_timeout = Duration::from_millis(ms);
        }
        if let Some(s) = parse_env::<u64>("SHARED_TENSOR_TASK_TTL_S", "seconds")? {
            config.task_ttl = Duration::from_secs(s);
        }
        if let Some(n) = parse_env::<usize>("SHARED_TENSOR_TASK_CAPACITY", "a number of tasks (at least 1)")? {
            if n == 0 {
                return Err(Error::config("SHARED_TENSOR_TASK_CAPACITY", "0", "a number of tasks (at least 1)"));
            }
            config.task_capacity = n;
        }
        config.shared_token = env_var("SHARED_TENSOR_TOKEN").filter(|t| !t.is_empty());
        if let Some(value) = env_var("SHARED_TENSOR_TRANSPORT") {
            config.transport =
                value.parse().map_err(|expected: String| Error::config("SHARED_TENSOR_TRANSPORT", &value, expected))?;
        }
        const SPIN_EXPECTED: &str = "microseconds from 0 (never spin) to 10000";
        if let Some(us) = parse_env::<u64>("SHARED_TENSOR_SPIN_US", SPIN_EXPECTED)? {
            if Duration::from_micros(us) > MAX_SPIN {
                return Err(Error::config("SHARED_TENSOR_SPIN_US", us.to_string(), SPIN_EXPECTED));
            }
            config.spin = Duration::from_micros(us);
        }
        Ok(config)
    }

    /// How long finished tasks are kept for waiters (default 1 h).
    ///
    /// ```
    /// use shared_tensor_runtime::config::Config;
    /// let config = Config::default().task_ttl(std::time::Duration::from_secs(10 * 60));
    /// assert_ne!(config, Config::default());
    /// ```
    pub fn task_ttl(mut self, ttl: Duration) -> Self {
        self.task_ttl = ttl;
        self
    }

    /// How many tasks are kept (default 1,000; the oldest finished are evicted first).
    ///
    /// ```
    /// use shared_tensor_runtime::config::Config;
    /// let config = Config::default().task_capacity(10_000);
    /// assert_ne!(config, Config::default());
    /// ```
    pub fn task_capacity(mut self, capacity: usize) -> Self {
        self.task_capacity = capacity.max(1);
        self
    }

    /// A token shared on purpose with other users: a server accepts clients that know it
    /// (besides its own user's), a client proves itself with it instead of the server's
    /// token file. Default: `SHARED_TENSOR_TOKEN`, else none (same user only).
    ///
    /// ```
    /// use shared_tensor_runtime::config::{Config, Role};
    /// let config = Config::default().role(Role::Server).shared_token("team-secret");
    /// assert_ne!(config, Config::default().role(Role::Server));
    /// ```
    pub fn shared_token(mut self, token: impl Into<String>) -> Self {
        self.shared_token = Some(token.into());
        self
    }

    /// Sets the role.
    ///
    /// ```
    /// use shared_tensor_runtime::config::{Config, Role};
    /// let config = Config::default().role(Role::Local);
    /// assert_eq!(config.get_role(), Role::Local);
    /// ```
    pub fn role(mut self, role: Role) -> Self {
        self.role = role;
        self
    }

    /// Sets the base port (the server of device `i` listens on `base_port + i`).
    ///
    /// ```
    /// use shared_tensor_runtime::config::Config;
    /// let config = Config::default().base_port(3000).device_index(2);
    /// assert_eq!(config.port().unwrap(), 3002);
    /// ```
    pub fn base_port(mut self, port: u16) -> Self {
        self.base_port = port;
        self
    }

    /// Sets the CUDA device index that picks the port, instead of probing the current device.
    ///
    /// ```
    /// use shared_tensor_runtime::config::Config;
    /// let config = Config::default().device_index(3);
    /// assert_eq!(config.resolved_device_index().unwrap(), 3);
    /// ```
    pub fn device_index(mut self, index: u32) -> Self {
        self.device_index = Some(index);
        self
    }

    /// The GPU memory cached results may hold (`None`: unlimited, the default). Past it,
    /// storing a result evicts the least recently used unmanaged entries. Managed and kept
    /// entries count toward the budget but are never evicted (their handles, or `keep`,
    /// hold the memory anyway): when they alone exceed the budget, an unmanaged result
    /// stays cached only until the next one is stored.
    ///
    /// ```
    /// use shared_tensor_runtime::config::Config;
    /// let config = Config::default().cache_bytes(Some(8 << 30)); // 8 GiB of cached results
    /// assert_ne!(config, Config::default());
    /// ```
    pub fn cache_bytes(mut self, bytes: Option<u64>) -> Self {
        self.cache_bytes = bytes;
        self
    }

    /// How long a client keeps retrying to connect while the server starts (default 2 s,
    /// [`DEFAULT_CONNECT_TIMEOUT`]).
    ///
    /// ```
    /// use shared_tensor_runtime::config::Config;
    /// let config = Config::default().connect_timeout(std::time::Duration::from_secs(5));
    /// assert_ne!(config, Config::default());
    /// ```
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long a client waits for one call before failing it (default 600 s).
    ///
    /// ```
    /// use shared_tensor_runtime::config::Config;
    /// let config = Config::default().call_timeout(std::time::Duration::from_secs(30));
    /// assert_ne!(config, Config::default());
    /// ```
    pub fn call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = timeout;
        self
    }

    /// Which stream clients open and servers offer (default [`Transport::Auto`]: a server
    /// listens on its Unix socket and on TCP, a client takes the socket when it can reach
    /// it). See [`transport`](crate::protocol::transport).
    ///
    /// ```
    /// use shared_tensor_runtime::config::{Config, Transport};
    /// let config = Config::default().transport(Transport::Tcp);
    /// assert_ne!(config, Config::default());
    /// ```
    pub fn transport(mut self, transport: Transport) -> Self {
        self.transport = transport;
        self
    }

    /// How long a thread that waits for something due within microseconds looks for it
    /// before it sleeps: a caller waiting for its reply (never past the call's deadline),
    /// a server's connection reader waiting for the next request, and its idle call
    /// threads waiting for the next call (the last server started in a process sets it
    /// for the process's call threads). Sleeping costs a wake-up, several microseconds on
    /// a virtual machine, on every call; spinning costs CPU time for at most this long
    /// after each call, yielding the core to any thread that needs it and stopping as
    /// soon as one does. A few threads of a process spin at once at most (a quarter of
    /// the CPUs, 1 to 4, of the server's readers and as many of its call threads).
    ///
    /// Default: `SHARED_TENSOR_SPIN_US`, else [`DEFAULT_SPIN`] (100 µs) on hosts with
    /// [`SPIN_MIN_CPUS`] CPUs or more and none on smaller ones. `Duration::ZERO` never
    /// spins (hosts where every core is taken by other work); windows longer than
    /// [`MAX_SPIN`] are cut to it (the variable refuses them).
    ///
    /// ```
    /// use shared_tensor_runtime::config::Config;
    /// use std::time::Duration;
    /// let config = Config::default().spin(Duration::ZERO);
    /// assert_eq!(config.get_spin(), Duration::ZERO);
    /// ```
    pub fn spin(mut self, window: Duration) -> Self {
        self.spin = window.min(MAX_SPIN);
        self
    }

    /// The configured spin window (see [`Config::spin`]).
    ///
    /// ```
    /// use shared_tensor_runtime::config::Config;
    /// use std::time::Duration;
    /// assert_eq!(Config::default().spin(Duration::from_micros(50)).get_spin(), Duration::from_micros(50));
    /// ```
    pub fn get_spin(&self) -> Duration {
        self.spin
    }

    /// The configured transport.
    ///
    /// ```
    /// use shared_tensor_runtime::config::{Config, Transport};
    /// assert_eq!(Config::default().get_transport(), Transport::Auto);
    /// ```
    pub fn get_transport(&self) -> Transport {
        self.transport
    }

    /// The configured role.
    ///
    /// ```
    /// use shared_tensor_runtime::config::{Config, Role};
    /// assert_eq!(Config::default().get_role(), Role::Client);
    /// assert_eq!(Config::default().role(Role::Server).get_role(), Role::Server);
    /// ```
    pub fn get_role(&self) -> Role {
        self.role
    }

    /// The configured device index (`SHARED_TENSOR_DEVICE` or [`Config::device_index`]),
    /// without probing CUDA; `None` means "the current CUDA device".
    ///
    /// ```
    /// use shared_tensor_runtime::config::Config;
    /// assert_eq!(Config::default().get_device_index(), None);
    /// assert_eq!(Config::default().device_index(2).get_device_index(), Some(2));
    /// ```
    pub fn get_device_index(&self) -> Option<u32> {
        self.device_index
    }

    /// The device index: the configured one, else the current CUDA device.
    ///
    /// ```
    /// use shared_tensor_runtime::config::Config;
    /// // Set explicitly, no GPU is probed; unset, it is the current CUDA device.
    /// let config = Config::default().device_index(1);
    /// assert_eq!(config.resolved_device_index().unwrap(), 1);
    /// ```
    pub fn resolved_device_index(&self) -> Result<u32> {
        match self.device_index {
            Some(index) => Ok(index),
            #[cfg(feature = "cuda")]
            None => crate::device::cuda::current_device(),
            #[cfg(not(feature = "cuda"))]
            None => Err(Error::config(
                "SHARED_TENSOR_DEVICE",
                "(unset)".to_string(),
                "a device index: this build has no CUDA (the `cuda` feature is off) to ask for the current device",
            )),
        }
    }

    /// `base_port + device_index`, or an error if it overflows the port range.
    ///
    /// ```
    /// use shared_tensor_runtime::config::Config;
    /// assert_eq!(Config::default().base_port(5000).device_index(3).port().unwrap(), 5003);
    /// assert!(Config::default().base_port(65535).device_index(1).port().is_err());
    /// ```
    pub fn port(&self) -> Result<u16> {
        self.port_of(self.resolved_device_index()?)
    }

    /// `base_port + device`, for a device given here (no CUDA probe), or an error if it
    /// overflows the port range.
    ///
    /// ```
    /// use shared_tensor_runtime::config::Config;
    /// assert_eq!(Config::default().base_port(5000).port_of(2).unwrap(), 5002);
    /// assert!(Config::default().base_port(65535).port_of(1).is_err());
    /// ```
    pub fn port_of(&self, device: u32) -> Result<u16> {
        u16::try_from(u32::from(self.base_port) + device).map_err(|_| {
            Error::config(
                "SHARED_TENSOR_BASE_PORT",
                self.base_port.to_string(),
                format!("a base port that leaves room for device index {device} below 65536"),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_parse_and_reject_typos() {
        assert_eq!("Server".parse::<Role>(), Ok(Role::Server));
        assert_eq!(" local ".parse::<Role>(), Ok(Role::Local));
        assert_eq!("client".parse::<Role>(), Ok(Role::Client));
        assert!("sever".parse::<Role>().is_err());
    }

    #[test]
    fn a_bad_role_says_what_is_expected_once() {
        let expected = "sever".parse::<Role>().unwrap_err();
        let message = Error::config("SHARED_TENSOR_ROLE", "sever", expected).to_string();
        assert_eq!(message, "SHARED_TENSOR_ROLE=\"sever\" is not valid: expected `server`, `client` or `local`");
    }

    #[test]
    fn port_is_base_plus_device() {
        let c = Config::default().base_port(3000).device_index(3);
        assert_eq!(c.port().unwrap(), 3003);
        let c = Config::default().base_port(65535).device_index(1);
        let err = c.port().unwrap_err();
        assert!(err.to_string().contains("SHARED_TENSOR_BASE_PORT"), "{err}");
    }
}
