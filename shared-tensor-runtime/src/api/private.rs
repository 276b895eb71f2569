//! What `#[share]` expands to calls. Not a public API: names and signatures may change
//! in any release.

use std::fmt::Display;

pub use inventory;
pub use serde;

pub use crate::api::handle::{Output, TaskHandle};
pub use crate::exec::endpoint::{CallKey, Concurrency, EndpointDef, EndpointOptions, Execution, KeyPart, Registration};
pub use crate::exec::value::Prepared;
pub use crate::payload::{Argument, Decoder, Encoder, Node};

use crate::api::handle::{from_answer, from_outcome, Backend};
use crate::api::runtime;
use crate::error::{Error, Result};
use crate::exec::managed::Holder;
use crate::exec::value::AnyPayload;
use crate::payload::Encoded;
use crate::protocol::config::Role;

/// Encodes one argument; errors name the parameter.
pub fn encode_arg<V, A: Argument<V>>(enc: &mut Encoder, name: &str, value: &A) -> Result<Node> {
    enc.field(name, |enc| value.encode_arg(enc))
}

/// An owned copy of a borrowed argument (for `submit`, whose body runs later).
pub fn owned_arg<V, A: Argument<V>>(value: &A) -> Result<A> {
    value.to_owned_arg()
}

/// The argument nodes of a call, checked against the endpoint's parameters.
pub fn decode_args(dec: &mut Decoder, def: &EndpointDef) -> Result<std::vec::IntoIter<Node>> {
    match dec.take_root() {
        Node::Seq(nodes) if nodes.len() == def.params.len() => Ok(nodes.into_iter()),
        Node::Seq(nodes) => Err(Error::BadArguments {
            endpoint: def.name.into(),
            reason: format!(
                "expected {} argument(s) ({}), got {}",
                def.params.len(),
                def.params.join(", "),
                nodes.len()
            ),
        }),
        other => Err(Error::BadArguments {
            endpoint: def.name.into(),
            reason: format!("expected a sequence of arguments, got {other:?}"),
        }),
    }
}

/// Decodes one argument; errors name the endpoint and the parameter.
pub fn decode_arg<V, A: Argument<V>>(
    dec: &mut Decoder,
    def: &EndpointDef,
    name: &str,
    node: Option<Node>,
) -> Result<A> {
    let node =
        node.ok_or_else(|| Error::BadArguments { endpoint: def.name.into(), reason: format!("missing {name}") })?;
    dec.field(name, |dec| A::decode_arg(node, dec)).map_err(|e| match e {
        Error::Protocol(reason) => Error::BadArguments { endpoint: def.name.into(), reason },
        other => other,
    })
}

/// A body's result, for bodies declared to return `Result<T, E>`.
pub fn body_result<T, E: Display>(endpoint: &str, result: std::result::Result<T, E>) -> Result<T> {
    result.map_err(|e| Error::Endpoint { endpoint: endpoint.into(), message: e.to_string() })
}

/// One call of a `#[share]` function: the hidden arguments type `#[share]` generates for
/// each endpoint (`__shared_tensor_args_NAME`, one field per parameter) implements it, so
/// that the stub and every companion are one call into this module.
pub trait CallArgs: Sized {
    /// What the body produces (the endpoint's value, before `Managed`).
    type Value;
    /// The endpoint.
    fn def(&self) -> &'static EndpointDef;
    /// The call's cache key; `None` for an endpoint neither cached nor singleflight.
    fn key(&self) -> Result<Option<String>>;
    /// The argument nodes, one per parameter (client role).
    fn encode(&self, enc: &mut Encoder) -> Result<Vec<Node>>;
    /// Runs the body on this thread (server and local roles).
    fn run(self) -> Result<Self::Value>;
    /// The body with owned arguments, to run later (`submit` in the server and local roles).
    fn detach(self) -> Result<Box<dyn FnOnce() -> Result<Self::Value> + Send>>;
}

fn encode_args(args: &impl CallArgs) -> Result<Encoded> {
    let mut enc = Encoder::new("");
    let nodes = args.encode(&mut enc)?;
    Ok(enc.finish(Node::Seq(nodes)))
}

