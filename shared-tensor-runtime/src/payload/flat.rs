//! An explicit flat layout: a whole model's parameters in one buffer per dtype.
//!
//! A payload's tensors travel as their storages (one CUDA IPC handle and mapping each)
//! plus views of them. A model built variable by variable has one storage per variable:
//! a 7B-class decoder has about 290, and a trainer that hands fresh weights to an
//! inference process every step (weight sync) pays for each of them on every send.
//! [`flatten_var_store`] (or [`flatten_tensors`] for tensors kept elsewhere) moves the
//! variables into one new buffer per dtype and re-points each variable at its view of
//! it, in place, the way inference engines "bucket" weights for weight sync: the model
//! then travels as one storage per dtype, and arrives the same way.
//!
//! Use it once, after building (or loading) a model and before sharing it, when it has
//! many tensors; a model of a few large tensors gains nothing. It copies every variable
//! once (device to device) and briefly needs the memory twice.
//!
//! ```no_run
//! use shared_tensor_runtime::payload::flat::flatten_var_store;
//! use tch::nn;
//!
//! let vs = nn::VarStore::new(tch::Device::Cuda(0));
//! let layers: Vec<nn::Linear> =
//!     (0..64).map(|i| nn::linear(vs.root() / i, 1024, 1024, Default::default())).collect();
//! let report = flatten_var_store(&vs)?; // the layers above compute on the new buffer
//! assert_eq!(report.buffers.len(), 1); // one f32 buffer for 128 variables
//! # Ok::<(), shared_tensor_runtime::Error>(())
//! ```
//!
//! What is kept: values, shapes, strides, `requires_grad`, and every sharing between
//! variables (tied weights, views of one another): tensors over one storage are copied
//! as that whole storage, so they stay views of one region. Modules see the change
//! because tch's modules hold the very tensors of the `VarStore` (shallow clones share
//! the tensor, and `set_` changes the tensor, not a copy of it); a module that keeps a
//! derived tensor (`ws.t()`, a `to_kind` copy) keeps the old memory.
//!
//! An [`Lstm`](super::nn::Lstm) or [`Gru`](super::nn::Gru) inside the store loses
//! cuDNN's layout (cuDNN wants its weights at the start of their own buffer): cuDNN
//! then copies its weights on each forward, as for any unflattened layer.

use std::collections::BTreeMap;

use tch::{Device, Kind, Tensor};

use crate::device::ffi;
use crate::error::{Error, Result};

/// Each buffer starts every storage at a multiple of this many bytes (what CUDA's
/// allocator and vectorised kernels expect of a tensor's start).
///
/// ```
/// use shared_tensor_runtime::payload::flat::{flatten_tensors, ALIGNMENT};
/// # use tch::{Device, Kind, Tensor};
/// let (a, b) = (Tensor::ones([1], (Kind::Float, Device::Cpu)), Tensor::ones([1], (Kind::Float, Device::Cpu)));
/// flatten_tensors(&[&a, &b])?;
/// assert_eq!(b.data_ptr() as usize - a.data_ptr() as usize, ALIGNMENT);
/// # Ok::<(), shared_tensor_runtime::Error>(())
/// ```
pub const ALIGNMENT: usize = 256;

/// What [`flatten_var_store`] or [`flatten_tensors`] did.
///
/// ```
/// use shared_tensor_runtime::payload::flat::flatten_tensors;
/// use tch::{Device, Kind, Tensor};
///
/// let a = Tensor::ones([3], (Kind::Float, Device::Cpu));
/// let b = Tensor::zeros([2, 2], (Kind::Float, Device::Cpu));
/// let report = flatten_tensors(&[&a, &b])?;
/// assert_eq!((report.tensors, report.storages), (2, 2));
/// assert_eq!(report.buffers[0].bytes, 256 + 16); // b starts at the next 256-byte boundary
/// # Ok::<(), shared_tensor_runtime::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct FlatReport {
    /// One new buffer per dtype, in the order of their first tensor.
    pub buffers: Vec<FlatBuffer>,
    /// The tensors re-pointed (tied ones counted each time).
    pub tensors: usize,
    /// The distinct storages they were over before.
    pub storages: usize,
}

/// One buffer of a [`FlatReport`].
///
/// ```
/// # use shared_tensor_runtime::payload::flat::flatten_tensors;
/// # use tch::{Device, Kind, Tensor};
/// let a = Tensor::ones([3], (Kind::Half, Device::Cpu));
/// let buffer = &flatten_tensors(&[&a])?.buffers[0];
/// assert_eq!((buffer.kind, buffer.bytes, buffer.storages), (Kind::Half, 6, 1));
/// # Ok::<(), shared_tensor_runtime::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct FlatBuffer {
    /// Its dtype.
    pub kind: Kind,
    /// Its device.
    pub device: Device,
    /// Its size in bytes (alignment gaps included).
    pub bytes: usize,
    /// The storages copied into it.
    pub storages: usize,
}

