//! Two GPUs: one server per GPU on base port + device index; a client reaches each by
//! device index; tensors made on device 1 arrive on device 1. Needs a machine with two
//! GPUs (the bundle runner reports it as not run elsewhere).

#[path = "endpoints.rs"]
mod endpoints;

use shared_tensor::client::Client;
use shared_tensor::config::Config;
use shared_tensor_tests::{free_port, helper_bin, require_gpu, Peer};
use tch::Tensor;

#[test]
#[ignore = "2 GPUs: runs in the GPU bundle on a machine with two GPUs"]
fn one_server_per_gpu_and_tensors_stay_on_their_device() {
    require_gpu();
    assert!(shared_tensor::cuda::device_count() >= 2, "this test needs two GPUs");
    let base = free_port();
    let exe = helper_bin("endpoint_server", env!("CARGO_BIN_EXE_endpoint_server"));
    let base_s = base.to_string();
    let mut servers: Vec<Peer> = (0..2)
        .map(|d| {
            let d_s = d.to_string();
            let mut p = Peer::spawn(
                &exe,
                &[
                    ("ST_TEST_SERVER", "role"),
                    ("SHARED_TENSOR_ROLE", "server"),
                    ("SHARED_TENSOR_BASE_PORT", &base_s),
                    ("SHARED_TENSOR_DEVICE", &d_s),
                ],
            );
            assert_eq!(p.expect_line("READY"), (base + d).to_string(), "device {d} serves on base + {d}");
            p
        })
        .collect();
    for d in 0..2u32 {
        let client = Client::new(&Config::default().base_port(base).device_index(d)).unwrap();
        assert_eq!(client.addr().port(), base + d as u16);
        let t: Tensor = client.call("on_device", (d as usize,)).unwrap();
        assert_eq!(t.device(), tch::Device::Cuda(d as usize), "made on device {d}, arrives on device {d}");
        assert_eq!(t.double_value(&[0]), d as f64);
        println!("device {d}: server on port {}, tensor arrived on cuda:{d}", base + d as u16);
    }
    servers.iter_mut().for_each(Peer::kill);
}
