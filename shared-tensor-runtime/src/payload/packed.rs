//! The packed form of a [`WirePayload`] inside a frame.
//!
//! A payload travels as one MessagePack binary whose content is the fixed little-endian
//! layout below, not as nested MessagePack arrays, maps and variant-name strings. A
//! 24-layer model's reply holds 48 storages, 48 tensors and a tree of about 100 nodes;
//! generic encoding spent more time writing and matching names than the rest of the
//! call took. Here each part is a tag byte and fixed-width fields.
//!
//! ```text
//! payload  = count region* count storage* count tensor* count ready* node
//! region   = lease:u64 handle:short-bytes offset:i64 nbytes:u64 gpu pid:u32 instance:u64
//! storage  = 0 region:u32 offset:u64 nbytes:u64   (a part of a region: bytes from its start)
//!          | 1 lease:u64 part:u32                 (returned: part `part` of the receiver's lease)
//! gpu      = index:u32 uuid:[u8; 16]
//! tensor   = storage:u32 dtype:u8 requires_grad:u8 storage_offset:i64 count size:i64* count stride:i64*
//! ready    = gpu event:[u8; 64]
//! node     = 0 | 1 index:u32 | 2 | 3 node | 4 count node* | 5 count (str node)* | 6 str node | 7 bytes
//!            (unit, tensor, none, some, sequence, map, variant, plain data)
//! count    = u32;  short-bytes = u16 length, bytes;  str, bytes = u32 length, bytes
//! ```
//!
//! `dtype` is c10's `ScalarType` number. Decoding checks every length against the bytes
//! left before allocating, refuses unknown tags and dtypes, and bounds the tree's depth,
//! so a corrupt or hostile frame is an error, never a panic or a huge allocation.

use crate::device::ipc::{DType, Dims, EventHandle, GpuId, ProcessId, StorageDescriptor, TensorView};

use super::{Node, WirePayload, WireRegion, WireStorage, WireTensor};

/// Deepest value tree accepted (the root is depth 1).
pub(crate) const MAX_DEPTH: usize = 256;

/// Bytes of one region with an `n`-byte handle.
const fn region_bytes(handle: usize) -> usize {
    8 + 2 + handle + 8 + 8 + 4 + 16 + 4 + 8
}

/// Bytes of one storage entry (the larger, a part).
const STORAGE_BYTES: usize = 1 + 4 + 8 + 8;

/// Appends the packed form of `p` to `out`. Fails only for a value nested deeper than
/// [`MAX_DEPTH`] or a part too large for its length field.
pub(crate) fn pack(p: &WirePayload, out: &mut Vec<u8>) -> Result<(), String> {
    let regions = p.regions.iter().map(|r| (&r.storage, r.lease));
    pack_parts(regions, p.storages.iter().copied(), &p.tensors, &p.ready, &p.root, out)
}

