//! Handles: managed objects ([`Managed`]) and tasks ([`TaskHandle`]), the same types in
//! every role.
//!
//! A handle talks to a **backend**: the process's own execution core (server and local
//! roles) or the server through a client connection (client role).

use std::future::{Future, IntoFuture};
use std::marker::PhantomData;
use std::ops::Deref;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::exec::engine::Core;
use crate::exec::managed::{Holder, ObjectInfo};
use crate::exec::task::TaskInfo;
use crate::exec::value::Outcome;
use crate::net::client::{Answer, Client};
use crate::payload::{Args, Decoder, Payload};
use crate::protocol::control::Control;
use crate::protocol::wire::Request;

/// Where handles send their requests: this process's core, or a server through a client.
#[doc(hidden)]
#[derive(Clone)]
pub struct Backend(pub(crate) Via);

#[derive(Clone)]
pub(crate) enum Via {
    /// This process's core.
    Local(Arc<Core>),
    /// A server, through a client.
    Remote(Client),
}

impl Backend {
    pub(crate) fn local(core: Arc<Core>) -> Backend {
        Backend(Via::Local(core))
    }

    pub(crate) fn remote(client: Client) -> Backend {
        Backend(Via::Remote(client))
    }

    fn server_id(&self) -> Result<u64> {
        match &self.0 {
            Via::Local(core) => Ok(core.server_id),
            Via::Remote(client) => client.server_id(),
        }
    }

    pub(crate) fn release_many(&self, ids: &[u64]) -> Result<Vec<bool>> {
        match &self.0 {
            Via::Local(core) => Ok(core.release_objects(ids, Holder::Local)),
            Via::Remote(client) => client.release_many(ids),
        }
    }

    /// Releases one reference without waiting for the outcome (a handle's release).
    pub(crate) fn release_one(&self, id: u64) {
        match &self.0 {
            Via::Local(core) => {
                core.release_objects(&[id], Holder::Local);
            }
            Via::Remote(client) => client.release_later(id),
        }
    }

    pub(crate) fn object_info(&self, id: u64) -> Result<Option<ObjectInfo>> {
        match &self.0 {
            Via::Local(core) => Ok(core.objects.info(id)),
            Via::Remote(client) => client.object_info(id),
        }
    }

    pub(crate) fn task_info(&self, id: u64) -> Result<TaskInfo> {
        match &self.0 {
            Via::Local(core) => core.tasks.get(id).map(|t| t.info()),
            Via::Remote(client) => client.task_info(id),
        }
    }

    pub(crate) fn cancel_task(&self, id: u64) -> Result<bool> {
        match &self.0 {
            Via::Local(core) => core.tasks.get(id).map(|t| t.cancel()),
            Via::Remote(client) => client.cancel_task(id),
        }
    }

    /// Waits for a task (blocking) and returns its result as `O`.
    pub(crate) fn wait_task<O: Output>(&self, id: u64, timeout: Option<Duration>, endpoint: &str) -> Result<O> {
        match &self.0 {
            Via::Local(core) => from_outcome(core.wait(id, Holder::Local, timeout)?, self, endpoint),
            Via::Remote(client) => from_answer(client.request(Request::WaitTask(id), timeout)?, self, endpoint),
        }
    }

    /// Awaits a task and returns its result as `O`.
    pub(crate) async fn wait_task_async<O: Output>(&self, id: u64, endpoint: &str) -> Result<O> {
        match &self.0 {
            Via::Local(core) => {
                let record = core.tasks.get(id)?;
                record.wait_async().await;
                from_outcome(core.collect(&record, Holder::Local)?, self, endpoint)
            }
            Via::Remote(client) => {
                from_answer(client.request_async(Request::WaitTask(id), None)?.await?, self, endpoint)
            }
        }
    }
}