/// Moves every variable of `vs` into one new buffer per dtype, each variable a view of
/// it, in place (see the [module docs](self)). All variables must be on one device.
///
/// ```no_run
/// use shared_tensor_runtime::payload::flat::flatten_var_store;
/// let vs = tch::nn::VarStore::new(tch::Device::Cuda(0));
/// let head = tch::nn::linear(vs.root() / "head", 4096, 32000, Default::default());
/// let report = flatten_var_store(&vs)?;
/// println!("{} variables in {} buffer(s)", report.tensors, report.buffers.len());
/// # Ok::<(), shared_tensor_runtime::Error>(())
/// ```
///
/// # Errors
/// [`Error::Unsupported`] naming the variable when variables are on different devices,
/// when tensors of different dtypes view one storage, or when a buffer cannot be
/// allocated; nothing is changed then.
pub fn flatten_var_store(vs: &tch::nn::VarStore) -> Result<FlatReport> {
    // Shallow clones share each variable's tensor: re-pointing them re-points the store's.
    let variables: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    flatten(variables.into_iter().map(|(name, t)| (format!("var store variable `{name}`"), t)).collect())
}

/// Moves `tensors` into one new buffer per dtype, each tensor a view of it, in place:
/// every handle on each tensor (its shallow clones, a module's fields) sees the change.
/// For models kept outside a `VarStore` (a `HashMap<String, Tensor>` state dict).
///
/// ```
/// use shared_tensor_runtime::payload::flat::flatten_tensors;
/// use tch::{Device, Kind, Tensor};
///
/// let weight = Tensor::randn([4, 4], (Kind::Float, Device::Cpu));
/// let tied = weight.shallow_clone(); // the same tensor, e.g. a tied output head
/// let before = weight.copy();
/// flatten_tensors(&[&weight, &tied])?;
/// assert!(weight.equal(&before) && tied.data_ptr() == weight.data_ptr());
/// # Ok::<(), shared_tensor_runtime::Error>(())
/// ```
///
/// # Errors
/// As [`flatten_var_store`], naming the tensor by its index (`tensors[3]`).
pub fn flatten_tensors(tensors: &[&Tensor]) -> Result<FlatReport> {
    flatten(tensors.iter().enumerate().map(|(i, t)| (format!("tensors[{i}]"), t.shallow_clone())).collect())
}

/// A storage to copy: where it starts, its bytes, and the tensors over it.
struct Source {
    base: u64,
    bytes: u64,
    kind: Kind,
    /// A tensor over it (to read the whole storage through).
    any: Tensor,
    /// Each tensor over it.
    views: Vec<View>,
}

/// One tensor over a [`Source`], as it looks at the storage.
struct View {
    path: String,
    tensor: Tensor,
    /// In elements.
    offset: i64,
    sizes: crate::device::ipc::Dims,
    strides: crate::device::ipc::Dims,
}

fn unsupported(path: &str, reason: String) -> Error {
    Error::Unsupported { path: path.to_string(), reason }
}

fn flatten(tensors: Vec<(String, Tensor)>) -> Result<FlatReport> {
    let count = tensors.len();
    let sources = group_by_storage(tensors)?;
    let storages = sources.len();
    // Storages grouped per dtype, in the order of first appearance.
    let mut per_kind: Vec<(Kind, Vec<Source>)> = Vec::new();
    for source in sources {
        match per_kind.iter_mut().find(|(k, _)| *k == source.kind) {
            Some((_, group)) => group.push(source),
            None => per_kind.push((source.kind, vec![source])),
        }
    }
    // Allocate every buffer before changing anything, so that a failure changes nothing.
    let mut planned = Vec::new();
    for (kind, group) in per_kind {
        let item = kind.elt_size_in_bytes();
        let align = (ALIGNMENT / item).max(1) as i64;
        let mut at = 0i64;
        let mut starts = Vec::with_capacity(group.len());
        for source in &group {
            at = (at + align - 1) / align * align;
            starts.push(at);
            at += (source.bytes / item as u64) as i64;
        }
        let device = group[0].any.device();
        let buffer = Tensor::f_empty([at], (kind, device)).map_err(|e| {
            unsupported(
                &group[0].views[0].path,
                format!("its {kind:?} buffer of {at} elements on {device:?} cannot be allocated ({e})"),
            )
        })?;
        planned.push((buffer, group, starts));
    }
    let mut buffers = Vec::with_capacity(planned.len());
    tch::no_grad(|| -> Result<()> {
        for (buffer, group, starts) in planned {
            for (source, start) in group.iter().zip(&starts) {
                repoint(&buffer, source, *start)?;
            }
            let bytes = buffer.numel() * buffer.kind().elt_size_in_bytes();
            buffers.push(FlatBuffer { kind: buffer.kind(), device: buffer.device(), bytes, storages: group.len() });
        }
        Ok(())
    })?;
    Ok(FlatReport { buffers, tensors: count, storages })
}

