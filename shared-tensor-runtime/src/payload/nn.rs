//! [`Payload`] for tch's nn modules and `nn::VarStore`.
//!
//! A module crosses as its tensors (by CUDA IPC) plus its configuration (MessagePack),
//! and is rebuilt on the other side around the shared tensors: the receiver's module
//! computes with the sender's GPU memory, no second copy. Every module is checked before
//! sending: at least one tensor, all on CUDA, all on one GPU.

use std::collections::{BTreeMap, HashMap};

use tch::nn;
use tch::Tensor;

use super::{Decoder, Encoder, Node, Payload};
use crate::error::{Error, Result};

/// The named parts of a struct-like node, taken one by one while decoding.
///
/// ```no_run
/// # use shared_tensor_runtime::payload::{Decoder, Node, nn::Fields};
/// # fn demo(node: Node, dec: &mut Decoder) -> shared_tensor_runtime::Result<()> {
/// let mut fields = Fields::new(node, dec)?;
/// let weight: tch::Tensor = fields.take(dec, "weight")?;
/// let eps: f64 = fields.take_data(dec, "eps")?;
/// # Ok(()) }
/// ```
pub struct Fields {
    entries: HashMap<String, Node>,
}

impl Fields {
    /// Reads a [`Node::Map`].
    pub fn new(node: Node, dec: &Decoder) -> Result<Fields> {
        match node {
            Node::Map(entries) => Ok(Fields { entries: entries.into_iter().collect() }),
            other => Err(dec.mismatch("a struct", &other)),
        }
    }

    fn node(&mut self, dec: &Decoder, name: &str) -> Result<Node> {
        self.entries
            .remove(name)
            .ok_or_else(|| Error::Protocol(format!("{}: the field `{name}` is missing", dec.path())))
    }

    /// Decodes a payload field.
    pub fn take<P: Payload>(&mut self, dec: &mut Decoder, name: &str) -> Result<P> {
        let node = self.node(dec, name)?;
        dec.field(name, |dec| P::decode(node, dec))
    }

    /// Decodes a plain (MessagePack) field.
    pub fn take_data<T: serde::de::DeserializeOwned>(&mut self, dec: &mut Decoder, name: &str) -> Result<T> {
        let node = self.node(dec, name)?;
        dec.field(name, |dec| dec.data(node))
    }
}

/// Encodes `name => payload` pairs as a [`Node::Map`], each under its name in paths.
#[macro_export]
#[doc(hidden)]
macro_rules! __encode_fields {
    ($enc:expr, $($name:literal => $value:expr),* $(,)?) => {{
        let enc: &mut $crate::payload::Encoder = $enc;
        Ok::<_, $crate::Error>($crate::payload::Node::Map(vec![
            $(($name.to_string(), enc.field($name, |enc| $crate::payload::Payload::encode($value, enc))?)),*
        ]))
    }};
}

pub use crate::__encode_fields as encode_fields;

impl Payload for nn::Linear {
    fn encode(&self, enc: &mut Encoder) -> Result<Node> {
        enc.module(|enc| encode_fields!(enc, "weight" => &self.ws, "bias" => &self.bs))
    }
    fn decode(node: Node, dec: &mut Decoder) -> Result<Self> {
        let mut f = Fields::new(node, dec)?;
        Ok(nn::Linear { ws: f.take(dec, "weight")?, bs: f.take(dec, "bias")? })
    }
    fn alias(&self) -> Self {
        nn::Linear { ws: self.ws.shallow_clone(), bs: self.bs.alias() }
    }
}

/// The variables of a VarStore: by name, and which are trainable (with their group).
fn store_parts(vs: &nn::VarStore) -> (BTreeMap<String, Tensor>, Vec<(String, usize)>) {
    let vars = vs.variables_.lock().unwrap_or_else(|e| e.into_inner());
    let named: BTreeMap<String, Tensor> =
        vars.named_variables.iter().map(|(k, t)| (k.clone(), t.shallow_clone())).collect();
    let mut trainable = Vec::new();
    for var in &vars.trainable_variables {
        if let Some((name, _)) = named.iter().find(|(_, t)| t.is_set_to(&var.tensor)) {
            trainable.push((name.clone(), var.group));
        }
    }
    (named, trainable)
}

fn build_store(device: tch::Device, named: BTreeMap<String, Tensor>, trainable: &[(String, usize)]) -> nn::VarStore {
    let vs = nn::VarStore::new(device);
    for (name, tensor) in named {
        let group = trainable.iter().find(|(n, _)| *n == name).map(|(_, g)| *g);
        // Path::add takes one name component: walk the dotted name through sub-paths.
        let mut parts: Vec<&str> = name.split('.').collect();
        let leaf = parts.pop().unwrap_or_default();
        let mut path = vs.root().set_group(group.unwrap_or(0));
        for part in parts {
            path = path / part;
        }
        let _ = path.add(leaf, tensor, group.is_some());
    }
    vs
}

impl Payload for nn::VarStore {
    fn encode(&self, enc: &mut Encoder) -> Result<Node> {
        let (named, trainable) = store_parts(self);
        enc.module(|enc| {
            let variables = named.encode(enc)?;
            let trainable = enc.data(&trainable)?;
            Ok(Node::Map(vec![("variables".into(), variables), ("trainable".into(), trainable)]))
        })
    }
    fn decode(node: Node, dec: &mut Decoder) -> Result<Self> {
        let mut f = Fields::new(node, dec)?;
        let named: BTreeMap<String, Tensor> = f.take(dec, "variables")?;
        let trainable: Vec<(String, usize)> = f.take_data(dec, "trainable")?;
        let device = named.values().next().map(Tensor::device).unwrap_or(tch::Device::Cpu);
        Ok(build_store(device, named, &trainable))
    }
    fn alias(&self) -> Self {
        let (named, trainable) = store_parts(self);
        build_store(self.device(), named, &trainable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cpu_module_is_refused_with_its_parameter_path() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let linear = nn::linear(vs.root(), 4, 2, Default::default());
        let err = Encoder::encode("encoder", &vec![linear]).unwrap_err();
        assert!(err.to_string().starts_with("encoder[0].weight is on Cpu"), "{err}");
        let err = Encoder::encode("store", &vs).unwrap_err();
        assert!(err.to_string().contains("is on Cpu"), "{err}");
    }

    #[test]
    fn an_empty_module_is_refused() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let err = Encoder::encode("store", &vs).unwrap_err();
        assert!(err.to_string().contains("at least one CUDA tensor"), "{err}");
    }

    #[test]
    fn var_store_parts_keep_names_and_trainability() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let _ = nn::linear(vs.root() / "l1", 3, 2, Default::default());
        let _frozen = vs.root().zeros_no_train("stats", &[2]);
        let (named, trainable) = store_parts(&vs);
        assert_eq!(named.keys().cloned().collect::<Vec<_>>(), vec!["l1.bias", "l1.weight", "stats"]);
        let mut names: Vec<&str> = trainable.iter().map(|(n, _)| n.as_str()).collect();
        names.sort();
        assert_eq!(names, vec!["l1.bias", "l1.weight"]);
        let rebuilt = build_store(tch::Device::Cpu, named, &trainable);
        assert_eq!(rebuilt.len(), 3);
        assert_eq!(rebuilt.trainable_variables().len(), 2);
        let original = vs.variables();
        for (name, t) in rebuilt.variables() {
            assert_eq!(t.data_ptr(), original[&name].data_ptr(), "{name} is the same memory");
        }
    }
}
