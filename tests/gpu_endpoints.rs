//! `#[share]` endpoints between two real processes on a GPU: this test process is the
//! client, `endpoint_server` is the server role. Run in the GPU bundle.

#[path = "endpoints.rs"]
mod endpoints;
#[path = "gpu_server.rs"]
mod gpu_server;

use std::time::Duration;

use gpu_server::{idle, server_port, server_until, setup};
use shared_tensor_tests::{helper_bin, Peer};
use tch::{Kind, Tensor};

#[test]
#[ignore = "GPU: runs in the GPU bundle (cargo xtask gpu-bundle)"]
fn identity_and_scale_are_bit_exact_from_16_bytes_to_1_gib() {
    let dev = setup();
    tch::manual_seed(11);
    let two = Tensor::from(2.0f32).to_device(dev);
    for (label, numel) in
        [("16 B", 4i64), ("4 KiB", 1 << 10), ("1 MiB", 1 << 18), ("256 MiB", 1 << 26), ("1 GiB", 1 << 28)]
    {
        let x = Tensor::randn([numel], (Kind::Float, dev));
        let y = endpoints::identity(x.shallow_clone()).unwrap();
        assert!(y.equal(&x), "identity changed a {label} tensor");
        let z = endpoints::scale_tensor(x.shallow_clone(), two.shallow_clone()).unwrap();
        assert_eq!(z.device(), dev);
        assert!(z.equal(&(&x * 2.0)), "scale_tensor of {label} is not bit-exact");
        println!("{label}: identity and scale_tensor bit-exact");
    }
    for kind in [Kind::Half, Kind::BFloat16, Kind::Int64, Kind::Bool, Kind::ComplexFloat, Kind::Double] {
        let x = Tensor::randn([33, 5], (Kind::Float, dev)).to_kind(kind);
        assert!(endpoints::identity(x.shallow_clone()).unwrap().equal(&x), "{kind:?}");
        let produced = endpoints::identity_ref(&x).unwrap();
        assert_eq!(produced.kind(), kind);
        assert!(produced.equal(&x), "{kind:?} by reference");
    }
    let base = Tensor::randn([64, 32], (Kind::Float, dev));
    for view in [base.tr(), base.narrow(0, 3, 7), base.slice(1, 1, 32, 3)] {
        let back = endpoints::scale_tensor(view.shallow_clone(), two.shallow_clone()).unwrap();
        assert!(back.equal(&(&view * 2.0)), "views travel with their strides and offsets");
    }
}

#[test]
#[ignore = "GPU: runs in the GPU bundle (cargo xtask gpu-bundle)"]
fn identity_hands_back_the_callers_own_memory() {
    let dev = setup();
    let x = Tensor::ones([1, 4], (Kind::Float, dev));
    let y = endpoints::identity(x.shallow_clone()).unwrap();
    assert_eq!(y.data_ptr(), x.data_ptr(), "identity returns the caller's storage, zero copy");
    let z = endpoints::identity_ref(&x).unwrap();
    assert_eq!(z.data_ptr(), x.data_ptr());
    // A tensor that came from the server and goes back to it stays the server's memory.
    let s = endpoints::scale_tensor(x.shallow_clone(), Tensor::from(3.0f32).to_device(dev)).unwrap();
    let s2 = endpoints::identity(s.shallow_clone()).unwrap();
    assert_eq!(s2.data_ptr(), s.data_ptr(), "a server tensor round-trips as the server's own storage");
}

#[test]
#[ignore = "GPU: runs in the GPU bundle (cargo xtask gpu-bundle)"]
fn leases_return_to_zero_after_a_thousand_calls() {
    let dev = setup();
    let factor = Tensor::from(0.5f32).to_device(dev);
    for i in 0..1000 {
        let x = Tensor::full([256], i as f64, (Kind::Float, dev));
        let y = endpoints::scale_tensor(x, factor.shallow_clone()).unwrap();
        assert_eq!(y.double_value(&[0]), i as f64 * 0.5);
        let _ = endpoints::identity(y).unwrap();
    }
    let (info, took) = server_until(Duration::from_secs(2), idle);
    println!(
        "after 1000 calls: {} live leases, {} imported storages ({took:?})",
        info.live_leases, info.imported_storages
    );
    assert!(idle(&info), "{info:#?}");
}