/// Copies one storage into `buffer` at element `start` and re-points its tensors there.
fn repoint(buffer: &Tensor, source: &Source, start: i64) -> Result<()> {
    let elements = (source.bytes / source.kind.elt_size_in_bytes() as u64) as i64;
    let fail =
        |path: &str, e: tch::TchError| unsupported(path, format!("it cannot be moved into the flat buffer ({e})"));
    if elements > 0 {
        let whole = source.any.f_as_strided([elements], [1], Some(0)).map_err(|e| fail(&source.views[0].path, e))?;
        let mut place = buffer.narrow(0, start, elements);
        place.f_copy_(&whole).map_err(|e| fail(&source.views[0].path, e))?;
    }
    for view in &source.views {
        // `set_` re-points the tensor itself, which every shallow clone of it shares.
        let mut handle = view.tensor.shallow_clone();
        let _ = handle
            .f_set_source_tensor_storage_offset_(
                buffer,
                start + view.offset,
                view.sizes.as_slice(),
                view.strides.as_slice(),
            )
            .map_err(|e| fail(&view.path, e))?;
    }
    Ok(())
}

/// Groups tensors by the storage they view, checking one device and one dtype per storage.
fn group_by_storage(tensors: Vec<(String, Tensor)>) -> Result<Vec<Source>> {
    let mut sources: Vec<Source> = Vec::new();
    let mut device: Option<(Device, String)> = None;
    for (path, tensor) in tensors {
        let inspected = ffi::inspect(&tensor, false).map_err(|m| unsupported(&path, m))?;
        if inspected.meta.defined == 0 {
            return Err(unsupported(&path, "the tensor is undefined".into()));
        }
        match &device {
            None => device = Some((tensor.device(), path.clone())),
            Some((d, first)) if *d != tensor.device() => {
                return Err(unsupported(
                    &path,
                    format!("it is on {:?} but {first} is on {d:?}; move them to one device first", tensor.device()),
                ))
            }
            Some(_) => {}
        }
        let (kind, meta) = (tensor.kind(), inspected.meta);
        let item = kind.elt_size_in_bytes() as u64;
        if meta.storage_nbytes % item != 0 {
            return Err(unsupported(
                &path,
                format!("its storage of {} bytes is not whole {kind:?} elements", meta.storage_nbytes),
            ));
        }
        let view =
            View { path, tensor, offset: meta.storage_offset, sizes: inspected.sizes, strides: inspected.strides };
        // An empty storage has no address to share: each gets its own (empty) place.
        let existing = sources.iter_mut().find(|s| s.bytes > 0 && s.base == meta.storage_base);
        match existing {
            Some(source) if source.kind != kind => {
                return Err(unsupported(
                    &view.path,
                    format!(
                        "it is {kind:?} but views the storage of {}, which is {:?}; \
                         tensors of two dtypes over one storage cannot be flattened",
                        source.views[0].path, source.kind
                    ),
                ))
            }
            Some(source) => source.views.push(view),
            None => sources.push(Source {
                base: meta.storage_base,
                bytes: meta.storage_nbytes,
                kind,
                any: view.tensor.shallow_clone(),
                views: vec![view],
            }),
        }
    }
    Ok(sources)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::{self, Module};

    fn storage_base(t: &Tensor) -> u64 {
        ffi::inspect(t, false).unwrap().meta.storage_base
    }

    #[test]
    fn a_var_store_becomes_one_buffer_per_dtype_with_values_ties_and_forwards_kept() {
        tch::manual_seed(11);
        let vs = nn::VarStore::new(Device::Cpu);
        let root = vs.root();
        let layers: Vec<nn::Linear> =
            (0..5).map(|i| nn::linear(&root / "layers" / i, 6, 6, Default::default())).collect();
        let embedding = nn::embedding(&root / "emb", 10, 6, Default::default());
        // A tied head (the same tensor under a second name) and a half-precision variable.
        let head = nn::Linear { ws: (&root / "head").add("weight", embedding.ws.shallow_clone(), true), bs: None };
        let stats = root.add("stats", Tensor::arange(7, (Kind::Half, Device::Cpu)), false);
        let rows = embedding.ws.narrow(0, 2, 3); // a view of a variable, kept by the user
        let x = Tensor::randn([4, 6], (Kind::Float, Device::Cpu));
        let ids = Tensor::from_slice(&[1i64, 4, 9]);
        let forward = |x: &Tensor| {
            let h = layers.iter().fold(x.shallow_clone(), |h, l| l.forward(&h));
            (h, head.forward(&embedding.forward(&ids)))
        };
        let before_out = forward(&x);
        let before: BTreeMap<String, Tensor> = vs.variables().into_iter().map(|(k, t)| (k, t.copy())).collect();
        let storages_before: std::collections::BTreeSet<u64> = vs.variables().values().map(storage_base).collect();

        let report = flatten_var_store(&vs).unwrap();
        assert_eq!(report.tensors, 13, "5 × 2 linear + embedding + tied head + stats");
        assert_eq!(report.storages, storages_before.len());
        assert_eq!(report.storages, 12, "the tied head shares the embedding's storage");
        let kinds: Vec<Kind> = report.buffers.iter().map(|b| b.kind).collect();
        assert_eq!(kinds.len(), 2);
        assert!(kinds.contains(&Kind::Float) && kinds.contains(&Kind::Half));

        let after = vs.variables();
        for (name, t) in &after {
            assert!(t.equal(&before[name]), "{name} keeps its values");
        }
        let floats: std::collections::BTreeSet<u64> =
            after.iter().filter(|(n, _)| *n != "stats").map(|(_, t)| storage_base(t)).collect();
        assert_eq!(floats.len(), 1, "every f32 variable views one buffer");
        assert!(storages_before.is_disjoint(&floats), "in a new buffer");
        let f32s: Vec<&Tensor> = after.values().filter(|t| t.kind() == Kind::Float).collect();
        let start = f32s.iter().map(|t| t.data_ptr() as usize).min().unwrap();
        for t in f32s {
            assert_eq!((t.data_ptr() as usize - start) % ALIGNMENT, 0, "each storage starts aligned");
        }
        assert_eq!(head.ws.data_ptr(), embedding.ws.data_ptr(), "the tie survives");
        assert_eq!(after["head.weight"].data_ptr(), after["emb.weight"].data_ptr());
        assert_eq!(storage_base(&layers[3].ws), storage_base(&after["layers.0.bias"]), "modules see the buffer");
        assert!(!stats.requires_grad() && layers[0].ws.requires_grad(), "requires_grad is kept");
        let after_out = forward(&x);
        assert!(after_out.0.equal(&before_out.0) && after_out.1.equal(&before_out.1), "forwards unchanged");
        // The user's own view still reads the old memory (documented): values equal.
        assert!(rows.equal(&embedding.ws.narrow(0, 2, 3)));
        assert_ne!(storage_base(&rows), storage_base(&embedding.ws));
    }

    #[test]
    fn views_of_one_storage_stay_views_of_one_region() {
        let base = Tensor::arange(20, (Kind::Float, Device::Cpu)).reshape([4, 5]);
        let t = base.transpose(0, 1); // strided
        let slice = base.narrow(0, 1, 2);
        let other = Tensor::ones([3], (Kind::Float, Device::Cpu));
        let report = flatten_tensors(&[&t, &slice, &other]).unwrap();
        assert_eq!((report.tensors, report.storages, report.buffers.len()), (3, 2, 1));
        assert_eq!(report.buffers[0].bytes, 256 + 12);
        assert!(t.equal(&Tensor::arange(20, (Kind::Float, Device::Cpu)).reshape([4, 5]).transpose(0, 1)));
        assert_eq!(slice.data_ptr() as usize, t.data_ptr() as usize + 5 * 4, "the same relative offsets");
        assert_eq!(t.stride(), vec![1, 5]);
        assert_eq!(other.data_ptr() as usize, t.data_ptr() as usize + 256);
    }

    #[test]
    fn two_dtypes_over_one_storage_are_refused_and_nothing_changes() {
        let a = Tensor::ones([4], (Kind::Float, Device::Cpu));
        let b = a.view_dtype(Kind::Int);
        let ptr = a.data_ptr();
        let err = flatten_tensors(&[&a, &b]).unwrap_err();
        assert!(
            err.to_string().starts_with("tensors[1] cannot be shared: it is Int but views the storage of tensors[0]"),
            "{err}"
        );
        assert_eq!(a.data_ptr(), ptr);
        assert_eq!(flatten_tensors(&[]).unwrap(), FlatReport { buffers: vec![], tensors: 0, storages: 0 });
    }
}
