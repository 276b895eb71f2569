//! The payload contract on the CPU: derived user modules (nested, enums, generics,
//! configuration and skipped fields) and the checks made before anything is sent.

use shared_tensor::payload::Encoder;
use shared_tensor::{Error, Payload};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

#[derive(Debug, Payload)]
struct Mlp {
    layers: Vec<nn::Linear>,
    scale: f64,
    name: String,
    #[payload(skip)]
    calls: std::cell::Cell<u64>,
}

impl Module for Mlp {
    fn forward(&self, xs: &Tensor) -> Tensor {
        self.calls.set(self.calls.get() + 1);
        self.layers.iter().fold(xs.shallow_clone(), |x, l| l.forward(&x).relu()) * self.scale
    }
}

#[derive(Payload)]
struct Block {
    mlp: Mlp,
    norm: nn::LayerNorm,
}

#[derive(Payload)]
struct Encoder3 {
    blocks: Vec<Block>,
    head: Head,
}

#[derive(Payload)]
enum Head {
    Linear(nn::Linear),
    Mixture { experts: Vec<nn::Linear>, top_k: usize },
}

#[derive(Payload)]
struct Wrapper<M> {
    inner: M,
    #[payload(data)]
    tag: String,
}

#[derive(Payload)]
#[payload(container)]
struct MaybeTensors {
    first: Option<Tensor>,
    count: u32,
}

#[derive(Payload)]
struct NoTensors {
    count: u32,
}

fn linear(vs: &nn::Path, i: i64, o: i64) -> nn::Linear {
    nn::linear(vs, i, o, Default::default())
}

fn model(vs: &nn::VarStore) -> Encoder3 {
    let root = vs.root();
    let blocks = (0..2)
        .map(|b| Block {
            mlp: Mlp {
                layers: (0..3).map(|l| linear(&(&root / b / l), 4, 4)).collect(),
                scale: 0.5,
                name: format!("block{b}"),
                calls: Default::default(),
            },
            norm: nn::layer_norm(&root / b / "norm", vec![4], Default::default()),
        })
        .collect();
    Encoder3 { blocks, head: Head::Mixture { experts: vec![linear(&(&root / "e0"), 4, 2)], top_k: 1 } }
}

#[test]
fn a_cpu_parameter_deep_in_a_derived_model_is_named_by_its_path() {
    let vs = nn::VarStore::new(Device::Cpu);
    let m = model(&vs);
    match Encoder::encode("encoder", &m) {
        Err(Error::NotCuda { path, device }) => {
            assert_eq!((path.as_str(), device.as_str()), ("encoder.blocks[0].mlp.layers[0].weight", "Cpu"))
        }
        other => panic!("{other:?}"),
    }
    let head = Head::Linear(linear(&vs.root(), 4, 2));
    let err = Encoder::encode("head", &head).unwrap_err();
    assert!(err.to_string().starts_with("head.Linear.0.weight is on Cpu"), "{err}");
}

#[test]
fn alias_keeps_memory_configuration_and_behaviour() {
    tch::manual_seed(1);
    let vs = nn::VarStore::new(Device::Cpu);
    let m = model(&vs);
    m.blocks[0].mlp.calls.set(7);
    let a = m.alias().unwrap();
    assert_eq!(a.blocks[1].mlp.name, "block1");
    assert_eq!(a.blocks[0].mlp.scale, 0.5);
    assert_eq!(a.blocks[0].mlp.calls.get(), 0, "skipped fields are rebuilt with Default");
    assert_eq!(a.blocks[0].mlp.layers[2].ws.data_ptr(), m.blocks[0].mlp.layers[2].ws.data_ptr());
    let x = Tensor::randn([3, 4], (Kind::Float, Device::Cpu));
    assert!(m.blocks[1].mlp.forward(&x).equal(&a.blocks[1].mlp.forward(&x)));
    match &a.head {
        Head::Mixture { experts, top_k } => assert_eq!((experts.len(), *top_k), (1, 1)),
        Head::Linear(_) => panic!("wrong variant"),
    }
    let w = Wrapper { inner: linear(&vs.root(), 2, 2), tag: "t".into() };
    let wa = w.alias().unwrap();
    assert_eq!((wa.tag.as_str(), wa.inner.ws.data_ptr()), ("t", w.inner.ws.data_ptr()));
}

#[test]
fn modules_need_a_tensor_and_containers_do_not() {
    match Encoder::encode("config", &NoTensors { count: 3 }) {
        Err(Error::Unsupported { path, reason }) => {
            assert_eq!(path, "config");
            assert!(reason.contains("at least one CUDA tensor"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    let empty = MaybeTensors { first: None, count: 2 };
    let encoded = Encoder::encode("batch", &empty).unwrap();
    assert_eq!(encoded.tensor_count(), 0);
}
