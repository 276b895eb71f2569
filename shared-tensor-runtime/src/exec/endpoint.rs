//! Endpoints: the `#[share]` functions of a binary, their options, and the registry that
//! finds them all without a second list to maintain.
//!
//! Each `#[share]` function registers one [`EndpointDef`] (through `inventory`) with its
//! name, options, parameter names and a dispatch function that decodes arguments sent
//! by a client. A server serves every endpoint linked into its binary.

use std::collections::HashMap;
use std::fmt;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::exec::value::Prepared;
pub use crate::info::{Concurrency, EndpointInfo, Execution};
use crate::payload::Decoder;

/// The options of `#[share(...)]`.
///
/// ```
/// use shared_tensor_runtime::endpoint::{Concurrency, EndpointOptions, Execution};
/// let o = EndpointOptions::DEFAULT;
/// assert!(o.cache && o.singleflight && !o.managed);
/// assert_eq!((o.execution, o.concurrency), (Execution::Task, Concurrency::Parallel));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointOptions {
    /// `execution = "direct" | "task"`.
    pub execution: Execution,
    /// `concurrency = "parallel" | "serialized"`.
    pub concurrency: Concurrency,
    /// `cache = bool`: reuse results by cache key.
    pub cache: bool,
    /// `cache_key = "..."`: the key template (default: the endpoint's name and every
    /// argument's value, see [`KeyPart`]).
    pub cache_key: Option<&'static str>,
    /// `singleflight = bool`: concurrent calls with one key run the body once.
    pub singleflight: bool,
    /// `managed`: results come back as managed handles with explicit release.
    pub managed: bool,
    /// `keep` (managed and cached): a cached object stays alive with no handles, until
    /// `NAME::invalidate(..)` drops its entry.
    pub keep: bool,
}

impl EndpointOptions {
    /// The defaults: task execution, parallel, cached, singleflight, not managed.
    ///
    /// ```
    /// use shared_tensor_runtime::endpoint::{EndpointOptions, Execution};
    /// // `#[share(execution = "direct", cache = false)]`:
    /// let fast = EndpointOptions { execution: Execution::Direct, cache: false, ..EndpointOptions::DEFAULT };
    /// assert!(fast.singleflight && !fast.managed);
    /// ```
    pub const DEFAULT: EndpointOptions = EndpointOptions {
        execution: Execution::Task,
        concurrency: Concurrency::Parallel,
        cache: true,
        cache_key: None,
        singleflight: true,
        managed: false,
        keep: false,
    };

    /// Whether calls need a key (for the cache or for singleflight).
    ///
    /// ```
    /// use shared_tensor_runtime::endpoint::EndpointOptions;
    /// assert!(EndpointOptions::DEFAULT.keyed());
    /// let unkeyed = EndpointOptions { cache: false, singleflight: false, ..EndpointOptions::DEFAULT };
    /// assert!(!unkeyed.keyed());
    /// ```
    pub fn keyed(&self) -> bool {
        self.cache || self.singleflight
    }
}

/// What the server needs to serve one endpoint. Built by `#[share]`.
///
/// ```
/// use shared_tensor_runtime::{endpoint::{EndpointDef, EndpointOptions}, exec::Prepared, payload::Decoder};
/// fn dispatch(_: &mut Decoder) -> shared_tensor_runtime::Result<Prepared> {
///     Ok(Prepared::new(None, || Ok(()))) // decode the arguments, return the body
/// }
/// static PING: EndpointDef = EndpointDef {
///     name: "ping", path: "demo::ping", options: EndpointOptions::DEFAULT, params: &[], dispatch,
/// };
/// assert_eq!(PING.name, "ping");
/// ```
pub struct EndpointDef {
    /// The endpoint's name (the function's name unless `name = "..."`).
    pub name: &'static str,
    /// The function's path, for error messages (`my_crate::models::load_model`).
    pub path: &'static str,
    /// Its options.
    pub options: EndpointOptions,
    /// Parameter names, in order.
    pub params: &'static [&'static str],
    /// Decodes arguments sent by a client and prepares the call.
    pub dispatch: fn(&mut Decoder) -> Result<Prepared>,
}

impl fmt::Debug for EndpointDef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EndpointDef").field("name", &self.name).field("path", &self.path).finish()
    }
}

