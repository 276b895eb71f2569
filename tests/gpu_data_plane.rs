//! The data plane between two processes on a GPU: every nn module type, derived models,
//! aliasing, stream ordering, fidelity, and a 1.6 GB model that costs the client no GPU
//! memory. Run in the GPU bundle.

#[path = "endpoints.rs"]
mod endpoints;
#[path = "gpu_server.rs"]
mod gpu_server;

use gpu_server::setup;
use shared_tensor::payload::Encoder;
use shared_tensor::{Error, Managed};
use tch::{Kind, Tensor};

#[test]
#[ignore = "GPU: runs in the GPU bundle (cargo xtask gpu-bundle)"]
fn every_module_computes_on_the_client_exactly_as_on_the_server() {
    setup();
    let (zoo, inputs, server_outputs) = endpoints::module_zoo(17).unwrap();
    let names = [
        "Linear",
        "Conv1D",
        "Conv2D",
        "Conv3D",
        "ConvTranspose1D",
        "ConvTranspose2D",
        "ConvTranspose3D",
        "Embedding",
        "LayerNorm",
        "BatchNorm (running stats)",
        "GroupNorm",
        "Lstm (2 layers)",
        "Gru",
        "derived 3-level MLP",
    ];
    let client_outputs = zoo.outputs(&inputs);
    for ((name, ours), theirs) in names.iter().zip(&client_outputs).zip(&server_outputs) {
        assert_eq!(ours.device(), tch::Device::Cuda(0));
        let diff = (ours - theirs).abs().max().double_value(&[]);
        assert!(ours.equal(theirs), "{name}: client forward differs from the server's (max |diff| {diff})");
        println!("{name}: client forward == server forward (bit-exact)");
    }
    assert_eq!(zoo.mlp.name, "mlp3");
    assert_eq!(zoo.mlp.blocks[1].scale, 1.5);
    assert_eq!(zoo.store.len(), 2, "the VarStore's variables arrived by name");
    assert!(zoo.store.variables().contains_key("extra.weight"));
}

#[test]
#[ignore = "GPU: runs in the GPU bundle (cargo xtask gpu-bundle)"]
fn tied_weights_stay_tied_and_in_place_changes_reach_the_server() {
    setup();
    let model: Managed<endpoints::Tied> = endpoints::tied_model().unwrap();
    assert_eq!(model.head.ws.data_ptr(), model.embedding.ws.data_ptr(), "one storage, two modules");
    let row = model.embedding.ws.size()[1] * 4;
    assert_eq!(model.rows.data_ptr() as usize, model.embedding.ws.data_ptr() as usize + 2 * row as usize);
    assert_eq!(Encoder::encode("tied", &*model).unwrap().storage_count(), 1, "the three tensors share one storage");
    // The weights arrive as leaves that require grad, as on the server: write under no_grad.
    tch::no_grad(|| {
        let _ = model.embedding.ws.shallow_clone().fill_(2.0);
    });
    assert_eq!(model.head.ws.sum(Kind::Float).double_value(&[]), 80.0, "the alias sees the change");
    assert_eq!(model.rows.sum(Kind::Float).double_value(&[]), 24.0, "the slice sees the change");
    shared_tensor::cuda::synchronize_stream(0).unwrap();
    let server_view = endpoints::tied_sum().unwrap().double_value(&[]);
    assert_eq!(server_view, 80.0, "the server sees the client's in-place change");
}

#[test]
#[ignore = "GPU: runs in the GPU bundle (cargo xtask gpu-bundle)"]
fn a_results_stream_order_is_kept_without_host_syncs() {
    setup();
    let n = 4096;
    for i in 0..100 {
        let y = endpoints::slow_matmul(n).unwrap();
        let exact = y.eq(n as f64).all().int64_value(&[]) == 1;
        assert!(exact, "call {i}: the client read the product before the server's kernel finished");
    }
    println!("100 unsynchronized {n}x{n} products read correctly by the client");
}

#[test]
#[ignore = "GPU: runs in the GPU bundle (cargo xtask gpu-bundle)"]
fn a_1_6_gb_model_costs_the_client_no_gpu_memory() {
    let dev = setup();
    drop(endpoints::big_model(24, 4096).unwrap()); // built and cached on the server
    let before = shared_tensor::cuda::memory_stats(0).unwrap();
    let model: Managed<Vec<tch::nn::Linear>> = endpoints::big_model(24, 4096).unwrap();
    let after = shared_tensor::cuda::memory_stats(0).unwrap();
    let bytes: i64 =
        model.iter().map(|l| l.ws.numel() as i64 * 4 + l.bs.as_ref().map_or(0, |b| b.numel() as i64 * 4)).sum();
    let grew = after.allocated_bytes as i64 - before.allocated_bytes as i64;
    let free_drop = before.free_bytes as i64 - after.free_bytes as i64;
    println!(
        "received a {:.2} GB model: client allocator grew by {grew} bytes, device free memory by {free_drop} bytes",
        bytes as f64 / 1e9
    );
    assert!(bytes > 1_600_000_000);
    assert!(grew.abs() < bytes / 100 && free_drop < bytes / 100, "the client holds a second copy");
    let x = Tensor::randn([2, 4096], (Kind::Float, dev));
    let y = model.iter().fold(x, |x, l| tch::nn::Module::forward(l, &x));
    assert_eq!(y.size(), vec![2, 4096]);
}

#[test]
#[ignore = "GPU: runs in the GPU bundle (cargo xtask gpu-bundle)"]
fn dtypes_views_and_requires_grad_survive() {
    let dev = setup();
    let x = Tensor::randn([3, 4], (Kind::Float, dev)).set_requires_grad(true);
    let y = endpoints::identity(x.shallow_clone()).unwrap();
    assert!(y.requires_grad(), "requires_grad survives");
    let z = endpoints::identity_ref(&Tensor::randn([5], (Kind::Float, dev)).to_kind(Kind::ComplexFloat)).unwrap();
    assert_eq!(z.kind(), Kind::ComplexFloat);
    let empty = endpoints::identity(Tensor::zeros([0, 3], (Kind::Float, dev))).unwrap();
    assert_eq!(empty.size(), vec![0, 3], "an empty tensor crosses too");
    let many: Vec<Tensor> = (0..5).map(|i| Tensor::full([2], i as f64, (Kind::Float, dev))).collect();
    let back = endpoints::identity_many(many.iter().map(Tensor::shallow_clone).collect()).unwrap();
    assert!(back.iter().zip(&many).all(|(a, b)| a.equal(b) && a.data_ptr() == b.data_ptr()));
    let cpu = Tensor::ones([2], (Kind::Float, tch::Device::Cpu));
    match endpoints::identity_many(vec![many[0].shallow_clone(), cpu]) {
        Err(Error::NotCuda { path, .. }) => assert_eq!(path, "tensors[1]"),
        other => panic!("{other:?}"),
    }
}