/// What a call returns: a payload, or a [`Managed`] handle to one. Implemented by the
/// runtime; the `#[share]` macro picks it from the `managed` option.
///
/// ```no_run
/// use shared_tensor_runtime::handle::{Managed, Output};
/// fn collect<O: Output>(task: u64) -> shared_tensor_runtime::Result<O> {
///     shared_tensor_runtime::runtime::wait_for_task(task)
/// }
/// let plain: tch::Tensor = collect(7)?;
/// let managed: Managed<tch::Tensor> = collect(8)?;
/// # Ok::<(), shared_tensor_runtime::Error>(())
/// ```
pub trait Output: Sized + Send + 'static {
    /// The payload inside.
    type Value: Payload;
    /// Builds the output from a value and, for a managed result, its object id.
    #[doc(hidden)]
    fn from_parts(object: Option<u64>, value: Self::Value, backend: &Backend, endpoint: &str) -> Result<Self>;
}

/// A local call's outcome as the caller's output type.
pub(crate) fn from_outcome<O: Output>(outcome: Outcome, backend: &Backend, endpoint: &str) -> Result<O> {
    let (object, value) = outcome.into_local::<O::Value>(endpoint)?;
    O::from_parts(object, value, backend, endpoint)
}

/// A server's answer as the caller's output type: decodes (opens) the value's tensors.
pub(crate) fn from_answer<O: Output>(answer: Answer, backend: &Backend, endpoint: &str) -> Result<O> {
    match answer {
        Answer::Value { object, received } => {
            let mut dec = Decoder::new(received, "result");
            let root = dec.take_root();
            match O::Value::decode(root, &mut dec) {
                Ok(value) => O::from_parts(object, value, backend, endpoint),
                Err(e) => {
                    if let Some(id) = object {
                        let _ = backend.release_many(&[id]);
                    }
                    Err(e)
                }
            }
        }
        Answer::Other(r) => Err(Error::Protocol(format!("{endpoint} answered {r:?} instead of a value"))),
    }
}

impl<P: Payload> Output for P {
    type Value = P;
    fn from_parts(object: Option<u64>, value: P, backend: &Backend, endpoint: &str) -> Result<P> {
        match object {
            None => Ok(value),
            Some(id) => {
                let _ = backend.release_many(&[id]);
                Err(Error::BadArguments {
                    endpoint: endpoint.into(),
                    reason: "it is a managed endpoint: ask for shared_tensor::Managed<T>".into(),
                })
            }
        }
    }
}

/// A managed object: a value that the server keeps registered (and cached) until every
/// handle to it is released. Derefs to the value.
///
/// Released on drop, or earlier with [`Managed::release`]. [`Managed::detach`] keeps
/// the server's reference past the handle's scope (release it later with
/// `release_many`). The value's tensors stay valid after a release for as long as this
/// process holds them (their memory is leased separately); a release only lets the
/// server forget the object.
///
/// In the seed this is `SharedObjectHandle`.
///
/// ```no_run
/// # use shared_tensor_runtime::handle::Managed;
/// fn use_model(model: Managed<tch::nn::Linear>) {
///     use tch::nn::Module;
///     let x = tch::Tensor::ones([1, 4], (tch::Kind::Float, tch::Device::Cuda(0)));
///     let y = model.forward(&x); // Deref to nn::Linear
///     println!("object {} -> {y}", model.object_id());
///     assert!(model.release()); // or just drop it
///     assert!(!model.release());
/// }
/// ```
pub struct Managed<T> {
    value: Option<T>,
    object_id: u64,
    server_id: u64,
    backend: Backend,
    released: AtomicBool,
}

impl<T> std::fmt::Debug for Managed<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Managed")
            .field("object_id", &self.object_id)
            .field("server_id", &self.server_id)
            .field("released", &self.released.load(Ordering::Relaxed))
            .finish()
    }
}

impl<P: Payload> Output for Managed<P> {
    type Value = P;
    fn from_parts(object: Option<u64>, value: P, backend: &Backend, endpoint: &str) -> Result<Self> {
        let object_id = object.ok_or_else(|| Error::BadArguments {
            endpoint: endpoint.into(),
            reason: "it is not a managed endpoint: ask for the value itself".into(),
        })?;
        let server_id = backend.server_id()?;
        Ok(Managed {
            value: Some(value),
            object_id,
            server_id,
            backend: backend.clone(),
            released: AtomicBool::new(false),
        })
    }
}

impl<T> Deref for Managed<T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.value.as_ref().expect("a Managed always holds its value until detach() consumes it")
    }
}

