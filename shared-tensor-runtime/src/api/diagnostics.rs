//! Timings of the individual CUDA steps of a transfer, for the benchmark's breakdown.
//! Not a stable API.

use std::time::Instant;

use tch::Tensor;

use crate::device::ffi;
use crate::device::ipc::{self, EventHandle, TensorDescriptor};
use crate::error::{Error, Result};

/// Median microseconds of `n` runs of `f`.
fn p50(n: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64() * 1e6);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

fn device_of(t: &Tensor) -> Result<u32> {
    match t.device() {
        tch::Device::Cuda(i) => Ok(i as u32),
        other => Err(Error::NotCuda { path: "tensor".into(), device: format!("{other:?}") }),
    }
}

/// The producer's steps for one CUDA tensor: p50 microseconds of each, over `n` runs.
pub fn export_steps(t: &Tensor, n: usize) -> Result<Vec<(&'static str, f64)>> {
    let device = device_of(t)?;
    let ins = ipc::inspect(t, &|| "tensor".into())?;
    let view = ins.view.clone();
    Ok(vec![
        ("inspect (metadata and storage reference)", p50(n, || ipc::inspect(t, &|| "tensor".into()).map(drop))?),
        (
            "shareIpcHandle (cudaIpcGetMemHandle)",
            p50(n, || ffi::export_storage(&ins.storage).map(drop).map_err(|m| Error::cuda("export", m)))?,
        ),
        ("record interprocess event", p50(n, || EventHandle::record(device).map(drop))?),
        ("stream synchronize (idle stream)", p50(n, || crate::device::cuda::synchronize_stream(device))?),
        ("tensor over a local storage", p50(n, || ipc::view_tensor(&ins.storage, &view).map(drop))?),
        ("whole ipc::export", p50(n, || ipc::export(t).map(drop))?),
    ])
}

/// Exports a tensor with a ready event even when the stream is idle (the hot path omits
/// it), so that [`import_steps`] can time the resolution of a cross-process event.
pub fn export_with_event(t: &Tensor) -> Result<ipc::ExportedTensor> {
    let exported = ipc::export(t)?;
    let (mut desc, hold) = exported.into_parts();
    desc.ready = Some(EventHandle::record(device_of(t)?)?);
    Ok(ipc::ExportedTensor::from_parts(desc, hold))
}

/// The consumer's steps for one descriptor from another process: p50 microseconds of
/// each, over `n` runs (the mapping is cached after the first open).
pub fn import_steps(desc: &TensorDescriptor, n: usize) -> Result<Vec<(&'static str, f64)>> {
    let (first, device) = ipc::open_storage(&desc.storage, 0)?;
    let ready = desc.ready.ok_or_else(|| Error::Protocol("export with `export_with_event` to profile".into()))?;
    Ok(vec![
        ("open storage (mapping cached)", p50(n, || ipc::open_storage(&desc.storage, 0).map(drop))?),
        ("enqueue a wait for the ready event", p50(n, || ready.wait(device))?),
        (
            "wait for the (long completed) ready event, then synchronize the stream",
            p50(n, || {
                ready.wait(device)?;
                crate::device::cuda::synchronize_stream(device)
            })?,
        ),
        ("tensor over the mapped storage", p50(n, || ipc::view_tensor(&first, &desc.view).map(drop))?),
        (
            "open + view + drop (drop syncs the stream)",
            p50(n, || {
                let (s, _) = ipc::open_storage(&desc.storage, 0)?;
                ipc::view_tensor(&s, &desc.view).map(drop)
            })?,
        ),
    ])
}

/// The phases of a remote call of `endpoint` that returns `O`: p50 microseconds of each,
/// over `n` calls through `client`: until the reply is in (request, server, reply, its
/// MessagePack decoded), until the value is built (storages opened, tensors made), and
/// dropping it (storage releases queued; a managed handle's release queued).
///
/// ```no_run
/// # fn demo(client: &shared_tensor_runtime::client::Client) -> shared_tensor_runtime::Result<()> {
/// use shared_tensor_runtime::{diagnostics::call_steps, handle::Managed};
/// let steps = call_steps::<Managed<Vec<tch::nn::Linear>>, _, _>(client, "big_model", || (24i64, 4096i64), 100)?;
/// for (phase, us) in steps {
///     println!("{phase}: {us:.1} µs");
/// }
/// # Ok(()) }
/// ```
pub fn call_steps<O: crate::api::handle::Output, V, A: crate::payload::Args<V>>(
    client: &crate::net::client::Client,
    endpoint: &str,
    args: impl Fn() -> A,
    n: usize,
) -> Result<Vec<(&'static str, f64)>> {
    let mut phases = [Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n)];
    for _ in 0..n {
        let t0 = Instant::now();
        let (answer, encoded) = client.call_parts(endpoint, args())?;
        let t1 = Instant::now();
        let value: O =
            crate::api::handle::from_answer(answer, &crate::api::handle::Backend::remote(client.clone()), endpoint)?;
        drop(encoded);
        let t2 = Instant::now();
        drop(value);
        let t3 = Instant::now();
        for (phase, (a, b)) in phases.iter_mut().zip([(t0, t1), (t1, t2), (t2, t3)]) {
            phase.push((b - a).as_secs_f64() * 1e6);
        }
    }
    let p50 = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let [reply, build, dropped] = phases;
    Ok(vec![
        ("until the reply is in and decoded", p50(reply)),
        ("building the value (open storages, make tensors)", p50(build)),
        ("dropping the value", p50(dropped)),
    ])
}
