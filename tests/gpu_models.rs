//! Real models between two processes on a GPU: a 2 GiB embedding that costs the client
//! no memory, a tied bf16 decoder, a flattened VarStore, and recurrent layers in cuDNN's
//! layout. Run in the GPU bundle (`--show-output` prints the figures).

#[path = "endpoints.rs"]
mod endpoints;
#[path = "gpu_server.rs"]
mod gpu_server;

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use gpu_server::setup;
use shared_tensor::payload::Encoder;
use shared_tensor::Managed;
use shared_tensor_tests::bytes_of;
use tch::nn::RNN;
use tch::{Kind, Tensor};

const MIB: i64 = 1 << 20;

/// The tests of this binary measure the process's memory: one at a time.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A `/proc/self/status` field in bytes (`VmRSS`, `VmHWM`).
fn status_bytes(field: &str) -> i64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: i64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':')?.trim().strip_suffix("kB")?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"));
    kib * 1024
}

/// Resets the peak RSS (`VmHWM`) to the current RSS; false where the kernel refuses.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn allocated() -> i64 {
    shared_tensor::cuda::memory_stats(0).unwrap().allocated_bytes as i64
}

fn p50(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

#[test]
#[ignore = "GPU: runs in the GPU bundle (cargo xtask gpu-bundle)"]
fn a_2_gib_embedding_model_costs_the_client_no_memory_and_computes_as_on_the_server() {
    let _serial = serial();
    let dev = setup();
    // Built on the server; this process's first mapping and CUDA setup happen here.
    drop(endpoints::real_embedding_model().unwrap());
    let ids = Tensor::randint(131072, [4, 16], (Kind::Int64, dev));
    let server_out = endpoints::embedding_model_forward(ids.shallow_clone()).unwrap();

    let peak_reset = reset_peak_rss();
    let (rss_before, alloc_before) = (status_bytes("VmRSS"), allocated());
    let model: Managed<endpoints::EmbeddingModel> = endpoints::real_embedding_model().unwrap();
    let (rss_after, alloc_after, peak) = (status_bytes("VmRSS"), allocated(), status_bytes("VmHWM"));
    assert_eq!(model.embedding.ws.size(), vec![131072, 4096]);
    let (rss_delta, alloc_delta, peak_delta) = (rss_after - rss_before, alloc_after - alloc_before, peak - rss_before);
    println!(
        "holding a fetched 2 GiB embedding model: host RSS delta {rss_delta} B, CUDA allocator delta {alloc_delta} B, \
         peak RSS during the fetch {} (reset {})",
        if peak_reset { format!("+{peak_delta} B") } else { "not measured".into() },
        if peak_reset { "ok" } else { "refused by the kernel" },
    );
    assert!(rss_delta.abs() < MIB, "host RSS grew by {rss_delta} bytes while holding the model");
    assert!(alloc_delta.abs() < MIB, "the CUDA allocator grew by {alloc_delta} bytes while holding the model");
    if peak_reset {
        assert!(peak_delta < MIB, "host RSS peaked {peak_delta} bytes above the start during the fetch");
    }

    let client_out = model.forward(&ids);
    assert_eq!(bytes_of(&client_out), bytes_of(&server_out), "client forward != server forward");
    println!("embedding model: client forward == server forward (bit-exact, {:?})", client_out.size());
    drop(model);

    let times: Vec<Duration> = (0..20)
        .map(|_| {
            let start = Instant::now();
            let m = endpoints::real_embedding_model().unwrap();
            let took = start.elapsed();
            drop(m);
            took
        })
        .collect();
    let max = times.iter().max().copied().unwrap_or_default();
    println!("cached 2 GiB embedding model fetch: p50 {:?}, max {max:?} over 20 fetches", p50(times));
}

#[test]
#[ignore = "GPU: runs in the GPU bundle (cargo xtask gpu-bundle)"]
fn a_tied_bf16_decoder_stays_tied_and_a_client_write_reaches_the_server() {
    let _serial = serial();
    let dev = setup();
    let start = Instant::now();
    let model: Managed<endpoints::TinyDecoder> = endpoints::decoder_model(2).unwrap();
    println!("decoder (2 blocks, bf16) first fetch: {:?}", start.elapsed());
    assert_eq!(model.embedding.ws.kind(), Kind::BFloat16);
    assert_eq!(model.head.ws.data_ptr(), model.embedding.ws.data_ptr(), "the head is tied to the embedding");
    let storages = Encoder::encode("decoder", &*model).unwrap().storage_count();
    // Embedding (= head) 1, per block 2 norms × 2 + 7 projections, final norm 2.
    assert_eq!(storages, 1 + 2 * 11 + 2, "one storage per distinct tensor, the tie counted once");

    let ids = Tensor::randint(32000, [2, 8], (Kind::Int64, dev));
    let server_out = endpoints::decoder_forward(2, ids.shallow_clone()).unwrap();
    let client_out = model.forward(&ids);
    assert_eq!(bytes_of(&client_out), bytes_of(&server_out), "client forward != server forward");
    println!("decoder: client forward == server forward (bit-exact, {:?}), {storages} storages", client_out.size());

    // The weights arrive as leaves that require grad, as on the server: write under no_grad.
    tch::no_grad(|| {
        let mut row = model.embedding.ws.get(7);
        let _ = row.fill_(3.0);
    });
    assert_eq!(model.head.ws.get(7).sum(Kind::Float).double_value(&[]), 3072.0, "the tied head sees the write");
    shared_tensor::cuda::synchronize_stream(0).unwrap();
    let seen = endpoints::decoder_head_row_sum(2, 7).unwrap().double_value(&[]);
    assert_eq!(seen, 3072.0, "the server's head sees the client's write to the embedding");
    println!("decoder: the client's in-place write to the embedding is seen in the server's tied head");
}

#[test]
#[ignore = "GPU: runs in the GPU bundle (cargo xtask gpu-bundle)"]
fn a_flattened_var_store_arrives_as_one_storage_per_dtype_bit_exact() {
    let _serial = serial();
    setup();
    let mappings_before = shared_tensor::ipc::open_mappings();
    let (vs, before) = endpoints::flat_store().unwrap();
    let opened = shared_tensor::ipc::open_mappings() - mappings_before;
    let variables = vs.variables();
    assert_eq!(variables.len(), 83);
    for (name, t) in &variables {
        assert_eq!(bytes_of(t), bytes_of(&before[name]), "{name} differs from its value before flattening");
    }
    let storages = Encoder::encode("store", &vs).unwrap().storage_count();
    assert_eq!(storages, 2, "one f32 and one bf16 storage");
    let kinds: std::collections::BTreeSet<String> = variables.values().map(|t| format!("{:?}", t.kind())).collect();
    println!(
        "flattened VarStore: {} variables ({kinds:?}) bit-exact in {storages} storages; \
         mappings opened by this fetch: {opened} (the 83 unflattened copies included)",
        variables.len()
    );
}

#[test]
#[ignore = "GPU: runs in the GPU bundle (cargo xtask gpu-bundle)"]
fn recurrent_layers_arrive_in_cudnn_layout_and_compute_as_on_the_server() {
    let _serial = serial();
    setup();
    let endpoints::RecurrentLayers { lstm, gru, input, outputs, layouts } = endpoints::recurrent_layers(31).unwrap();
    for (name, weights, server) in [("Lstm", &lstm.weights, &layouts[0]), ("Gru", &gru.weights, &layouts[1])] {
        let distinct: std::collections::BTreeSet<i64> = server.offsets.iter().copied().collect();
        assert_eq!(distinct.len(), weights.len(), "{name}: the server flattened its weights into one buffer");
        let ours = endpoints::layout(weights); // panics unless the weights view one storage
        assert_eq!(&ours, server, "{name}: the server's cuDNN layout, in one storage");
        assert_eq!(Encoder::encode(name, weights).unwrap().storage_count(), 1);
        println!(
            "{name}: {} weights, views of one {} B storage at offsets {:?}",
            weights.len(),
            ours.storage_bytes,
            ours.offsets
        );
    }
    let ours = [lstm.seq(&input).0, gru.seq(&input).0];
    for ((name, ours), theirs) in ["Lstm", "Gru"].iter().zip(&ours).zip(&outputs) {
        assert_eq!(bytes_of(ours), bytes_of(theirs), "{name}: client forward != server forward");
        println!("{name}: client forward == server forward (bit-exact)");
    }
    println!("(the bundle's stderr must not contain cuDNN's \"not part of single contiguous chunk of memory\")");
}