impl<T> Managed<T> {
    /// The object's id in the server's registry.
    ///
    /// ```no_run
    /// # fn demo(model: shared_tensor_runtime::handle::Managed<tch::Tensor>) {
    /// let id = model.object_id();
    /// println!("object {id} on server {}", model.server_id());
    /// # }
    /// ```
    pub fn object_id(&self) -> u64 {
        self.object_id
    }

    /// The id of the server that holds it.
    ///
    /// ```no_run
    /// # fn demo(model: shared_tensor_runtime::handle::Managed<tch::Tensor>) -> shared_tensor_runtime::Result<()> {
    /// let now = shared_tensor_runtime::runtime::server_info()?.server_id;
    /// if model.server_id() != now {
    ///     println!("the server restarted since object {} was built", model.object_id());
    /// }
    /// # Ok(()) }
    /// ```
    pub fn server_id(&self) -> u64 {
        self.server_id
    }

    /// The value (also reachable through `Deref`).
    ///
    /// ```no_run
    /// # fn demo(weights: shared_tensor_runtime::handle::Managed<tch::Tensor>) {
    /// let tensor: &tch::Tensor = weights.value();
    /// println!("{:?} on {:?}", tensor.size(), tensor.device());
    /// # }
    /// ```
    pub fn value(&self) -> &T {
        self
    }

    /// Releases this handle's reference: true the first time, false after. A server that
    /// is gone has dropped the object already; that counts as released.
    ///
    /// In the client role the release is sent without waiting for the server: it reaches
    /// the server ahead of this process's next request on the same connection, or at once
    /// if none follows, so dropping a handle costs no round trip.
    ///
    /// ```no_run
    /// # fn demo(weights: shared_tensor_runtime::handle::Managed<tch::Tensor>) {
    /// assert!(weights.release()); // the server may now forget the object
    /// assert!(!weights.release()); // a second release does nothing
    /// # }
    /// ```
    pub fn release(&self) -> bool {
        if self.released.swap(true, Ordering::AcqRel) {
            return false;
        }
        self.backend.release_one(self.object_id);
        true
    }

    /// Keeps the server's reference past this handle: returns the value and the object id
    /// and does not release on drop. Release it later with `release_many(&[id])`.
    ///
    /// ```no_run
    /// # fn demo(weights: shared_tensor_runtime::handle::Managed<tch::Tensor>) -> shared_tensor_runtime::Result<()> {
    /// let (tensor, id) = weights.detach();
    /// // ... use `tensor`; the server keeps the object until:
    /// shared_tensor_runtime::runtime::release_many(&[id])?;
    /// # Ok(()) }
    /// ```
    pub fn detach(mut self) -> (T, u64) {
        self.released.store(true, Ordering::Release);
        (self.value.take().expect("a Managed always holds its value until detach()"), self.object_id)
    }

    /// The object's registry entry (refcount, times, cache key).
    ///
    /// ```no_run
    /// # fn demo(model: shared_tensor_runtime::handle::Managed<tch::Tensor>) -> shared_tensor_runtime::Result<()> {
    /// let info = model.info()?;
    /// println!("{} refs, cache key {:?}", info.refcount, info.cache_key);
    /// # Ok(()) }
    /// ```
    pub fn info(&self) -> Result<ObjectInfo> {
        self.ensure_live()?;
        self.backend.object_info(self.object_id)?.ok_or_else(|| self.gone("it was destroyed"))
    }

    /// Whether the object still exists on the server this handle came from.
    ///
    /// ```no_run
    /// # fn demo(model: shared_tensor_runtime::handle::Managed<tch::Tensor>) {
    /// if !model.is_live() {
    ///     println!("object {} is gone: call the endpoint again", model.object_id());
    /// }
    /// # }
    /// ```
    pub fn is_live(&self) -> bool {
        self.ensure_live().is_ok()
    }

