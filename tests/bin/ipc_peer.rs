//! Process B of the CUDA IPC proof: imports what A exported, checks it bit-exactly,
//! imports one descriptor twice, and changes one tensor in place for A to observe.

use shared_tensor::ipc::{self, TensorDescriptor};
use shared_tensor_tests::ipc_proof::{Check, Expected, Request};
use shared_tensor_tests::{bytes_of, recv, send};
use tch::{Kind, Tensor};

fn check_one(t: &Tensor, desc: &TensorDescriptor, expected: &Expected) -> Option<String> {
    if t.size() != desc.view.sizes.as_slice() {
        return Some(format!("sizes {:?}, expected {:?}", t.size(), desc.view.sizes));
    }
    if t.stride() != desc.view.strides.as_slice() {
        return Some(format!("strides {:?}, expected {:?}", t.stride(), desc.view.strides));
    }
    if t.kind() != desc.view.dtype.kind() {
        return Some(format!("kind {:?}, expected {:?}", t.kind(), desc.view.dtype));
    }
    if t.device() != tch::Device::Cuda(desc.storage.device.index as usize) {
        return Some(format!("device {:?}", t.device()));
    }
    match expected {
        Expected::Bytes(want) => {
            let got = bytes_of(t);
            (&got != want).then(|| format!("{} bytes differ from the producer's", got.len()))
        }
        Expected::ArangeI32(n) => {
            let want = Tensor::arange(*n, (Kind::Int, t.device()));
            let equal = t.eq_tensor(&want).all().int64_value(&[]) == 1;
            (!equal).then(|| format!("the {n}-element arange pattern differs"))
        }
    }
}

fn main() {
    let mut stdin = std::io::stdin().lock();
    let mut stdout = std::io::stdout().lock();
    let req: Request = recv(&mut stdin).expect("request from A");
    let mut checks = Vec::new();
    let mut mutated = None;
    for item in &req.items {
        let failure = match ipc::import(&item.descriptor) {
            Ok(t) => {
                let failure = check_one(&t, &item.descriptor, &item.expected);
                if item.name == req.import_twice {
                    let again = ipc::import(&item.descriptor);
                    let twice = match &again {
                        Ok(u) if u.data_ptr() != t.data_ptr() => Some("second import maps elsewhere".to_string()),
                        Ok(u) => check_one(u, &item.descriptor, &item.expected),
                        Err(e) => Some(format!("second import failed: {e}")),
                    };
                    checks.push(Check { name: format!("{} imported twice", item.name), failure: twice });
                }
                if item.name == req.mutate {
                    mutated = Some(t);
                }
                failure
            }
            Err(e) => Some(format!("import failed: {e}")),
        };
        checks.push(Check { name: item.name.clone(), failure });
    }
    if let Some(mut t) = mutated {
        let _ = t.fill_(42.0);
        let tch::Device::Cuda(index) = t.device() else { unreachable!("imports are CUDA tensors") };
        shared_tensor::cuda::synchronize(index as u32).expect("synchronize");
    }
    send(&mut stdout, &checks).expect("report to A");
}
