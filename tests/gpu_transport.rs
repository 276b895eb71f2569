//! The transport of many tensors and hostile descriptors on a GPU: forged offsets and
//! sizes against a real handle of another process are refused; 290 tensors carved from
//! few allocator blocks arrive bit-exact over one storage and one mapping per block; the
//! cost of identity with 1, 16 and 256 tensors is printed. Run in the GPU bundle.

#[path = "endpoints.rs"]
mod endpoints;
#[path = "gpu_server.rs"]
mod gpu_server;

use std::collections::HashSet;
use std::time::Instant;

use gpu_server::setup;
use shared_tensor::config::{Config, Role};
use shared_tensor::ipc::{self, TensorDescriptor};
use shared_tensor::payload::Encoder;
use shared_tensor_tests::ipc_proof::{Check, Expected, Item, Request};
use shared_tensor_tests::{helper_bin, require_gpu, Peer};
use tch::{Device, Kind, Tensor};

/// Has process B (`ipc_peer`) import `items`; its verdict per item.
fn peer_checks(items: Vec<Item>) -> Vec<Check> {
    let mut peer = Peer::spawn(&helper_bin("ipc_peer", env!("CARGO_BIN_EXE_ipc_peer")), &[]);
    let n = items.len();
    peer.send(&Request { items, mutate: String::new(), import_twice: String::new() });
    let checks: Vec<Check> = peer.recv();
    assert!(peer.wait_success(), "process B failed");
    assert_eq!(checks.len(), n, "process B checked every item");
    for c in &checks {
        println!("process B, {}: {}", c.name, c.failure.as_deref().unwrap_or("imported and checked"));
    }
    checks
}

fn item(name: &str, descriptor: TensorDescriptor, numel: i64) -> Item {
    Item { name: name.into(), descriptor, expected: Expected::ArangeI32(numel) }
}

/// The failure B reported for `name`, which must be a refusal containing every `needle`.
fn refused<'a>(checks: &'a [Check], name: &str, needles: &[&str]) -> &'a str {
    let check = checks.iter().find(|c| c.name == name).expect("checked");
    let failure = check.failure.as_deref().unwrap_or_else(|| panic!("{name}: a forged descriptor was imported"));
    assert!(failure.starts_with("import failed: protocol error: "), "{name}: {failure}");
    for needle in needles {
        assert!(failure.contains(needle), "{name}: {failure:?} does not say {needle:?}");
    }
    failure
}