    /// Fails with [`Error::ObjectGone`] if the handle was released, the object was
    /// destroyed, or the server restarted since.
    ///
    /// ```no_run
    /// # fn demo(model: shared_tensor_runtime::handle::Managed<tch::Tensor>) -> shared_tensor_runtime::Result<()> {
    /// model.ensure_live()?; // Error::ObjectGone says why it is not
    /// let y = model.value() * 2;
    /// # Ok(()) }
    /// ```
    pub fn ensure_live(&self) -> Result<()> {
        if self.released.load(Ordering::Acquire) {
            return Err(self.gone("this handle released it"));
        }
        let server = self.backend.server_id()?;
        if server != self.server_id {
            return Err(self.gone(&format!("the server restarted (id {} is now {server})", self.server_id)));
        }
        match self.backend.object_info(self.object_id)? {
            Some(_) => Ok(()),
            None => Err(self.gone("it was destroyed on the server")),
        }
    }

    fn gone(&self, reason: &str) -> Error {
        Error::ObjectGone { object: self.object_id, reason: reason.into() }
    }
}

impl<T> Drop for Managed<T> {
    fn drop(&mut self) {
        self.release();
    }
}

/// A submitted task. Wait for it here, await it in async code, or give its [`id`]
/// to another handle or process (`wait_for_task`).
///
/// ```no_run
/// # fn demo(task: shared_tensor_runtime::handle::TaskHandle<tch::Tensor>) -> shared_tensor_runtime::Result<()> {
/// println!("task {} is {:?}", task.id(), task.status()?.status);
/// let t = task.wait_timeout(std::time::Duration::from_secs(30))?;
/// # Ok(()) }
/// ```
///
/// [`id`]: TaskHandle::id
pub struct TaskHandle<O> {
    id: u64,
    endpoint: String,
    backend: Backend,
    _output: PhantomData<fn() -> O>,
}

impl<O> std::fmt::Debug for TaskHandle<O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskHandle").field("id", &self.id).field("endpoint", &self.endpoint).finish()
    }
}

impl<O: Output> TaskHandle<O> {
    pub(crate) fn new(id: u64, endpoint: &str, backend: Backend) -> Self {
        TaskHandle { id, endpoint: endpoint.into(), backend, _output: PhantomData }
    }

    /// The task id.
    ///
    /// ```no_run
    /// # fn demo(task: shared_tensor_runtime::handle::TaskHandle<tch::Tensor>) -> shared_tensor_runtime::Result<()> {
    /// let id = task.id(); // hand it to another process, which waits with:
    /// let tensor: tch::Tensor = shared_tensor_runtime::runtime::wait_for_task(id)?;
    /// # Ok(()) }
    /// ```
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Status, timestamps, error message and progress.
    ///
    /// ```no_run
    /// # fn demo(task: shared_tensor_runtime::handle::TaskHandle<tch::Tensor>) -> shared_tensor_runtime::Result<()> {
    /// let info = task.status()?;
    /// if let Some(progress) = info.progress {
    ///     println!("{:?}: {:.0}% {}", info.status, progress.fraction * 100.0, progress.message);
    /// }
    /// # Ok(()) }
    /// ```
    pub fn status(&self) -> Result<TaskInfo> {
        self.backend.task_info(self.id)
    }

    /// Cancels the task if it has not started; true if it was cancelled.
    ///
    /// ```no_run
    /// # fn demo(task: shared_tensor_runtime::handle::TaskHandle<tch::Tensor>) -> shared_tensor_runtime::Result<()> {
    /// if !task.cancel()? {
    ///     let t = task.wait()?; // it had started: take its result
    /// }
    /// # Ok(()) }
    /// ```
    pub fn cancel(&self) -> Result<bool> {
        self.backend.cancel_task(self.id)
    }

    /// Blocks until the task ends and returns its result (or its error).
    ///
    /// ```no_run
    /// # fn demo(task: shared_tensor_runtime::handle::TaskHandle<tch::Tensor>) -> shared_tensor_runtime::Result<()> {
    /// let tensor = task.wait()?;
    /// println!("{:?}", tensor.size());
    /// # Ok(()) }
    /// ```
    pub fn wait(&self) -> Result<O> {
        self.backend.wait_task(self.id, None, &self.endpoint)
    }