/// One `#[share]` function's entry in the binary-wide endpoint list.
#[doc(hidden)]
pub struct Registration(pub &'static EndpointDef);

inventory::collect!(Registration);

/// A value that can be part of a cache key: every plain serde value (numbers, strings,
/// `Vec`s, your `#[derive(Serialize)]` types), never a tensor or a module.
///
/// With no `cache_key`, a cached (or singleflight) endpoint keys each call by its name and
/// **every argument's value**, encoded as MessagePack (rmp-serde, the encoding arguments
/// travel in) and written as hex, or as the SHA-256 of that encoding when it is longer than
/// [`CallKey::MAX_PLAIN_BYTES`] bytes: `add(1)` and `add(2)` are two entries, `add(1)` twice is
/// one. A `cache_key = "..."` template may name only parameters that are `KeyPart`s too.
/// Tensors and modules are not: their contents live on the GPU, and keying by them would
/// either copy them or join different calls. (Maps are encoded in their iteration order: key
/// by a `BTreeMap`, not a `HashMap`, or equal maps may miss each other's entries.)
///
/// ```
/// use shared_tensor_runtime::endpoint::{CallKey, KeyPart};
/// fn is_key_part<K: KeyPart + ?Sized>() {}
/// is_key_part::<i64>();
/// is_key_part::<str>();
/// is_key_part::<Vec<(String, f32)>>();
/// let mut a = CallKey::new("add");
/// a.part(&1i64);
/// let mut b = CallKey::new("add");
/// b.part(&2i64);
/// assert_ne!(a.finish().unwrap(), b.finish().unwrap());
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be part of a cache key",
    label = "a tensor or module argument has no value to key a cached result by",
    note = "an endpoint that caches (the default) or uses singleflight keys every call by its arguments' \
            values; tensors and modules cannot be keys (their contents live on the GPU)",
    note = "name the key over the endpoint's non-tensor parameters, e.g. \
            #[share(cache_key = \"model:{{hidden_size}}\")], or set `cache = false` (and leave \
            `singleflight` off)"
)]
pub trait KeyPart {
    /// Appends this value's stable encoding to `key`.
    fn write_key(&self, key: &mut CallKey);
}

impl<T: Serialize + ?Sized> KeyPart for T {
    fn write_key(&self, key: &mut CallKey) {
        if let Err(e) = rmp_serde::encode::write(&mut key.bytes, self) {
            key.error.get_or_insert_with(|| e.to_string());
        }
    }
}

/// The cache key of one call, built from its endpoint's name and its arguments' values
/// (see [`KeyPart`] for the encoding).
///
/// ```
/// use shared_tensor_runtime::endpoint::CallKey;
/// let mut key = CallKey::new("load_model");
/// key.part(&4096i64);
/// key.part("fp16");
/// assert_eq!(key.finish().unwrap(), "load_model:cd1000a466703136");
/// ```
#[derive(Debug)]
pub struct CallKey {
    endpoint: &'static str,
    bytes: Vec<u8>,
    error: Option<String>,
}

impl CallKey {
    /// Encodings up to this many bytes are written out; longer ones are hashed (SHA-256).
    ///
    /// ```
    /// use shared_tensor_runtime::endpoint::CallKey;
    /// let mut key = CallKey::new("sum");
    /// key.part(&vec![1u32; 1000]);
    /// assert!(key.finish().unwrap().starts_with("sum:sha256:"));
    /// # assert!(CallKey::MAX_PLAIN_BYTES >= 32);
    /// ```
    pub const MAX_PLAIN_BYTES: usize = 64;

    /// An empty key of `endpoint`.
    ///
    /// ```
    /// use shared_tensor_runtime::endpoint::CallKey;
    /// assert_eq!(CallKey::new("ping").finish().unwrap(), "ping:");
    /// ```
    pub fn new(endpoint: &'static str) -> CallKey {
        CallKey { endpoint, bytes: Vec::new(), error: None }
    }

    /// Appends one argument's value.
    ///
    /// ```
    /// use shared_tensor_runtime::endpoint::CallKey;
    /// let mut key = CallKey::new("scale");
    /// key.part(&2.5f64).part(&true);
    /// assert!(key.finish().unwrap().starts_with("scale:"));
    /// ```
    pub fn part<K: KeyPart + ?Sized>(&mut self, value: &K) -> &mut CallKey {
        value.write_key(self);
        self
    }