#[test]
#[ignore = "GPU: runs in the GPU bundle (cargo xtask gpu-bundle)"]
fn forged_offsets_and_sizes_against_a_real_handle_are_refused() {
    require_gpu();
    const NUMEL: i64 = 1 << 24; // 64 MiB of int32
    let t = Tensor::arange(NUMEL, (Kind::Int, Device::Cuda(0)));
    let exported = ipc::export(&t).unwrap();
    let real = exported.descriptor().clone();
    let forged = |f: &dyn Fn(&mut TensorDescriptor)| {
        let mut d = real.clone();
        f(&mut d);
        d
    };
    let items = vec![
        item("genuine", real.clone(), NUMEL),
        item("offset beyond the block", forged(&|d| d.storage.offset += 1 << 30), NUMEL),
        item("nbytes beyond the block", forged(&|d| d.storage.nbytes += 1 << 30), NUMEL),
        item("negative offset", forged(&|d| d.storage.offset = -4096), NUMEL),
        item("view beyond the storage", forged(&|d| d.view.sizes = vec![NUMEL + 1].into()), NUMEL + 1),
        item("view at an offset past the storage", forged(&|d| d.view.storage_offset = 1), NUMEL),
        item(
            "view whose size * stride overflows",
            forged(&|d| {
                d.view.sizes = vec![2, 2].into();
                d.view.strides = vec![i64::MAX, 1].into();
            }),
            4,
        ),
    ];
    let checks = peer_checks(items);
    assert_eq!(checks[0].failure, None, "the genuine descriptor imports");
    refused(&checks, "offset beyond the block", &["descriptor.storage: offset", "exceeds the allocation ("]);
    let beyond = refused(&checks, "nbytes beyond the block", &["exceeds the allocation ("]);
    refused(&checks, "negative offset", &["descriptor.storage: offset -4096 is negative"]);
    refused(&checks, "view beyond the storage", &["descriptor.view: the view", "bytes but the storage has"]);
    refused(&checks, "view at an offset past the storage", &["descriptor.view:", "from storage_offset 1 needs"]);
    refused(&checks, "view whose size * stride overflows", &["descriptor.view:", "64-bit"]);

    // The driver's size of the block, as B reported it: a storage ending exactly there
    // imports, one byte more is refused.
    let allocation: u64 = beyond
        .rsplit_once("exceeds the allocation (")
        .and_then(|(_, rest)| rest.split_once(" bytes)"))
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or_else(|| panic!("no allocation size in {beyond:?}"));
    println!("the producer's block is {allocation} bytes (the tensor's storage: {} bytes)", real.storage.nbytes);
    assert!(allocation >= real.storage.nbytes + real.storage.offset as u64);
    let to_the_end = allocation - real.storage.offset as u64;
    let checks = peer_checks(vec![
        item("storage ending at the block's end", forged(&|d| d.storage.nbytes = to_the_end), NUMEL),
        item("storage one byte past the block's end", forged(&|d| d.storage.nbytes = to_the_end + 1), NUMEL),
    ]);
    assert_eq!(checks[0].failure, None, "a storage up to the block's last byte imports");
    refused(
        &checks,
        "storage one byte past the block's end",
        &[&format!("nbytes {} exceeds the allocation ({allocation} bytes)", to_the_end + 1)],
    );
    drop(exported);
}

/// Address of the first byte of `t`'s storage.
fn storage_base(t: &Tensor) -> i64 {
    let view = ipc::view_of(t).unwrap();
    t.data_ptr() as i64 - view.storage_offset * view.dtype.itemsize() as i64
}

fn distinct_storages(ts: &[Tensor]) -> usize {
    ts.iter().map(storage_base).collect::<HashSet<_>>().len()
}

fn p50_us(calls: usize, mut f: impl FnMut()) -> f64 {
    let mut times: Vec<f64> = (0..calls)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[calls / 2]
}