    /// Like [`TaskHandle::wait`], failing with [`Error::Timeout`] after `timeout` (the task
    /// keeps running).
    ///
    /// ```no_run
    /// # fn demo(task: shared_tensor_runtime::handle::TaskHandle<tch::Tensor>) -> shared_tensor_runtime::Result<()> {
    /// use shared_tensor_runtime::Error;
    /// match task.wait_timeout(std::time::Duration::from_secs(5)) {
    ///     Err(Error::Timeout { .. }) => println!("task {} still runs", task.id()),
    ///     other => println!("{:?}", other?.size()),
    /// }
    /// # Ok(()) }
    /// ```
    pub fn wait_timeout(&self, timeout: Duration) -> Result<O> {
        self.backend.wait_task(self.id, Some(timeout), &self.endpoint)
    }

    /// Awaits the task's end.
    ///
    /// The request is sent when the future is first polled, over the client's connection;
    /// a client that is not connected connects synchronously then, blocking the polling
    /// thread (up to the connect timeout for a first connection; one short attempt after
    /// a lost one). To keep that off an
    /// executor thread, connect at start-up on a blocking thread with
    /// [`wait_for_server`](crate::api::runtime::wait_for_server) (or
    /// [`Client::connect`](crate::net::client::Client::connect)).
    ///
    /// ```no_run
    /// # use shared_tensor_runtime::{handle::TaskHandle, Result};
    /// # async fn demo(task: TaskHandle<tch::Tensor>) -> Result<()> {
    /// let tensor = task.wait_async().await?; // or `task.await?`, which consumes the handle
    /// println!("{:?}", tensor.size());
    /// # Ok(()) }
    /// ```
    pub async fn wait_async(&self) -> Result<O> {
        self.backend.wait_task_async(self.id, &self.endpoint).await
    }
}

impl<O: Output> IntoFuture for TaskHandle<O> {
    type Output = Result<O>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<O>> + Send>>;
    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move { self.wait_async().await })
    }
}

// Typed calls on a client: defined here, over the client, since their results are this
// layer's handles and outputs.
impl Client {
    /// Calls an endpoint by name with typed arguments (manual mode: no need to link the
    /// endpoint's definition). `O` is the result type, or `Managed<result>` for a managed
    /// endpoint.
    ///
    /// ```no_run
    /// # fn demo(client: &shared_tensor_runtime::client::Client, x: &tch::Tensor) -> shared_tensor_runtime::Result<()> {
    /// let y: tch::Tensor = client.call("identity", (x,))?;
    /// # Ok(()) }
    /// ```
    pub fn call<O: Output, V>(&self, endpoint: &str, args: impl Args<V>) -> Result<O> {
        let (answer, encoded) = self.call_parts(endpoint, args)?;
        drop(encoded);
        from_answer(answer, &Backend::remote(self.clone()), endpoint)
    }

    /// Submits an endpoint call by name as a task.
    ///
    /// ```no_run
    /// # fn demo(client: &shared_tensor_runtime::client::Client) -> shared_tensor_runtime::Result<()> {
    /// use shared_tensor_runtime::handle::TaskHandle;
    /// let task: TaskHandle<tch::Tensor> = client.submit("train_step", (4i64,))?;
    /// println!("submitted task {}", task.id());
    /// let loss = task.wait()?;
    /// # let _ = loss;
    /// # Ok(()) }
    /// ```
    pub fn submit<O: Output, V>(&self, endpoint: &str, args: impl Args<V>) -> Result<TaskHandle<O>> {
        let id = self.submit_id(endpoint, args)?;
        Ok(TaskHandle::new(id, endpoint, Backend::remote(self.clone())))
    }

    /// A handle to a task known by id.
    ///
    /// ```no_run
    /// # fn demo(client: &shared_tensor_runtime::client::Client) -> shared_tensor_runtime::Result<()> {
    /// // A task submitted elsewhere (another thread or process), known by its id.
    /// let handle = client.task::<tch::Tensor>(42)?;
    /// let result = handle.wait()?;
    /// # let _ = result;
    /// # Ok(()) }
    /// ```
    pub fn task<O: Output>(&self, task: u64) -> Result<TaskHandle<O>> {
        let endpoint = self.task_info(task)?.endpoint;
        Ok(TaskHandle::new(task, &endpoint, Backend::remote(self.clone())))
    }
}