    /// The key, or [`Error::BadArguments`] if a value could not be encoded.
    ///
    /// ```
    /// use shared_tensor_runtime::endpoint::CallKey;
    /// let mut key = CallKey::new("echo");
    /// key.part(&1i64);
    /// assert_eq!(key.finish().unwrap(), "echo:01");
    /// ```
    pub fn finish(self) -> Result<String> {
        use sha2::Digest;
        use std::fmt::Write;
        if let Some(reason) = self.error {
            return Err(Error::BadArguments {
                endpoint: self.endpoint.into(),
                reason: format!("an argument cannot be encoded as a cache key: {reason}"),
            });
        }
        let (prefix, bytes) = if self.bytes.len() > Self::MAX_PLAIN_BYTES {
            ("sha256:", sha2::Sha256::digest(&self.bytes).to_vec())
        } else {
            ("", self.bytes)
        };
        let mut key = String::with_capacity(self.endpoint.len() + 8 + 2 * bytes.len());
        key.push_str(self.endpoint);
        key.push(':');
        key.push_str(prefix);
        for b in bytes {
            let _ = write!(key, "{b:02x}");
        }
        Ok(key)
    }
}

impl From<&EndpointDef> for EndpointInfo {
    fn from(def: &EndpointDef) -> Self {
        let o = def.options;
        EndpointInfo {
            name: def.name.into(),
            path: def.path.into(),
            params: def.params.iter().map(|p| p.to_string()).collect(),
            execution: o.execution,
            concurrency: o.concurrency,
            cache: o.cache,
            cache_key: o.cache_key.map(str::to_string),
            singleflight: o.singleflight,
            managed: o.managed,
            keep: o.keep,
        }
    }
}

/// The endpoints a server serves, by name.
///
/// ```no_run
/// # fn main() -> shared_tensor_runtime::Result<()> {
/// let registry = shared_tensor_runtime::endpoint::Registry::linked()?;
/// let def = registry.get("load_model")?;
/// println!("{} takes {:?}", def.path, def.params);
/// # Ok(()) }
/// ```
#[derive(Debug, Default)]
pub struct Registry {
    by_name: HashMap<&'static str, &'static EndpointDef>,
}

impl Registry {
    /// Every `#[share]` function linked into this binary. Two with one name are an
    /// [`Error::DuplicateEndpoint`] naming both functions.
    ///
    /// ```
    /// # fn main() -> shared_tensor_runtime::Result<()> {
    /// let registry = shared_tensor_runtime::endpoint::Registry::linked()?;
    /// println!("this binary serves {:?}", registry.names());
    /// # Ok(()) }
    /// ```
    pub fn linked() -> Result<Registry> {
        Registry::from_defs(inventory::iter::<Registration>.into_iter().map(|r| r.0))
    }

    /// A registry of chosen endpoints (manual mode).
    ///
    /// ```
    /// # use shared_tensor_runtime::endpoint::{EndpointDef, EndpointOptions, Registry};
    /// # use shared_tensor_runtime::{exec::Prepared, payload::Decoder};
    /// # fn dispatch(_: &mut Decoder) -> shared_tensor_runtime::Result<Prepared> {
    /// #     Ok(Prepared::new(None, || Ok(())))
    /// # }
    /// # static PING: EndpointDef = EndpointDef {
    /// #     name: "ping", path: "demo::ping", options: EndpointOptions::DEFAULT, params: &[], dispatch,
    /// # };
    /// # fn main() -> shared_tensor_runtime::Result<()> {
    /// let registry = Registry::from_defs([&PING])?;
    /// assert_eq!(registry.names(), ["ping"]);
    /// # Ok(()) }
    /// ```
    pub fn from_defs(defs: impl IntoIterator<Item = &'static EndpointDef>) -> Result<Registry> {
        let mut by_name: HashMap<&'static str, &'static EndpointDef> = HashMap::new();
        for def in defs {
            if let Some(first) = by_name.insert(def.name, def) {
                if !std::ptr::eq(first, def) {
                    let (a, b) = if first.path <= def.path { (first, def) } else { (def, first) };
                    return Err(Error::DuplicateEndpoint {
                        name: def.name.into(),
                        first: a.path.into(),
                        second: b.path.into(),
                    });
                }
            }
        }
        Ok(Registry { by_name })
    }