/// Packs a payload from borrowed parts: a sender lends a kept value (a cached result)
/// without copying its tables first. `regions` are `(descriptor, lease)`.
pub(crate) fn pack_parts<'a>(
    regions: impl ExactSizeIterator<Item = (&'a StorageDescriptor, u64)>,
    storages: impl ExactSizeIterator<Item = WireStorage>,
    tensors: &[WireTensor],
    ready: &[(GpuId, EventHandle)],
    root: &Node,
    out: &mut Vec<u8>,
) -> Result<(), String> {
    out.reserve(
        16 + regions.len() * region_bytes(72)
            + storages.len() * STORAGE_BYTES
            + tensors.len() * 48
            + ready.len() * 84
            + 64,
    );
    put_count(out, regions.len(), "regions")?;
    for (storage, lease) in regions {
        put_u64(out, lease);
        let len = u16::try_from(storage.handle.len())
            .map_err(|_| format!("an IPC handle of {} bytes is longer than 65535", storage.handle.len()))?;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&storage.handle);
        put_u64(out, storage.offset as u64);
        put_u64(out, storage.nbytes);
        put_gpu(out, &storage.device);
        out.extend_from_slice(&storage.producer.pid.to_le_bytes());
        put_u64(out, storage.producer.instance);
    }
    put_count(out, storages.len(), "storages")?;
    for s in storages {
        match s {
            WireStorage::Part { region, offset, nbytes } => {
                out.push(0);
                out.extend_from_slice(&region.to_le_bytes());
                put_u64(out, offset);
                put_u64(out, nbytes);
            }
            WireStorage::Returned { lease, part } => {
                out.push(1);
                put_u64(out, lease);
                out.extend_from_slice(&part.to_le_bytes());
            }
        }
    }
    put_count(out, tensors.len(), "tensors")?;
    for t in tensors {
        out.extend_from_slice(&t.storage.to_le_bytes());
        out.push(t.view.dtype.scalar_type() as u8);
        out.push(t.view.requires_grad as u8);
        put_u64(out, t.view.storage_offset as u64);
        for dims in [&t.view.sizes, &t.view.strides] {
            put_count(out, dims.len(), "dimensions")?;
            for d in dims {
                put_u64(out, *d as u64);
            }
        }
    }
    put_count(out, ready.len(), "ready events")?;
    for (gpu, event) in ready {
        put_gpu(out, gpu);
        out.extend_from_slice(event.0.as_slice());
    }
    put_node(out, root, 1)
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_count(out: &mut Vec<u8>, n: usize, what: &str) -> Result<(), String> {
    let n = u32::try_from(n).map_err(|_| format!("{n} {what} do not fit a payload"))?;
    out.extend_from_slice(&n.to_le_bytes());
    Ok(())
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8], what: &str) -> Result<(), String> {
    put_count(out, bytes.len(), what)?;
    out.extend_from_slice(bytes);
    Ok(())
}

fn put_gpu(out: &mut Vec<u8>, gpu: &GpuId) {
    out.extend_from_slice(&gpu.index.to_le_bytes());
    out.extend_from_slice(&gpu.uuid);
}

fn put_node(out: &mut Vec<u8>, node: &Node, depth: usize) -> Result<(), String> {
    if depth > MAX_DEPTH {
        return Err(format!("the value is nested deeper than {MAX_DEPTH} levels"));
    }
    match node {
        Node::Unit => out.push(0),
        Node::Tensor(i) => {
            out.push(1);
            out.extend_from_slice(&i.to_le_bytes());
        }
        Node::Opt(None) => out.push(2),
        Node::Opt(Some(inner)) => {
            out.push(3);
            put_node(out, inner, depth + 1)?;
        }
        Node::Seq(items) => {
            out.push(4);
            put_count(out, items.len(), "sequence elements")?;
            for item in items {
                put_node(out, item, depth + 1)?;
            }
        }
        Node::Map(entries) => {
            out.push(5);
            put_count(out, entries.len(), "map entries")?;
            for (key, value) in entries {
                put_bytes(out, key.as_bytes(), "key bytes")?;
                put_node(out, value, depth + 1)?;
            }
        }
        Node::Variant(name, inner) => {
            out.push(6);
            put_bytes(out, name.as_bytes(), "variant name bytes")?;
            put_node(out, inner, depth + 1)?;
        }
        Node::Data(bytes) => {
            out.push(7);
            put_bytes(out, bytes, "data bytes")?;
        }
    }
    Ok(())
}

