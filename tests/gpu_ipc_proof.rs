//! The proof that CUDA IPC through libtorch works between two real processes: process A
//! (this test) exports tensors of several dtypes and layouts, process B (`ipc_peer`)
//! imports them, checks them bit-exactly and changes one in place, which A then sees.

use shared_tensor::ipc::{self, ExportedTensor};
use shared_tensor::Error;
use shared_tensor_tests::ipc_proof::{Check, Expected, Item, Request};
use shared_tensor_tests::{bytes_of, helper_bin, require_gpu, Peer};
use tch::{Device, Kind, Tensor};

#[test]
#[ignore = "GPU: runs in the GPU bundle (cargo xtask gpu-bundle)"]
fn tensors_cross_processes_bit_exact_and_in_place_changes_come_back() {
    require_gpu();
    let dev = Device::Cuda(0);
    tch::manual_seed(7);
    let base = Tensor::randn([64, 48], (Kind::Float, dev));
    const ONE_GIB_I32: i64 = 1 << 28; // 2^28 int32 elements = 1 GiB
    let tensors: Vec<(&str, Tensor, bool)> = vec![
        ("f32", Tensor::randn([1000], (Kind::Float, dev)), false),
        ("f16", Tensor::randn([33, 7], (Kind::Half, dev)), false),
        ("bf16", Tensor::randn([5, 6, 7], (Kind::BFloat16, dev)), false),
        ("i64", Tensor::arange(4096, (Kind::Int64, dev)) * 7919, false),
        ("bool", Tensor::randn([513], (Kind::Float, dev)).gt(0.0), false),
        ("non-contiguous (transposed)", base.tr(), false),
        ("non-contiguous (every other column)", base.slice(1, 0, 48, 2), false),
        ("slice with a storage offset", base.narrow(0, 10, 20), false),
        ("1 GiB", Tensor::arange(ONE_GIB_I32, (Kind::Int, dev)), true),
    ];
    assert!(!tensors[5].1.is_contiguous() && !tensors[6].1.is_contiguous());
    assert!(ipc::view_of(&tensors[7].1).unwrap().storage_offset > 0);

    let mut holds: Vec<ExportedTensor> = Vec::new();
    let mut items = Vec::new();
    for (name, t, large) in &tensors {
        let exported = ipc::export(t).unwrap_or_else(|e| panic!("export {name}: {e}"));
        let expected = if *large { Expected::ArangeI32(t.numel() as i64) } else { Expected::Bytes(bytes_of(t)) };
        items.push(Item { name: name.to_string(), descriptor: exported.descriptor().clone(), expected });
        holds.push(exported);
    }

    // A process cannot open its own handle: a clear error, not a crash.
    match ipc::import(holds[0].descriptor()) {
        Err(Error::SelfImport { pid }) => assert_eq!(pid, std::process::id()),
        other => panic!("importing in the exporting process gave {other:?}"),
    }

    let mut peer = Peer::spawn(&helper_bin("ipc_peer", env!("CARGO_BIN_EXE_ipc_peer")), &[]);
    peer.send(&Request { items, mutate: "f32".into(), import_twice: "bf16".into() });
    let checks: Vec<Check> = peer.recv();
    let failures: Vec<String> =
        checks.iter().filter_map(|c| c.failure.as_ref().map(|f| format!("{}: {f}", c.name))).collect();
    for c in &checks {
        println!("process B checked {}: {}", c.name, c.failure.as_deref().unwrap_or("ok"));
    }
    assert!(failures.is_empty(), "process B found: {failures:#?}");
    assert_eq!(checks.len(), tensors.len() + 1, "every tensor and the double import were checked");
    assert!(peer.wait_success(), "process B failed");

    // B filled "f32" with 42 in place and synchronized before replying.
    let seen = &tensors[0].1;
    assert_eq!(seen.eq(42.0).all().int64_value(&[]), 1, "A does not see B's in-place change");
    println!("process A sees process B's in-place change: f32[0] = {}", seen.double_value(&[0]));
}