    /// The endpoint of that name.
    ///
    /// ```
    /// # use shared_tensor_runtime::endpoint::{EndpointDef, EndpointOptions, Registry};
    /// # use shared_tensor_runtime::{exec::Prepared, payload::Decoder};
    /// # fn dispatch(_: &mut Decoder) -> shared_tensor_runtime::Result<Prepared> {
    /// #     Ok(Prepared::new(None, || Ok(())))
    /// # }
    /// # static PING: EndpointDef = EndpointDef {
    /// #     name: "ping", path: "demo::ping", options: EndpointOptions::DEFAULT, params: &[], dispatch,
    /// # };
    /// # fn main() -> shared_tensor_runtime::Result<()> {
    /// let registry = Registry::from_defs([&PING])?;
    /// assert_eq!(registry.get("ping")?.path, "demo::ping");
    /// assert!(registry.get("pong").is_err()); // Error::UnknownEndpoint lists "ping"
    /// # Ok(()) }
    /// ```
    pub fn get(&self, name: &str) -> Result<&'static EndpointDef> {
        self.by_name
            .get(name)
            .copied()
            .ok_or_else(|| Error::UnknownEndpoint { name: name.into(), available: self.names_list() })
    }

    /// Names, sorted.
    ///
    /// ```
    /// # use shared_tensor_runtime::endpoint::{EndpointDef, EndpointOptions, Registry};
    /// # use shared_tensor_runtime::{exec::Prepared, payload::Decoder};
    /// # fn dispatch(_: &mut Decoder) -> shared_tensor_runtime::Result<Prepared> {
    /// #     Ok(Prepared::new(None, || Ok(())))
    /// # }
    /// # static PING: EndpointDef = EndpointDef {
    /// #     name: "ping", path: "demo::ping", options: EndpointOptions::DEFAULT, params: &[], dispatch,
    /// # };
    /// # fn main() -> shared_tensor_runtime::Result<()> {
    /// let registry = Registry::from_defs([&PING])?;
    /// for name in registry.names() {
    ///     println!("{name}");
    /// }
    /// # Ok(()) }
    /// ```
    pub fn names(&self) -> Vec<&'static str> {
        let mut names: Vec<_> = self.by_name.keys().copied().collect();
        names.sort_unstable();
        names
    }

    fn names_list(&self) -> String {
        let names = self.names();
        if names.is_empty() {
            "no endpoints".into()
        } else {
            names.join(", ")
        }
    }

    /// Descriptions of every endpoint, sorted by name.
    ///
    /// ```
    /// # use shared_tensor_runtime::endpoint::{EndpointDef, EndpointOptions, Registry};
    /// # use shared_tensor_runtime::{exec::Prepared, payload::Decoder};
    /// # fn dispatch(_: &mut Decoder) -> shared_tensor_runtime::Result<Prepared> {
    /// #     Ok(Prepared::new(None, || Ok(())))
    /// # }
    /// # static PING: EndpointDef = EndpointDef {
    /// #     name: "ping", path: "demo::ping", options: EndpointOptions::DEFAULT, params: &[], dispatch,
    /// # };
    /// # fn main() -> shared_tensor_runtime::Result<()> {
    /// let registry = Registry::from_defs([&PING])?;
    /// let infos = registry.infos();
    /// assert_eq!((infos[0].name.as_str(), infos[0].cache), ("ping", true));
    /// # Ok(()) }
    /// ```
    pub fn infos(&self) -> Vec<EndpointInfo> {
        self.names().into_iter().map(|n| EndpointInfo::from(self.by_name[n])).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn never(_: &mut Decoder) -> Result<Prepared> {
        Err(Error::Protocol("not called".into()))
    }

    static A: EndpointDef =
        EndpointDef { name: "load", path: "a::load", options: EndpointOptions::DEFAULT, params: &[], dispatch: never };
    static B: EndpointDef =
        EndpointDef { name: "load", path: "b::load", options: EndpointOptions::DEFAULT, params: &[], dispatch: never };

    #[test]
    fn duplicate_names_name_both_functions() {
        let err = Registry::from_defs([&A, &B]).unwrap_err();
        assert_eq!(
            err,
            Error::DuplicateEndpoint { name: "load".into(), first: "a::load".into(), second: "b::load".into() }
        );
        assert!(err.to_string().contains("#[share(name"), "{err}");
    }

    #[test]
    fn unknown_endpoints_list_what_exists() {
        let reg = Registry::from_defs([&A]).unwrap();
        let err = reg.get("lod").unwrap_err();
        assert!(err.to_string().contains("\"lod\"") && err.to_string().contains("load"), "{err}");
    }
}