/// A future for async callers: boxed, `Send`, borrowing nothing.
pub type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'static>>;

/// Compile-time check that a result type is a payload (errors point at the return type).
pub fn assert_payload<P: crate::payload::Payload>() {}

/// Check that a parameter a `cache_key` template names can be part of a key (errors
/// point at its type).
pub fn assert_key_part<K: KeyPart + ?Sized>(_: &K) {}

/// Compile-time check that a parameter type can be an argument.
pub fn assert_argument<V, A: Argument<V>>() {}

/// A call of a `#[share]` function, in whatever role this process has: the body runs
/// here in the server and local roles, the arguments are encoded and sent in the client role.
pub fn call<O: Output, A: CallArgs<Value = O::Value>>(args: A) -> Result<O> {
    let def = args.def();
    let rt = runtime::global()?;
    match rt.role() {
        Role::Client => {
            let client = rt.client()?;
            let encoded = encode_args(&args)?;
            drop(args);
            let answer = client.call_encoded(def.name, &encoded)?;
            drop(encoded);
            from_answer(answer, &Backend::remote(client.clone()), def.name)
        }
        Role::Server | Role::Local => {
            let core = rt.core();
            let key = args.key()?;
            let body = move || args.run().map(|v| Box::new(v) as Box<dyn AnyPayload>);
            let outcome = core.call(def, key, Holder::Local, body)?;
            from_outcome(outcome, &Backend::local(core.clone()), def.name)
        }
    }
}

/// The async counterpart of [`call`]. In the client role the arguments are encoded and
/// the request sent now, and the future awaits the reply (a plain future: any executor);
/// in the server and local roles the call runs now, on the calling thread, and the
/// future is ready. Connecting is synchronous: a client that is not connected yet
/// connects here, on the calling thread, blocking it up to the connect timeout (see the
/// generated `NAME::call_async` docs for how to connect at start-up instead).
pub fn call_async<O: Output, A: CallArgs<Value = O::Value>>(args: A) -> BoxFuture<Result<O>> {
    let def = args.def();
    let client = match runtime::global().and_then(|rt| match rt.role() {
        Role::Client => rt.client().cloned().map(Some),
        _ => Ok(None),
    }) {
        Ok(Some(client)) => client,
        Ok(None) => return Box::pin(std::future::ready(call::<O, A>(args))),
        Err(e) => return Box::pin(std::future::ready(Err(e))),
    };
    // Sent now, as the sync call would; the future only waits for the reply (on any
    // executor) and, dropped early, releases what the reply lends.
    let sent = encode_args(&args).and_then(|encoded| {
        let request = client.call_request(def.name, &encoded, false)?;
        Ok((encoded, client.request_async(request, Some(client.call_timeout()))?))
    });
    drop(args);
    Box::pin(async move {
        let (encoded, reply) = sent?;
        let answer = reply.await?;
        drop(encoded);
        from_answer(answer, &Backend::remote(client.clone()), def.name)
    })
}

/// Submits a call of a `#[share]` function as a task. In the server and local roles the
/// body, with owned arguments ([`CallArgs::detach`]), runs in the background.
pub fn submit<O: Output, A: CallArgs<Value = O::Value>>(args: A) -> Result<TaskHandle<O>> {
    let def = args.def();
    let rt = runtime::global()?;
    match rt.role() {
        Role::Client => {
            let client = rt.client()?;
            let encoded = encode_args(&args)?;
            drop(args);
            let id = client.submit_encoded(def.name, &encoded)?;
            drop(encoded);
            Ok(TaskHandle::new(id, def.name, Backend::remote(client.clone())))
        }
        Role::Server | Role::Local => {
            let core = rt.core();
            let key = args.key()?;
            let body = args.detach()?;
            let body = Box::new(move || body().map(|v| Box::new(v) as Box<dyn AnyPayload>));
            let id = core.submit(def, key, body)?;
            Ok(TaskHandle::new(id, def.name, Backend::local(core.clone())))
        }
    }
}

/// Drops the cache entry of one key (`NAME::invalidate(args...)`).
pub fn invalidate(def: &'static EndpointDef, key: String) -> Result<bool> {
    runtime::invalidate_cache_key(def.name, &key)
}