/// Reads a packed payload; the error says what is wrong and where.
pub(crate) fn unpack(bytes: &[u8]) -> Result<WirePayload, String> {
    let mut r = Reader { bytes, at: 0 };
    let n = r.count(region_bytes(0), "regions")?;
    let mut regions = Vec::with_capacity(n);
    for _ in 0..n {
        let lease = r.u64("a lease")?;
        let len = u16::from_le_bytes(r.array("an IPC handle length")?) as usize;
        let handle = r.take(len, "an IPC handle")?.to_vec();
        let storage = StorageDescriptor {
            handle,
            offset: r.u64("a region offset")? as i64,
            nbytes: r.u64("a region size")?,
            device: r.gpu()?,
            producer: ProcessId {
                pid: u32::from_le_bytes(r.array("a producer pid")?),
                instance: r.u64("a producer instance")?,
            },
        };
        regions.push(WireRegion { storage, lease });
    }
    let n = r.count(13, "storages")?;
    let mut storages = Vec::with_capacity(n);
    for _ in 0..n {
        storages.push(match r.u8("a storage tag")? {
            0 => WireStorage::Part {
                region: u32::from_le_bytes(r.array("a storage's region index")?),
                offset: r.u64("a storage offset")?,
                nbytes: r.u64("a storage size")?,
            },
            1 => WireStorage::Returned {
                lease: r.u64("a lease")?,
                part: u32::from_le_bytes(r.array("a returned storage's part index")?),
            },
            tag => return Err(format!("unknown storage tag {tag} at byte {}", r.at - 1)),
        });
    }
    let n = r.count(22, "tensors")?;
    let mut tensors = Vec::with_capacity(n);
    for _ in 0..n {
        let storage = u32::from_le_bytes(r.array("a tensor's storage index")?);
        let code = r.u8("a dtype")?;
        let dtype = DType::from_scalar_type(code as i32)
            .ok_or_else(|| format!("unknown dtype {code} (a c10 ScalarType number) at byte {}", r.at - 1))?;
        let requires_grad = match r.u8("requires_grad")? {
            0 => false,
            1 => true,
            other => return Err(format!("requires_grad is {other}, not 0 or 1, at byte {}", r.at - 1)),
        };
        let storage_offset = r.u64("a storage offset")? as i64;
        let sizes = r.dims("sizes")?;
        let strides = r.dims("strides")?;
        tensors.push(WireTensor { storage, view: TensorView { dtype, sizes, strides, storage_offset, requires_grad } });
    }
    let n = r.count(84, "ready events")?;
    let mut ready = Vec::with_capacity(n);
    for _ in 0..n {
        let gpu = r.gpu()?;
        let event: [u8; 64] = r.array("an event handle")?;
        ready.push((gpu, EventHandle(serde_bytes::ByteArray::new(event))));
    }
    let root = r.node(1)?;
    if r.at != bytes.len() {
        return Err(format!("{} unexpected bytes after the payload", bytes.len() - r.at));
    }
    Ok(WirePayload { regions, storages, tensors, ready, root })
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        match self.at.checked_add(n) {
            Some(end) if end <= self.bytes.len() => {
                let part = &self.bytes[self.at..end];
                self.at = end;
                Ok(part)
            }
            _ => Err(format!(
                "the payload ends at byte {} inside {what} ({n} bytes from byte {})",
                self.bytes.len(),
                self.at
            )),
        }
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], String> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u8(&mut self, what: &str) -> Result<u8, String> {
        Ok(self.take(1, what)?[0])
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count of items of at least `min_bytes` each, checked against the bytes left.
    fn count(&mut self, min_bytes: usize, what: &str) -> Result<usize, String> {
        let n = u32::from_le_bytes(self.array(what)?) as usize;
        let left = self.bytes.len() - self.at;
        if n > left / min_bytes.max(1) {
            return Err(format!("the payload claims {n} {what} but only {left} bytes follow"));
        }
        Ok(n)
    }

    fn dims(&mut self, what: &str) -> Result<Dims, String> {
        let n = self.count(8, what)?;
        let raw = self.take(n * 8, what)?;
        let dim = |c: &[u8]| i64::from_le_bytes(c.try_into().expect("8-byte chunks"));
        let mut inline = [0i64; 6];
        if n <= inline.len() {
            // The usual tensor: filled on the stack, no per-element capacity checks.
            for (d, c) in inline.iter_mut().zip(raw.chunks_exact(8)) {
                *d = dim(c);
            }
            return Ok(Dims::from_buf_and_len(inline, n));
        }
        Ok(raw.chunks_exact(8).map(dim).collect())
    }

    fn gpu(&mut self) -> Result<GpuId, String> {
        Ok(GpuId { index: u32::from_le_bytes(self.array("a GPU index")?), uuid: self.array("a GPU UUID")? })
    }

    fn string(&mut self, what: &str) -> Result<String, String> {
        let n = self.count(1, what)?;
        let at = self.at;
        let raw = self.take(n, what)?;
        String::from_utf8(raw.to_vec()).map_err(|_| format!("{what} at byte {at} is not UTF-8"))
    }

    fn node(&mut self, depth: usize) -> Result<Node, String> {
        if depth > MAX_DEPTH {
            return Err(format!("the value is nested deeper than {MAX_DEPTH} levels"));
        }
        Ok(match self.u8("a node tag")? {
            0 => Node::Unit,
            1 => Node::Tensor(u32::from_le_bytes(self.array("a tensor index")?)),
            2 => Node::Opt(None),
            3 => Node::Opt(Some(Box::new(self.node(depth + 1)?))),
            4 => {
                let n = self.count(1, "sequence elements")?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.node(depth + 1)?);
                }
                Node::Seq(items)
            }
            5 => {
                let n = self.count(5, "map entries")?;
                let mut entries = Vec::with_capacity(n);
                for _ in 0..n {
                    let key = self.string("a map key")?;
                    entries.push((key, self.node(depth + 1)?));
                }
                Node::Map(entries)
            }
            6 => {
                let name = self.string("a variant name")?;
                Node::Variant(name, Box::new(self.node(depth + 1)?))
            }
            7 => {
                let n = self.count(1, "data bytes")?;
                Node::Data(self.take(n, "data bytes")?.to_vec())
            }
            tag => return Err(format!("unknown node tag {tag} at byte {}", self.at - 1)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn region(lease: u64, handle: Vec<u8>) -> WireRegion {
        WireRegion {
            storage: StorageDescriptor {
                handle,
                offset: -5,
                nbytes: u64::MAX - 1,
                device: GpuId { index: 3, uuid: [0xab; 16] },
                producer: ProcessId { pid: 77, instance: u64::MAX },
            },
            lease,
        }
    }

    fn sample() -> WirePayload {
        WirePayload {
            regions: vec![region(9, vec![1; 66])],
            storages: vec![
                WireStorage::Part { region: 0, offset: 512, nbytes: u64::MAX },
                WireStorage::Returned { lease: 4, part: 3 },
            ],
            tensors: vec![WireTensor {
                storage: 1,
                view: TensorView {
                    dtype: DType::BF16,
                    sizes: vec![2, 3].into(),
                    strides: vec![1, -2].into(),
                    storage_offset: 7,
                    requires_grad: true,
                },
            }],
            ready: vec![(GpuId { index: 0, uuid: [5; 16] }, EventHandle(serde_bytes::ByteArray::new([6; 64])))],
            root: Node::Seq(vec![
                Node::Map(vec![("weight".into(), Node::Tensor(0)), ("bias".into(), Node::Opt(None))]),
                Node::Variant("Some".into(), Box::new(Node::Opt(Some(Box::new(Node::Unit))))),
                Node::Data(vec![0xc0, 1, 2]),
            ]),
        }
    }

    fn packed(p: &WirePayload) -> Vec<u8> {
        let mut out = Vec::new();
        pack(p, &mut out).unwrap();
        out
    }

    #[test]
    fn payloads_round_trip() {
        let p = sample();
        assert_eq!(unpack(&packed(&p)).unwrap(), p);
        let plain = WirePayload::plain(Node::Unit);
        assert_eq!(packed(&plain).len(), 17, "an empty payload is four counts and a unit");
        assert_eq!(unpack(&packed(&plain)).unwrap(), plain);
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = packed(&sample());
        for end in 0..bytes.len() {
            let err = unpack(&bytes[..end]).unwrap_err();
            assert!(err.contains("ends at byte") || err.contains("claims"), "cut at {end}: {err}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(unpack(&longer).unwrap_err(), "1 unexpected bytes after the payload");
    }

    #[test]
    fn bad_tags_dtypes_and_counts_are_named() {
        let mut p = WirePayload::plain(Node::Unit);
        p.tensors.push(WireTensor {
            storage: 0,
            view: TensorView {
                dtype: DType::F32,
                sizes: vec![].into(),
                strides: vec![].into(),
                storage_offset: 0,
                requires_grad: false,
            },
        });
        let mut bytes = packed(&p);
        bytes[4 + 4 + 4 + 4] = 99; // the dtype byte, after three counts and the storage index
        assert!(unpack(&bytes).unwrap_err().starts_with("unknown dtype 99"));
        let mut bytes = packed(&WirePayload::plain(Node::Unit));
        *bytes.last_mut().unwrap() = 42;
        assert_eq!(unpack(&bytes).unwrap_err(), "unknown node tag 42 at byte 16");
        let mut bytes = packed(&WirePayload::plain(Node::Unit));
        bytes[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(unpack(&bytes).unwrap_err().starts_with("the payload claims 4294967295 regions"));
        let mut bytes = packed(&WirePayload::plain(Node::Unit));
        bytes[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(unpack(&bytes).unwrap_err().starts_with("the payload claims 4294967295 storages"));
        let mut p = WirePayload::plain(Node::Unit);
        p.storages.push(WireStorage::Returned { lease: 1, part: 0 });
        let mut bytes = packed(&p);
        bytes[8] = 2; // the storage's tag, after two counts
        assert_eq!(unpack(&bytes).unwrap_err(), "unknown storage tag 2 at byte 8");
    }

    #[test]
    fn depth_is_bounded_both_ways() {
        let mut deep = Node::Unit;
        for _ in 0..MAX_DEPTH {
            deep = Node::Opt(Some(Box::new(deep)));
        }
        let too_deep = WirePayload::plain(deep.clone());
        assert!(pack(&too_deep, &mut Vec::new()).unwrap_err().contains("deeper than 256"));
        let Node::Opt(Some(inner)) = deep else { unreachable!() };
        let fits = WirePayload::plain(*inner);
        assert_eq!(unpack(&packed(&fits)).unwrap(), fits);
        // A hand-made frame one level deeper is refused by the reader too.
        let mut bytes = vec![0u8; 16];
        bytes.extend(std::iter::repeat_n(3u8, MAX_DEPTH));
        bytes.push(0);
        assert!(unpack(&bytes).unwrap_err().contains("deeper than 256"));
    }

    fn node() -> impl Strategy<Value = Node> {
        let leaf = prop_oneof![
            Just(Node::Unit),
            any::<u32>().prop_map(Node::Tensor),
            Just(Node::Opt(None)),
            proptest::collection::vec(any::<u8>(), 0..8).prop_map(Node::Data),
        ];
        leaf.prop_recursive(4, 32, 4, |inner| {
            prop_oneof![
                inner.clone().prop_map(|n| Node::Opt(Some(Box::new(n)))),
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Node::Seq),
                proptest::collection::vec(("[a-z_é]{0,6}", inner.clone()), 0..4).prop_map(Node::Map),
                ("[A-Za-z]{0,6}", inner).prop_map(|(name, n)| Node::Variant(name, Box::new(n))),
            ]
        })
    }

    fn payload() -> impl Strategy<Value = WirePayload> {
        let region = (any::<u64>(), proptest::collection::vec(any::<u8>(), 0..80)).prop_map(|(l, h)| region(l, h));
        let storage = prop_oneof![
            (any::<u32>(), any::<u64>(), any::<u64>()).prop_map(|(region, offset, nbytes)| WireStorage::Part {
                region,
                offset,
                nbytes
            }),
            (any::<u64>(), any::<u32>()).prop_map(|(lease, part)| WireStorage::Returned { lease, part }),
        ];
        let dims = proptest::collection::vec(any::<i64>(), 0..5);
        let tensor = (any::<u32>(), 0..17usize, dims.clone(), dims, any::<i64>(), any::<bool>()).prop_map(
            |(storage, d, sizes, strides, storage_offset, requires_grad)| WireTensor {
                storage,
                view: TensorView {
                    dtype: crate::device::ipc::DTYPES[d].0,
                    sizes: sizes.into(),
                    strides: strides.into(),
                    storage_offset,
                    requires_grad,
                },
            },
        );
        let ready = (any::<u32>(), any::<[u8; 16]>(), any::<u8>())
            .prop_map(|(index, uuid, e)| (GpuId { index, uuid }, EventHandle(serde_bytes::ByteArray::new([e; 64]))));
        (
            proptest::collection::vec(region, 0..3),
            proptest::collection::vec(storage, 0..4),
            proptest::collection::vec(tensor, 0..4),
            proptest::collection::vec(ready, 0..2),
            node(),
        )
            .prop_map(|(regions, storages, tensors, ready, root)| WirePayload {
                regions,
                storages,
                tensors,
                ready,
                root,
            })
    }

    proptest! {
        #[test]
        fn any_payload_round_trips(p in payload()) {
            prop_assert_eq!(unpack(&packed(&p)).unwrap(), p);
        }

        #[test]
        fn corrupted_payloads_are_errors_or_values_never_panics(
            p in payload(),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
        ) {
            let mut bytes = packed(&p);
            let n = bytes.len();
            for (at, value) in flips {
                bytes[at % n] = value;
            }
            let _ = unpack(&bytes);
        }
    }
}