#[test]
#[ignore = "GPU: runs in the GPU bundle (cargo xtask gpu-bundle)"]
fn a_client_killed_mid_run_leaves_no_leases_and_no_memory() {
    setup();
    let (before, _) = server_until(Duration::from_secs(2), idle);
    let baseline = before.gpu_memory.expect("the server reports GPU memory").allocated_bytes;
    let port = server_port().to_string();
    let exe = helper_bin("gpu_client", env!("CARGO_BIN_EXE_gpu_client"));
    let mut client = Peer::spawn(&exe, &[("SHARED_TENSOR_BASE_PORT", &port), ("ST_TEST_MB", "64")]);
    for _ in 0..6 {
        client.expect_line("HOLDING");
    }
    let busy = shared_tensor::server_info().unwrap();
    let held = busy.gpu_memory.unwrap().allocated_bytes - baseline;
    assert!(busy.live_leases >= 5, "the client holds results: {busy:#?}");
    assert!(held >= (5 * 64) << 20, "the server holds the client's results ({held} bytes)");
    client.kill();
    let (after, took) = server_until(Duration::from_secs(1), |i| {
        idle(i) && i.gpu_memory.is_some_and(|m| m.allocated_bytes == baseline)
    });
    let now = after.gpu_memory.unwrap().allocated_bytes;
    println!(
        "SIGKILL with {} leases and {} MiB held: {} leases and {} bytes over baseline after {took:?}",
        busy.live_leases,
        held >> 20,
        after.live_leases,
        now as i64 - baseline as i64
    );
    assert!(idle(&after) && now == baseline, "{after:#?}");
    assert!(took <= Duration::from_secs(1));
}

#[test]
#[ignore = "GPU: runs in the GPU bundle (cargo xtask gpu-bundle)"]
fn one_allocation_is_mapped_once_even_from_many_threads() {
    let dev = setup();
    let x = Tensor::ones([1024], (Kind::Float, dev));
    drop(endpoints::identity(x.shallow_clone()).unwrap());
    let before = shared_tensor::server_info().unwrap().ipc_mappings;
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let x = x.shallow_clone();
            std::thread::spawn(move || {
                for _ in 0..200 {
                    let y = endpoints::identity(x.shallow_clone()).unwrap();
                    assert_eq!(y.data_ptr(), x.data_ptr());
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let after = shared_tensor::server_info().unwrap().ipc_mappings;
    println!("1,600 concurrent calls with one tensor: server mappings {before} -> {after}");
    assert!(after <= before, "the server mapped the same allocation again ({before} -> {after})");
}

#[test]
#[ignore = "GPU: runs in the GPU bundle (cargo xtask gpu-bundle)"]
fn a_freed_and_reused_block_is_never_read_stale() {
    setup();
    let first = endpoints::filled(1.0).unwrap();
    let first_ptr = first.data_ptr();
    assert_eq!(first.double_value(&[7]), 1.0);
    drop(first); // released: the server frees the block
    let (_, _) = server_until(Duration::from_secs(2), idle);
    let second = endpoints::filled(2.0).unwrap();
    assert_eq!(second.data_ptr(), first_ptr, "the server reused the block (same address, same mapping)");
    assert_eq!(second.double_value(&[7]), 2.0, "the new data, not a stale view");
    assert_eq!(second.sum(Kind::Float).double_value(&[]), 2.0 * (1 << 20) as f64);
}

#[test]
#[ignore = "GPU: runs in the GPU bundle (cargo xtask gpu-bundle)"]
fn a_cuda_error_inside_an_endpoint_is_reported_and_the_server_keeps_serving() {
    let dev = setup();
    match endpoints::cuda_oom() {
        Err(shared_tensor::Error::EndpointPanicked { endpoint, message }) => {
            assert_eq!(endpoint, "cuda_oom");
            assert!(message.contains("out of memory"), "{message}");
            println!("a CUDA error in an endpoint reached its caller: {}", message.lines().next().unwrap_or_default());
        }
        other => panic!("{other:?}"),
    }
    let x = Tensor::ones([4], (Kind::Float, dev));
    assert!(endpoints::identity(x.shallow_clone()).unwrap().equal(&x), "the server keeps serving");
}