/// One test, so that no other test of this binary opens mappings while it counts them.
#[test]
#[ignore = "GPU: runs in the GPU bundle (cargo xtask gpu-bundle)"]
fn many_tensors_travel_as_one_storage_and_one_mapping_per_block() {
    let dev = setup();

    // Server to client: 290 views carved from one tensor of the server.
    let before = ipc::mappings_opened();
    let views = endpoints::carved(290, 1000).unwrap();
    let opened = ipc::mappings_opened() - before;
    let want = Tensor::arange(290 * 1000, (Kind::Float, dev));
    assert!(Tensor::cat(&views, 0).equal(&want), "the carved views differ from the server's arange");
    assert_eq!(distinct_storages(&views), 1, "views of one server tensor arrive over one storage");
    println!("290 views of one server tensor: 1 storage, {opened} mapping(s) opened by the client");
    assert_eq!(opened, 1, "the client opened one mapping for the one block");
    drop(views);

    // 290 small tensors of the client: the caching allocator carves them from few blocks.
    tch::manual_seed(3);
    let small: Vec<Tensor> = (0..290).map(|i| Tensor::randn([64 + i % 7], (Kind::Float, dev))).collect();
    let blocks: HashSet<Vec<u8>> =
        small.iter().map(|t| ipc::export(t).unwrap().descriptor().storage.handle.clone()).collect();
    let encoded = Encoder::encode("state", &small).unwrap();
    println!(
        "290 small tensors of the client lie in {} allocator block(s): {} region(s), {} storages on the wire",
        blocks.len(),
        encoded.region_count(),
        encoded.storage_count()
    );
    assert_eq!(encoded.region_count(), blocks.len(), "one region (handle, lease) per allocator block on the wire");
    assert_eq!(encoded.storage_count(), 290, "each tensor's own storage travels as a part of its block's region");
    drop(encoded);

    // Identity: they come back as the client's own storages (the same StorageImpl each,
    // not a view of a block-wide one), at the same addresses.
    let back = endpoints::identity_many(small.iter().map(Tensor::shallow_clone).collect()).unwrap();
    for (i, (b, s)) in back.iter().zip(&small).enumerate() {
        assert_eq!(b.data_ptr(), s.data_ptr(), "tensor {i} came back elsewhere");
        assert_eq!(b.size(), s.size());
        assert!(b.is_set_to(s), "tensor {i} came back over another storage than its own");
    }
    println!("identity of 290 small tensors: each came back over its own original storage");
    drop(back);

    // Copies made by the server: new tensors of its own, bit-exact, over one storage and
    // one mapping per block of the server.
    let info = shared_tensor::server_info().unwrap();
    let (mappings_before, leases_before) = (info.ipc_mappings, info.live_leases);
    let before = ipc::mappings_opened();
    let copies = endpoints::copy_many(small.iter().map(Tensor::shallow_clone).collect()).unwrap();
    let opened = ipc::mappings_opened() - before;
    let info = shared_tensor::server_info().unwrap();
    let (server_mappings, leases_held) = (info.ipc_mappings, info.live_leases);
    // (Releases of earlier calls may still arrive: never below zero.)
    let leases_lent = leases_held.saturating_sub(leases_before);
    for (i, (c, s)) in copies.iter().zip(&small).enumerate() {
        assert!(c.equal(s), "copy {i} differs from the client's tensor");
        assert_ne!(c.data_ptr(), s.data_ptr(), "copy {i} is not the server's memory");
    }
    let storages = distinct_storages(&copies);
    println!(
        "290 copies made by the server: {storages} storage(s), {opened} mapping(s) opened by the client, \
         {} lease(s) of the server held by the client; \
         the server's open mappings went {mappings_before} -> {server_mappings} for the client's {} block(s)",
        leases_lent,
        blocks.len()
    );
    assert_eq!(storages, 290, "each of the server's copies arrives as a storage of its own");
    assert!(opened <= 2, "the server's 290 small copies arrive over one mapping per block ({opened} opened)");
    assert!(leases_lent <= 2, "the server lent its 290 copies under one lease per block ({leases_lent} leases)");
    assert!(server_mappings <= mappings_before + blocks.len() as u64, "the server mapped each block once");
    drop(copies);

    // For information (the benchmark is the judge): identity with 1, 16 and 256 tensors.
    for n in [1usize, 16, 256] {
        let xs: Vec<Tensor> = (0..n).map(|_| Tensor::ones([4], (Kind::Float, dev))).collect();
        for _ in 0..20 {
            drop(endpoints::identity_many(xs.iter().map(Tensor::shallow_clone).collect()).unwrap());
        }
        let p50 = p50_us(200, || {
            drop(endpoints::identity_many(xs.iter().map(Tensor::shallow_clone).collect()).unwrap());
        });
        println!("identity with {n} tensors: p50 {p50:.1} µs");
    }
    // And the phases of the 256-tensor call, through a second client of this process.
    let config = Config::default().role(Role::Client).base_port(gpu_server::server_port());
    let client = shared_tensor::client::Client::new(&config).unwrap();
    let xs: Vec<Tensor> = (0..256).map(|_| Tensor::ones([4], (Kind::Float, dev))).collect();
    let args = || (xs.iter().map(Tensor::shallow_clone).collect::<Vec<Tensor>>(),);
    let steps =
        shared_tensor::diagnostics::call_steps::<Vec<Tensor>, _, _>(&client, "identity_many", args, 200).unwrap();
    for (phase, us) in steps {
        println!("identity with 256 tensors, {phase}: p50 {us:.1} µs");
    }
}
