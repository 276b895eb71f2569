//! A producer running with `PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True` shares
//! memory differently (file descriptors); it either works or fails with an error that
//! names the setting. Run in the GPU bundle.

#[path = "endpoints.rs"]
mod endpoints;

use shared_tensor::client::Client;
use shared_tensor::config::Config;
use shared_tensor::Error;
use shared_tensor_tests::{free_port, helper_bin, require_gpu, Peer};
use tch::Tensor;

#[test]
#[ignore = "GPU: runs in the GPU bundle (cargo xtask gpu-bundle)"]
fn expandable_segments_either_work_or_say_so() {
    require_gpu();
    let port = free_port();
    let exe = helper_bin("endpoint_server", env!("CARGO_BIN_EXE_endpoint_server"));
    let port_s = port.to_string();
    let mut server = Peer::spawn(
        &exe,
        &[
            ("ST_TEST_SERVER", "role"),
            ("SHARED_TENSOR_ROLE", "server"),
            ("SHARED_TENSOR_BASE_PORT", &port_s),
            ("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True"),
        ],
    );
    server.expect_line("READY");
    let client = Client::new(&Config::default().base_port(port).device_index(0)).unwrap();
    match client.call::<Tensor, _>("filled", (3.0f64,)) {
        Ok(t) => {
            assert_eq!(t.sum(tch::Kind::Float).double_value(&[]), 3.0 * (1 << 20) as f64);
            println!("expandable segments: shared and read correctly");
        }
        Err(e @ Error::Cuda { .. }) => {
            assert!(e.to_string().contains("expandable_segments"), "the error names the setting: {e}");
            println!("expandable segments: refused with: {e}");
        }
        Err(other) => panic!("{other:?}"),
    }
}
