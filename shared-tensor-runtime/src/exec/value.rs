//! A call's values: its prepared body, its result behind a type known at run time, and
//! a result kept for more than one caller.

use std::any::Any;
use std::sync::Arc;

use once_cell::sync::OnceCell;
use parking_lot::Mutex;

use crate::device::lease::Link;
use crate::error::{Error, Result};
use crate::payload::{Encoded, Encoder, PackedPayload, Payload};

/// A payload whose type is known only at run time.
///
/// ```
/// # fn main() -> shared_tensor_runtime::Result<()> {
/// use shared_tensor_runtime::exec::AnyPayload;
/// let value: Box<dyn AnyPayload> = Box::new(tch::Tensor::ones([2], (tch::Kind::Float, tch::Device::Cpu)));
/// let alias = value.alias_dyn()?; // another tensor over the same memory
/// let t: Box<tch::Tensor> = alias.into_any().downcast().unwrap();
/// assert_eq!(t.size(), vec![2]);
/// # Ok(()) }
/// ```
pub trait AnyPayload: Send + 'static {
    /// Encodes it.
    fn encode_dyn(&self, root: &str) -> Result<Encoded>;
    /// Another value over the same memory.
    fn alias_dyn(&self) -> Result<Box<dyn AnyPayload>>;
    /// For downcasting to the concrete type.
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send>;
    /// The concrete type's name, for error messages.
    fn type_name(&self) -> &'static str;
    /// Bytes of GPU memory, when known without encoding (`None`: from the encoding).
    fn gpu_bytes_hint(&self) -> Option<u64> {
        None
    }
}

impl<P: Payload> AnyPayload for P {
    fn encode_dyn(&self, root: &str) -> Result<Encoded> {
        Encoder::encode(root, self)
    }
    fn alias_dyn(&self) -> Result<Box<dyn AnyPayload>> {
        Ok(Box::new(self.alias()?))
    }
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send> {
        self
    }
    fn type_name(&self) -> &'static str {
        std::any::type_name::<P>()
    }
}

pub(crate) fn downcast<R: Payload>(value: Box<dyn AnyPayload>, endpoint: &str) -> Result<R> {
    let found = value.type_name();
    value.into_any().downcast::<R>().map(|b| *b).map_err(|_| Error::BadArguments {
        endpoint: endpoint.into(),
        reason: format!("its result is a {found}, not the {} asked for", std::any::type_name::<R>()),
    })
}

/// A result kept for more than one caller (cached, shared by singleflight, managed, or
/// retained by a task): the value itself, and its encoding, made once on first send.
pub(crate) struct Value {
    typed: Mutex<Box<dyn AnyPayload>>,
    encoded: OnceCell<Encoded>,
}

impl Value {
    pub(crate) fn new(value: Box<dyn AnyPayload>) -> Value {
        Value { typed: Mutex::new(value), encoded: OnceCell::new() }
    }

    pub(crate) fn encoded(&self) -> Result<&Encoded> {
        self.encoded.get_or_try_init(|| self.typed.lock().encode_dyn("result"))
    }

    /// Bytes of GPU memory the value holds (0 if it cannot be encoded: the send will say why).
    pub(crate) fn bytes(&self) -> u64 {
        if let Some(bytes) = self.typed.lock().gpu_bytes_hint() {
            return bytes;
        }
        self.encoded().map(Encoded::storage_bytes).unwrap_or(0)
    }

    pub(crate) fn alias_as<R: Payload>(&self, endpoint: &str) -> Result<R> {
        let aliased = self.typed.lock().alias_dyn()?;
        downcast(aliased, endpoint)
    }
}

/// What a call produced, for its caller.
pub(crate) enum Outcome {
    /// Computed for this caller alone.
    Fresh(Box<dyn AnyPayload>),
    /// Shared with other callers (cached or singleflight).
    Shared(Arc<Value>),
    /// A managed object; the caller holds one reference.
    Object { id: u64, value: Arc<Value> },
}

impl Outcome {
    /// The value for a local caller, and the object id if it is managed.
    pub(crate) fn into_local<R: Payload>(self, endpoint: &str) -> Result<(Option<u64>, R)> {
        match self {
            Outcome::Fresh(v) => Ok((None, downcast(v, endpoint)?)),
            Outcome::Shared(v) => Ok((None, v.alias_as(endpoint)?)),
            Outcome::Object { id, value } => Ok((Some(id), value.alias_as(endpoint)?)),
        }
    }

    /// The value as a message for `link`'s peer, and the object id if it is managed.
    /// By reference: keep the outcome alive until the message is queued, so that releases
    /// of the caller's own storages it returns are queued after it.
    /// Also returns the bytes of GPU memory lent.
    pub(crate) fn lend(&self, link: &Arc<Link>) -> Result<(Option<u64>, PackedPayload, u64)> {
        let (object, (payload, bytes)) = match self {
            Outcome::Fresh(v) => (None, v.encode_dyn("result")?.lend(link)?),
            Outcome::Shared(v) => (None, v.encoded()?.lend(link)?),
            Outcome::Object { id, value } => (Some(*id), value.encoded()?.lend(link)?),
        };
        Ok((object, payload, bytes))
    }
}

/// A call prepared by an endpoint's dispatch: its cache key and its body, with the
/// decoded arguments moved in.
///
/// ```
/// use shared_tensor_runtime::{exec::Prepared, payload::Decoder, Result};
/// fn dispatch(_dec: &mut Decoder) -> Result<Prepared> {
///     let n: i64 = 4; // decoded from `_dec` in generated code
///     Ok(Prepared::new(None, move || Ok(tch::Tensor::zeros([n], (tch::Kind::Float, tch::Device::Cuda(0))))))
/// }
/// # let _ = dispatch;
/// ```
pub struct Prepared {
    pub(crate) key: Option<String>,
    pub(crate) body: Box<dyn FnOnce() -> Result<Box<dyn AnyPayload>> + Send>,
}

impl Prepared {
    /// A call with this key (`None` when the endpoint is neither cached nor singleflight)
    /// whose body returns `R` or an error.
    ///
    /// ```
    /// use shared_tensor_runtime::exec::Prepared;
    /// use tch::{Device, Kind, Tensor};
    /// let size: i64 = 1024; // a decoded argument, also the cache key
    /// let body = move || Ok(Tensor::zeros([size], (Kind::Half, Device::Cuda(0))));
    /// let call = Prepared::new(Some(size.to_string()), body);
    /// # let _ = call;
    /// ```
    pub fn new<R: Payload>(key: Option<String>, body: impl FnOnce() -> Result<R> + Send + 'static) -> Prepared {
        Prepared { key, body: Box::new(move || body().map(|r| Box::new(r) as Box<dyn AnyPayload>)) }
    }
}
