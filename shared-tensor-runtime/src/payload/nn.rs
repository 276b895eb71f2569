//! [`Payload`] for tch's nn modules, `nn::VarStore`, and the shareable recurrent layers
//! [`Lstm`] and [`Gru`].
//!
//! A module crosses as its tensors (by CUDA IPC) plus its configuration (MessagePack),
//! and is rebuilt on the other side around the shared tensors: the receiver's module
//! computes with the sender's GPU memory, no second copy. Every module is checked before
//! sending: at least one tensor, all on CUDA, all on one GPU.
//!
//! tch keeps most modules' configuration private (no getters); it is read from their
//! `Debug` text, which is stable under the pinned tch version and covered by tests that
//! rebuild each module and compare. The receiver rebuilds a module with tch's own
//! constructor over a throw-away CPU `VarStore` and then puts the shared tensors in its
//! public fields. The constructor is called with the smallest dimensions that keep the
//! configuration valid (every size 1, `groups` kept): the settings live in the private
//! configuration, the sizes only in the tensors, so rebuilding a 2 GiB embedding costs a
//! few bytes of host memory, not 2 GiB, on every decode and every local cache hit.
//!
//! tch's `nn::LSTM` and `nn::GRU` hide their weights entirely, so they cannot be read to
//! be shared: use [`Lstm`] and [`Gru`] instead, built like `nn::lstm`/`nn::gru` (same
//! variable names, shapes and initialisation) and computing the same forward.

use std::borrow::Borrow;
use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use tch::nn::{self, RNN};
use tch::{Device, Tensor};

use super::debug_text::{self, Dbg};
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
    // A struct has a handful of fields: a linear search beats hashing each name.
    entries: Vec<(String, Node)>,
}

impl Fields {
    /// Reads a [`Node::Map`].
    ///
    /// ```no_run
    /// # use shared_tensor_runtime::payload::{nn::Fields, Decoder, Node};
    /// # fn decode(node: Node, dec: &mut Decoder) -> shared_tensor_runtime::Result<tch::nn::Linear> {
    /// let mut fields = Fields::new(node, dec)?;
    /// Ok(tch::nn::Linear { ws: fields.take(dec, "weight")?, bs: fields.take(dec, "bias")? })
    /// # }
    /// ```
    pub fn new(node: Node, dec: &Decoder) -> Result<Fields> {
        match node {
            Node::Map(entries) => Ok(Fields { entries }),
            other => Err(dec.mismatch("a struct", &other)),
        }
    }

    fn node(&mut self, dec: &Decoder, name: &str) -> Result<Node> {
        match self.entries.iter().position(|(key, _)| key == name) {
            Some(at) => Ok(self.entries.swap_remove(at).1),
            None => Err(Error::Protocol(format!("{}: the field `{name}` is missing", dec.path()))),
        }
    }

    /// Decodes a payload field.
    ///
    /// ```no_run
    /// # use shared_tensor_runtime::payload::{nn::Fields, Decoder, Node};
    /// # fn decode(node: Node, dec: &mut Decoder) -> shared_tensor_runtime::Result<()> {
    /// let mut fields = Fields::new(node, dec)?;
    /// let weight: tch::Tensor = fields.take(dec, "weight")?;
    /// let bias: Option<tch::Tensor> = fields.take(dec, "bias")?;
    /// # Ok(()) }
    /// ```
    pub fn take<P: Payload>(&mut self, dec: &mut Decoder, name: &str) -> Result<P> {
        let node = self.node(dec, name)?;
        dec.field(name, |dec| P::decode(node, dec))
    }

    /// Decodes any argument field (payload or plain value).
    ///
    /// ```no_run
    /// # use shared_tensor_runtime::payload::{nn::Fields, Decoder, Node};
    /// # fn decode(node: Node, dec: &mut Decoder) -> shared_tensor_runtime::Result<()> {
    /// let mut fields = Fields::new(node, dec)?;
    /// let mask: tch::Tensor = fields.take_arg(dec, "mask")?; // by CUDA IPC
    /// let steps: i64 = fields.take_arg(dec, "steps")?; // by value
    /// # Ok(()) }
    /// ```
    pub fn take_arg<V, A: super::Argument<V>>(&mut self, dec: &mut Decoder, name: &str) -> Result<A> {
        let node = self.node(dec, name)?;
        dec.field(name, |dec| A::decode_arg(node, dec))
    }

    /// Decodes a plain (MessagePack) field.
    ///
    /// ```no_run
    /// # use shared_tensor_runtime::payload::{nn::Fields, Decoder, Node};
    /// # fn decode(node: Node, dec: &mut Decoder) -> shared_tensor_runtime::Result<()> {
    /// let mut fields = Fields::new(node, dec)?;
    /// let eps: f64 = fields.take_data(dec, "eps")?;
    /// let shape: Vec<i64> = fields.take_data(dec, "normalized_shape")?;
    /// # Ok(()) }
    /// ```
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

/// A module's private configuration, read from its `Debug` text.
fn config_of<M: std::fmt::Debug>(module: &M, path: &dyn Fn() -> String) -> Result<Dbg> {
    let fail = |reason: String| Error::Unsupported {
        path: path(),
        reason: format!("its configuration cannot be read from tch's Debug text ({reason})"),
    };
    let parsed = debug_text::parse(&format!("{module:?}")).map_err(fail)?;
    parsed.field("config").cloned().map_err(fail)
}

/// Runs `read` over a module's configuration, naming the module in errors.
fn spec<M: std::fmt::Debug, S>(
    module: &M,
    path: &dyn Fn() -> String,
    read: impl FnOnce(&Dbg) -> std::result::Result<S, String>,
) -> Result<S> {
    let config = config_of(module, path)?;
    read(&config).map_err(|reason| Error::Unsupported {
        path: path(),
        reason: format!("its configuration cannot be read from tch's Debug text ({reason})"),
    })
}

/// A rebuilt module's construction error (shapes that do not match the configuration).
fn rebuild_error(what: &str, reason: impl std::fmt::Display) -> Error {
    Error::Protocol(format!("cannot rebuild a {what}: {reason}"))
}

fn cpu_store() -> nn::VarStore {
    nn::VarStore::new(Device::Cpu)
}

impl Payload for nn::Linear {
    fn encode(&self, enc: &mut Encoder) -> Result<Node> {
        enc.module(|enc| encode_fields!(enc, "weight" => &self.ws, "bias" => &self.bs))
    }
    fn decode(node: Node, dec: &mut Decoder) -> Result<Self> {
        let mut f = Fields::new(node, dec)?;
        Ok(nn::Linear { ws: f.take(dec, "weight")?, bs: f.take(dec, "bias")? })
    }
    fn alias(&self) -> Result<Self> {
        Ok(nn::Linear { ws: self.ws.shallow_clone(), bs: self.bs.alias()? })
    }
}

/// What a convolution needs besides its tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ConvSpec {
    stride: Vec<i64>,
    padding: Vec<i64>,
    dilation: Vec<i64>,
    groups: i64,
    padding_mode: String,
}

fn conv_spec(config: &Dbg) -> std::result::Result<ConvSpec, String> {
    Ok(ConvSpec {
        stride: config.field("stride")?.i64s()?,
        padding: config.field("padding")?.i64s()?,
        dilation: config.field("dilation")?.i64s()?,
        groups: config.field("groups")?.i64()?,
        padding_mode: config.field("padding_mode")?.atom()?.to_string(),
    })
}

fn padding_mode(name: &str) -> Result<nn::PaddingMode> {
    Ok(match name {
        "Zeros" => nn::PaddingMode::Zeros,
        "Reflect" => nn::PaddingMode::Reflect,
        "Replicate" => nn::PaddingMode::Replicate,
        "Circular" => nn::PaddingMode::Circular,
        other => return Err(rebuild_error("convolution", format!("unknown padding mode {other:?}"))),
    })
}

fn array<const N: usize>(v: &[i64], what: &str) -> Result<[i64; N]> {
    v.try_into().map_err(|_| rebuild_error("convolution", format!("{what} has {} values, expected {N}", v.len())))
}

fn rebuild_conv<const N: usize>(ws: Tensor, bs: Option<Tensor>, s: &ConvSpec) -> Result<nn::Conv<[i64; N]>> {
    let size = ws.size();
    if size.len() != N + 2 || s.groups < 1 {
        return Err(rebuild_error("convolution", format!("weight of shape {size:?} for {N} dimensions")));
    }
    let config = nn::ConvConfigND::<[i64; N]> {
        stride: array(&s.stride, "stride")?,
        padding: array(&s.padding, "padding")?,
        dilation: array(&s.dilation, "dilation")?,
        groups: s.groups,
        bias: bs.is_some(),
        ws_init: nn::Init::Const(0.),
        bs_init: nn::Init::Const(0.),
        padding_mode: padding_mode(&s.padding_mode)?,
    };
    // in = groups and out = 1 give a [1, 1, 1..] weight: the sizes come from `ws`.
    let vs = cpu_store();
    let mut conv = nn::conv(vs.root(), s.groups, 1, [1; N], config);
    conv.ws = ws;
    conv.bs = bs;
    Ok(conv)
}

macro_rules! conv_payload {
    ($n:literal) => {
        impl Payload for nn::Conv<[i64; $n]> {
            fn encode(&self, enc: &mut Encoder) -> Result<Node> {
                let path = enc.path();
                let s = spec(self, &|| path.clone(), conv_spec)?;
                enc.module(|enc| {
                    let config = enc.data(&s)?;
                    let mut node = encode_fields!(enc, "weight" => &self.ws, "bias" => &self.bs)?;
                    if let Node::Map(fields) = &mut node {
                        fields.push(("config".into(), config));
                    }
                    Ok(node)
                })
            }
            fn decode(node: Node, dec: &mut Decoder) -> Result<Self> {
                let mut f = Fields::new(node, dec)?;
                let (ws, bs, s): (Tensor, Option<Tensor>, ConvSpec) =
                    (f.take(dec, "weight")?, f.take(dec, "bias")?, f.take_data(dec, "config")?);
                rebuild_conv::<$n>(ws, bs, &s)
            }
            fn alias(&self) -> Result<Self> {
                let s = spec(self, &|| "a convolution".into(), conv_spec)?;
                rebuild_conv::<$n>(self.ws.shallow_clone(), self.bs.alias()?, &s)
            }
        }
    };
}

conv_payload!(1);
conv_payload!(2);
conv_payload!(3);

/// What a transposed convolution needs besides its tensors. tch builds them only from
/// scalar settings (the same for every dimension).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ConvTransposeSpec {
    stride: i64,
    padding: i64,
    output_padding: i64,
    dilation: i64,
    groups: i64,
}

fn uniform(config: &Dbg, name: &str) -> std::result::Result<i64, String> {
    let values = config.field(name)?.i64s()?;
    match values.as_slice() {
        [first, rest @ ..] if rest.iter().all(|v| v == first) => Ok(*first),
        _ => Err(format!("{name} {values:?} differs between dimensions")),
    }
}

fn conv_transpose_spec(config: &Dbg) -> std::result::Result<ConvTransposeSpec, String> {
    Ok(ConvTransposeSpec {
        stride: uniform(config, "stride")?,
        padding: uniform(config, "padding")?,
        output_padding: uniform(config, "output_padding")?,
        dilation: uniform(config, "dilation")?,
        groups: config.field("groups")?.i64()?,
    })
}

macro_rules! conv_transpose_payload {
    ($n:literal, $ctor:path) => {
        impl Payload for nn::ConvTransposeND<[i64; $n]> {
            fn encode(&self, enc: &mut Encoder) -> Result<Node> {
                let path = enc.path();
                let s = spec(self, &|| path.clone(), conv_transpose_spec)?;
                enc.module(|enc| {
                    let config = enc.data(&s)?;
                    let mut node = encode_fields!(enc, "weight" => &self.ws, "bias" => &self.bs)?;
                    if let Node::Map(fields) = &mut node {
                        fields.push(("config".into(), config));
                    }
                    Ok(node)
                })
            }
            fn decode(node: Node, dec: &mut Decoder) -> Result<Self> {
                let mut f = Fields::new(node, dec)?;
                let (ws, bs, s): (Tensor, Option<Tensor>, ConvTransposeSpec) =
                    (f.take(dec, "weight")?, f.take(dec, "bias")?, f.take_data(dec, "config")?);
                Self::rebuild(ws, bs, &s)
            }
            fn alias(&self) -> Result<Self> {
                let s = spec(self, &|| "a transposed convolution".into(), conv_transpose_spec)?;
                Self::rebuild(self.ws.shallow_clone(), self.bs.alias()?, &s)
            }
        }

        impl Rebuild for nn::ConvTransposeND<[i64; $n]> {
            type Spec = ConvTransposeSpec;
            fn rebuild(ws: Tensor, bs: Option<Tensor>, s: &ConvTransposeSpec) -> Result<Self> {
                let size = ws.size();
                if size.len() != $n + 2 || s.groups < 1 {
                    return Err(rebuild_error("transposed convolution", format!("weight of shape {size:?}")));
                }
                let config = nn::ConvTransposeConfig {
                    stride: s.stride,
                    padding: s.padding,
                    output_padding: s.output_padding,
                    dilation: s.dilation,
                    groups: s.groups,
                    bias: bs.is_some(),
                    ws_init: nn::Init::Const(0.),
                    bs_init: nn::Init::Const(0.),
                };
                // in = 1 and out = 1 allocate a few bytes at most: the sizes come from `ws`.
                let vs = cpu_store();
                let mut m = $ctor(vs.root(), 1, 1, 1, config);
                m.ws = ws;
                m.bs = bs;
                Ok(m)
            }
        }
    };
}

/// Rebuilds a module from its shared tensors and its configuration.
trait Rebuild: Sized {
    type Spec;
    fn rebuild(ws: Tensor, bs: Option<Tensor>, spec: &Self::Spec) -> Result<Self>;
}

conv_transpose_payload!(1, nn::conv_transpose1d);
conv_transpose_payload!(2, nn::conv_transpose2d);
conv_transpose_payload!(3, nn::conv_transpose3d);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct EmbeddingSpec {
    sparse: bool,
    scale_grad_by_freq: bool,
    padding_idx: i64,
}

fn embedding_spec(c: &Dbg) -> std::result::Result<EmbeddingSpec, String> {
    Ok(EmbeddingSpec {
        sparse: c.field("sparse")?.bool()?,
        scale_grad_by_freq: c.field("scale_grad_by_freq")?.bool()?,
        padding_idx: c.field("padding_idx")?.i64()?,
    })
}

fn rebuild_embedding(ws: Tensor, s: &EmbeddingSpec) -> Result<nn::Embedding> {
    let size = ws.size();
    if size.len() != 2 {
        return Err(rebuild_error("embedding", format!("weight of shape {size:?}")));
    }
    let config = nn::EmbeddingConfig {
        sparse: s.sparse,
        scale_grad_by_freq: s.scale_grad_by_freq,
        ws_init: nn::Init::Const(0.),
        padding_idx: s.padding_idx,
    };
    let vs = cpu_store();
    let mut m = nn::embedding(vs.root(), 1, 1, config);
    m.ws = ws;
    Ok(m)
}

impl Payload for nn::Embedding {
    fn encode(&self, enc: &mut Encoder) -> Result<Node> {
        let path = enc.path();
        let s = spec(self, &|| path.clone(), embedding_spec)?;
        enc.module(|enc| {
            let config = enc.data(&s)?;
            Ok(Node::Map(vec![
                ("weight".into(), enc.field("weight", |e| self.ws.encode(e))?),
                ("config".into(), config),
            ]))
        })
    }
    fn decode(node: Node, dec: &mut Decoder) -> Result<Self> {
        let mut f = Fields::new(node, dec)?;
        let ws: Tensor = f.take(dec, "weight")?;
        let s: EmbeddingSpec = f.take_data(dec, "config")?;
        rebuild_embedding(ws, &s)
    }
    fn alias(&self) -> Result<Self> {
        rebuild_embedding(self.ws.shallow_clone(), &spec(self, &|| "an embedding".into(), embedding_spec)?)
    }
}

/// What the normalization layers need besides their tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct NormSpec {
    cudnn_enabled: bool,
    eps: f64,
    momentum: f64,
    affine: bool,
}

fn norm_spec(affine_field: &'static str) -> impl Fn(&Dbg) -> std::result::Result<NormSpec, String> {
    move |c| {
        Ok(NormSpec {
            cudnn_enabled: c.field("cudnn_enabled")?.bool()?,
            eps: c.field("eps")?.f64()?,
            momentum: c.field("momentum").and_then(Dbg::f64).unwrap_or(0.1),
            affine: c.field(affine_field)?.bool()?,
        })
    }
}

fn rebuild_layer_norm(ws: Option<Tensor>, bs: Option<Tensor>, shape: Vec<i64>, s: &NormSpec) -> nn::LayerNorm {
    let config = nn::LayerNormConfig {
        cudnn_enabled: s.cudnn_enabled,
        eps: s.eps,
        elementwise_affine: s.affine,
        ws_init: nn::Init::Const(1.),
        bs_init: nn::Init::Const(0.),
    };
    let vs = cpu_store();
    let mut m = nn::layer_norm(vs.root(), vec![1], config);
    m.normalized_shape = shape;
    m.ws = ws;
    m.bs = bs;
    m
}

impl Payload for nn::LayerNorm {
    fn encode(&self, enc: &mut Encoder) -> Result<Node> {
        let path = enc.path();
        let s = spec(self, &|| path.clone(), norm_spec("elementwise_affine"))?;
        // Without an affine part a layer norm holds no tensor: nothing to share.
        enc.module(|enc| {
            let (config, shape) = (enc.data(&s)?, enc.data(&self.normalized_shape)?);
            let mut node = encode_fields!(enc, "weight" => &self.ws, "bias" => &self.bs)?;
            if let Node::Map(fields) = &mut node {
                fields.push(("config".into(), config));
                fields.push(("normalized_shape".into(), shape));
            }
            Ok(node)
        })
    }
    fn decode(node: Node, dec: &mut Decoder) -> Result<Self> {
        let mut f = Fields::new(node, dec)?;
        let (ws, bs) = (f.take(dec, "weight")?, f.take(dec, "bias")?);
        let (s, shape): (NormSpec, Vec<i64>) = (f.take_data(dec, "config")?, f.take_data(dec, "normalized_shape")?);
        Ok(rebuild_layer_norm(ws, bs, shape, &s))
    }
    fn alias(&self) -> Result<Self> {
        let s = spec(self, &|| "a layer norm".into(), norm_spec("elementwise_affine"))?;
        Ok(rebuild_layer_norm(self.ws.alias()?, self.bs.alias()?, self.normalized_shape.clone(), &s))
    }
}

struct BatchNormParts {
    running_mean: Tensor,
    running_var: Tensor,
    ws: Option<Tensor>,
    bs: Option<Tensor>,
    nd: usize,
}

fn rebuild_batch_norm(p: BatchNormParts, s: &NormSpec) -> Result<nn::BatchNorm> {
    let config = nn::BatchNormConfig {
        cudnn_enabled: s.cudnn_enabled,
        eps: s.eps,
        momentum: s.momentum,
        affine: s.affine,
        ws_init: nn::Init::Const(1.),
        bs_init: nn::Init::Const(0.),
    };
    let vs = cpu_store();
    let mut m = match p.nd {
        1 => nn::batch_norm1d(vs.root(), 1, config),
        2 => nn::batch_norm2d(vs.root(), 1, config),
        3 => nn::batch_norm3d(vs.root(), 1, config),
        nd => return Err(rebuild_error("batch norm", format!("{nd} dimensions"))),
    };
    m.running_mean = p.running_mean;
    m.running_var = p.running_var;
    m.ws = p.ws;
    m.bs = p.bs;
    Ok(m)
}

impl Payload for nn::BatchNorm {
    fn encode(&self, enc: &mut Encoder) -> Result<Node> {
        let path = enc.path();
        let s = spec(self, &|| path.clone(), norm_spec("affine"))?;
        enc.module(|enc| {
            let (config, nd) = (enc.data(&s)?, enc.data(&self.nd)?);
            let mut node = encode_fields!(enc,
                "running_mean" => &self.running_mean, "running_var" => &self.running_var,
                "weight" => &self.ws, "bias" => &self.bs)?;
            if let Node::Map(fields) = &mut node {
                fields.push(("config".into(), config));
                fields.push(("nd".into(), nd));
            }
            Ok(node)
        })
    }
    fn decode(node: Node, dec: &mut Decoder) -> Result<Self> {
        let mut f = Fields::new(node, dec)?;
        let parts = BatchNormParts {
            running_mean: f.take(dec, "running_mean")?,
            running_var: f.take(dec, "running_var")?,
            ws: f.take(dec, "weight")?,
            bs: f.take(dec, "bias")?,
            nd: f.take_data(dec, "nd")?,
        };
        let s: NormSpec = f.take_data(dec, "config")?;
        rebuild_batch_norm(parts, &s)
    }
    fn alias(&self) -> Result<Self> {
        let s = spec(self, &|| "a batch norm".into(), norm_spec("affine"))?;
        let parts = BatchNormParts {
            running_mean: self.running_mean.shallow_clone(),
            running_var: self.running_var.shallow_clone(),
            ws: self.ws.alias()?,
            bs: self.bs.alias()?,
            nd: self.nd,
        };
        rebuild_batch_norm(parts, &s)
    }
}

fn rebuild_group_norm(
    ws: Option<Tensor>,
    bs: Option<Tensor>,
    groups: i64,
    channels: i64,
    s: &NormSpec,
) -> nn::GroupNorm {
    let config = nn::GroupNormConfig {
        cudnn_enabled: s.cudnn_enabled,
        eps: s.eps,
        affine: s.affine,
        ws_init: nn::Init::Const(1.),
        bs_init: nn::Init::Const(0.),
    };
    let vs = cpu_store();
    let mut m = nn::group_norm(vs.root(), 1, 1, config);
    (m.num_groups, m.num_channels) = (groups, channels);
    m.ws = ws;
    m.bs = bs;
    m
}

impl Payload for nn::GroupNorm {
    fn encode(&self, enc: &mut Encoder) -> Result<Node> {
        let path = enc.path();
        let s = spec(self, &|| path.clone(), norm_spec("affine"))?;
        enc.module(|enc| {
            let (config, dims) = (enc.data(&s)?, enc.data(&(self.num_groups, self.num_channels))?);
            let mut node = encode_fields!(enc, "weight" => &self.ws, "bias" => &self.bs)?;
            if let Node::Map(fields) = &mut node {
                fields.push(("config".into(), config));
                fields.push(("groups_channels".into(), dims));
            }
            Ok(node)
        })
    }
    fn decode(node: Node, dec: &mut Decoder) -> Result<Self> {
        let mut f = Fields::new(node, dec)?;
        let (ws, bs) = (f.take(dec, "weight")?, f.take(dec, "bias")?);
        let s: NormSpec = f.take_data(dec, "config")?;
        let (groups, channels): (i64, i64) = f.take_data(dec, "groups_channels")?;
        Ok(rebuild_group_norm(ws, bs, groups, channels, &s))
    }
    fn alias(&self) -> Result<Self> {
        let s = spec(self, &|| "a group norm".into(), norm_spec("affine"))?;
        Ok(rebuild_group_norm(self.ws.alias()?, self.bs.alias()?, self.num_groups, self.num_channels, &s))
    }
}

/// The settings of a recurrent layer that its forward uses (tch's `nn::RNNConfig`
/// without the initialisers).
///
/// ```
/// use shared_tensor_runtime::payload::nn::RnnSettings;
/// let s = RnnSettings::from(&tch::nn::RNNConfig::default());
/// assert!(s.batch_first && s.has_biases && s.num_layers == 1);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RnnSettings {
    /// Whether the layer has bias vectors.
    pub has_biases: bool,
    /// Stacked layers.
    pub num_layers: i64,
    /// Dropout between layers.
    pub dropout: f64,
    /// Training mode (dropout active).
    pub train: bool,
    /// Both directions.
    pub bidirectional: bool,
    /// Inputs are `[batch, seq, features]`.
    pub batch_first: bool,
}

impl From<&nn::RNNConfig> for RnnSettings {
    fn from(c: &nn::RNNConfig) -> Self {
        RnnSettings {
            has_biases: c.has_biases,
            num_layers: c.num_layers,
            dropout: c.dropout,
            train: c.train,
            bidirectional: c.bidirectional,
            batch_first: c.batch_first,
        }
    }
}

/// The flat weights of a recurrent layer, created like tch's `nn::lstm`/`nn::gru` create
/// theirs (same names, shapes, initialisers and order).
fn rnn_weights<'a>(vs: &nn::Path<'a>, in_dim: i64, hidden: i64, gates: i64, c: &nn::RNNConfig) -> Vec<Tensor> {
    let directions = if c.bidirectional { 2 } else { 1 };
    let mut weights = Vec::new();
    for layer in 0..c.num_layers {
        for direction in 0..directions {
            let input = if layer == 0 { in_dim } else { hidden * directions };
            let suffix = if direction == 1 { "_reverse" } else { "" };
            weights.push(vs.var(&format!("weight_ih_l{layer}{suffix}"), &[gates * hidden, input], c.w_ih_init));
            weights.push(vs.var(&format!("weight_hh_l{layer}{suffix}"), &[gates * hidden, hidden], c.w_hh_init));
            if c.has_biases {
                let (b_ih, b_hh) =
                    (c.b_ih_init.unwrap_or(nn::Init::Const(0.)), c.b_hh_init.unwrap_or(nn::Init::Const(0.)));
                weights.push(vs.var(&format!("bias_ih_l{layer}{suffix}"), &[gates * hidden], b_ih));
                weights.push(vs.var(&format!("bias_hh_l{layer}{suffix}"), &[gates * hidden], b_hh));
            }
        }
    }
    weights
}

/// cuDNN's RNN modes (`cudnnRNNMode_t`), as `torch._cudnn_rnn_flatten_weight` takes them.
const CUDNN_LSTM: i64 = 2;
const CUDNN_GRU: i64 = 3;

/// Moves a recurrent layer's weights into one new buffer in cuDNN's layout and re-points
/// each weight at its view of it (what PyTorch's `RNNBase.flatten_parameters` does).
/// A no-op off CUDA or without cuDNN.
fn flatten_rnn(weights: &[Tensor], mode: i64, hidden_dim: i64, s: &RnnSettings) -> Result<()> {
    let Some(first) = weights.first() else { return Ok(()) };
    if !first.device().is_cuda() || !tch::Cuda::cudnn_is_available() {
        return Ok(());
    }
    let input_dim = first.size().get(1).copied().unwrap_or(0);
    let per_layer = if s.has_biases { 4 } else { 2 };
    // cuDNN's flatten copies the weights into its buffer and `set_`s each one to its view
    // of it; `set_` on a leaf that requires grad is allowed only without grad mode.
    tch::no_grad(|| {
        Tensor::f_internal_cudnn_rnn_flatten_weight(
            weights,
            per_layer,
            input_dim,
            mode,
            hidden_dim,
            0,
            s.num_layers,
            s.batch_first,
            s.bidirectional,
        )
    })
    .map(drop)
    .map_err(|e| Error::Unsupported {
        path: "a recurrent layer".into(),
        reason: format!("cuDNN cannot lay out its {:?} weights in one buffer ({e})", first.kind()),
    })
}

macro_rules! recurrent {
    ($name:ident, $gates:expr, $mode:expr, $doc:literal) => {
        #[doc = $doc]
        ///
        #[doc = concat!(
            "```no_run\nuse shared_tensor_runtime::payload::nn::", stringify!($name), ";\n",
            "use tch::nn::{self, RNN};\n\n",
            "let vs = nn::VarStore::new(tch::Device::Cuda(0));\n",
            "let layer = ", stringify!($name), "::new(vs.root(), 16, 32, Default::default()); // send it like any module\n",
            "let xs = tch::Tensor::zeros([4, 10, 16], (tch::Kind::Float, tch::Device::Cuda(0)));\n",
            "let (out, _state) = layer.seq(&xs);\n",
            "assert_eq!(out.size(), [4, 10, 32]);\n```"
        )]
        ///
        /// Its fields are public: `weights` in tch's flat order (per layer and direction:
        /// `weight_ih`, `weight_hh`, then `bias_ih`, `bias_hh` if any).
        ///
        /// On CUDA with cuDNN, [`new`](Self::new) lays the weights out as cuDNN expects, in
        /// one buffer with each weight a view of it (see
        /// [`flatten_parameters`](Self::flatten_parameters)): cuDNN then computes on them in
        /// place instead of copying them into a buffer of its own on every forward (its
        /// warning "RNN module weights are not part of single contiguous chunk of memory").
        /// Views of one buffer travel as one storage, so a received layer is flat too.
        #[derive(Debug)]
        pub struct $name {
            /// The flat weights.
            pub weights: Vec<Tensor>,
            /// Hidden size.
            pub hidden_dim: i64,
            /// Forward settings.
            pub settings: RnnSettings,
        }

        impl $name {
            /// Creates the layer's variables under `vs`, as tch's constructor does.
            pub fn new<'a, T: Borrow<nn::Path<'a>>>(
                vs: T,
                in_dim: i64,
                hidden_dim: i64,
                config: nn::RNNConfig,
            ) -> Self {
                let weights = rnn_weights(vs.borrow(), in_dim, hidden_dim, $gates, &config);
                let mut layer = $name { weights, hidden_dim, settings: RnnSettings::from(&config) };
                // A dtype cuDNN does not lay out keeps separate weights, which cuDNN (or
                // the non-cuDNN kernels) still accepts: `flatten_parameters` says why.
                let _ = layer.flatten_parameters();
                layer
            }

            /// Puts the weights in one new CUDA buffer in cuDNN's layout, each weight a view
            /// of it, as PyTorch's `flatten_parameters` does: the weight tensors (and the
            /// `VarStore` variables they are) are re-pointed in place, values unchanged.
            /// [`new`](Self::new) already does this on CUDA; call it again after moving or
            /// replacing the weights. Off CUDA, or without cuDNN, it does nothing.
            ///
            /// Flattening copies: on a layer received from another process it would leave
            /// the sender's memory for a private copy (a received layer whose sender was
            /// flat is flat already).
            ///
            /// ```no_run
            #[doc = concat!("use shared_tensor_runtime::payload::nn::", stringify!($name), ";")]
            /// let mut vs = tch::nn::VarStore::new(tch::Device::Cuda(0));
            #[doc = concat!("let mut layer = ", stringify!($name), "::new(vs.root(), 16, 32, Default::default());")]
            /// vs.half(); // new weights (f16) that are no longer in one buffer
            /// layer.flatten_parameters()?;
            /// # Ok::<(), shared_tensor_runtime::Error>(())
            /// ```
            ///
            /// # Errors
            /// [`Error::Unsupported`] when cuDNN refuses the weights (a dtype it has no
            /// RNN kernels for, shapes that do not match the settings).
            pub fn flatten_parameters(&mut self) -> Result<()> {
                flatten_rnn(&self.weights, $mode, self.hidden_dim, &self.settings)
            }

            fn layer_dim(&self) -> i64 {
                self.settings.num_layers * if self.settings.bidirectional { 2 } else { 1 }
            }
        }

        impl Payload for $name {
            fn encode(&self, enc: &mut Encoder) -> Result<Node> {
                enc.module(|enc| {
                    let weights = self.weights.encode(enc)?;
                    let settings = enc.data(&(self.hidden_dim, self.settings))?;
                    Ok(Node::Map(vec![("weights".into(), weights), ("settings".into(), settings)]))
                })
            }
            fn decode(node: Node, dec: &mut Decoder) -> Result<Self> {
                let mut f = Fields::new(node, dec)?;
                let weights: Vec<Tensor> = f.take(dec, "weights")?;
                let (hidden_dim, settings): (i64, RnnSettings) = f.take_data(dec, "settings")?;
                Ok($name { weights, hidden_dim, settings })
            }
            fn alias(&self) -> Result<Self> {
                Ok($name { weights: self.weights.alias()?, hidden_dim: self.hidden_dim, settings: self.settings })
            }
        }
    };
}

recurrent!(Lstm, 4, CUDNN_LSTM, "A shareable LSTM layer: built like tch's `nn::lstm` and computing its forward.");
recurrent!(Gru, 3, CUDNN_GRU, "A shareable GRU layer: built like tch's `nn::gru` and computing its forward.");

impl RNN for Lstm {
    type State = nn::LSTMState;

    fn zero_state(&self, batch_dim: i64) -> nn::LSTMState {
        let w = &self.weights[0];
        let zeros = Tensor::zeros([self.layer_dim(), batch_dim, self.hidden_dim], (w.kind(), w.device()));
        nn::LSTMState((zeros.shallow_clone(), zeros))
    }

    fn step(&self, input: &Tensor, state: &nn::LSTMState) -> nn::LSTMState {
        self.seq_init(&input.unsqueeze(1), state).1
    }

    fn seq_init(&self, input: &Tensor, state: &nn::LSTMState) -> (Tensor, nn::LSTMState) {
        let nn::LSTMState((h, c)) = state;
        let s = &self.settings;
        let weights: Vec<&Tensor> = self.weights.iter().collect();
        let (output, h, c) = input.lstm(
            &[h, c],
            &weights,
            s.has_biases,
            s.num_layers,
            s.dropout,
            s.train,
            s.bidirectional,
            s.batch_first,
        );
        (output, nn::LSTMState((h, c)))
    }
}

impl RNN for Gru {
    type State = nn::GRUState;

    fn zero_state(&self, batch_dim: i64) -> nn::GRUState {
        let w = &self.weights[0];
        nn::GRUState(Tensor::zeros([self.layer_dim(), batch_dim, self.hidden_dim], (w.kind(), w.device())))
    }

    fn step(&self, input: &Tensor, state: &nn::GRUState) -> nn::GRUState {
        self.seq_init(&input.unsqueeze(1), state).1
    }

    fn seq_init(&self, input: &Tensor, state: &nn::GRUState) -> (Tensor, nn::GRUState) {
        let s = &self.settings;
        let weights: Vec<&Tensor> = self.weights.iter().collect();
        let (output, h) = input.gru(
            &state.0,
            &weights,
            s.has_biases,
            s.num_layers,
            s.dropout,
            s.train,
            s.bidirectional,
            s.batch_first,
        );
        (output, nn::GRUState(h))
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

/// A VarStore holding `named` (full dotted names), the `trainable` ones (with their group)
/// as trainable variables. Walking each dotted name through `Path / part` and `Path::add`,
/// with a linear search of `trainable` per variable, cost about 16 k instructions a
/// variable (callgrind), more than receiving the tensors: now a variable that is not
/// trainable goes straight into the store's table, and a trainable one is added at the
/// root of its group under a placeholder name (tch's `Var` cannot be built outside tch)
/// and renamed in place.
fn build_store(device: Device, named: BTreeMap<String, Tensor>, trainable: &[(String, usize)]) -> nn::VarStore {
    // Cannot clash: a received name is a dotted path, which never starts with a space.
    const PLACEHOLDER: &str = " shared-tensor: being added";
    let vs = nn::VarStore::new(device);
    let groups: HashMap<&str, usize> = trainable.iter().map(|(n, g)| (n.as_str(), *g)).collect();
    let mut roots: Vec<(usize, nn::Path)> = Vec::new();
    let lock = || vs.variables_.lock().unwrap_or_else(|e| e.into_inner());
    lock().named_variables.reserve(named.len());
    for (name, tensor) in named {
        match groups.get(name.as_str()) {
            None => drop(lock().named_variables.insert(name, tensor)),
            Some(&group) => {
                let root = match roots.iter().position(|(g, _)| *g == group) {
                    Some(i) => &roots[i].1,
                    None => {
                        roots.push((group, vs.root().set_group(group)));
                        &roots.last().expect("just pushed").1
                    }
                };
                drop(root.add(PLACEHOLDER, tensor, true));
                let mut vars = lock();
                if let Some(t) = vars.named_variables.remove(PLACEHOLDER) {
                    vars.named_variables.insert(name, t);
                }
            }
        }
    }
    drop(roots);
    vs
}

/// [`build_store`], for the receiving side's CPU micro-benchmarks.
#[cfg(test)]
pub(crate) fn build_store_for_bench(
    device: Device,
    named: BTreeMap<String, Tensor>,
    trainable: &[(String, usize)],
) -> nn::VarStore {
    build_store(device, named, trainable)
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
        let device = named.values().next().map(Tensor::device).unwrap_or(Device::Cpu);
        Ok(build_store(device, named, &trainable))
    }
    fn alias(&self) -> Result<Self> {
        let (named, trainable) = store_parts(self);
        Ok(build_store(self.device(), named, &trainable))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::{Module, ModuleT};
    use tch::Kind;

    #[test]
    fn a_cpu_module_is_refused_with_its_parameter_path() {
        let vs = nn::VarStore::new(Device::Cpu);
        let linear = nn::linear(vs.root(), 4, 2, Default::default());
        let err = Encoder::encode("encoder", &vec![linear]).unwrap_err();
        assert!(err.to_string().starts_with("encoder[0].weight is on Cpu"), "{err}");
        let err = Encoder::encode("store", &vs).unwrap_err();
        assert!(err.to_string().contains("is on Cpu"), "{err}");
    }

    #[test]
    fn an_empty_module_is_refused() {
        let vs = nn::VarStore::new(Device::Cpu);
        let err = Encoder::encode("store", &vs).unwrap_err();
        assert!(err.to_string().contains("at least one CUDA tensor"), "{err}");
    }

    #[test]
    fn var_store_parts_keep_names_and_trainability() {
        let vs = nn::VarStore::new(Device::Cpu);
        let _ = nn::linear(vs.root() / "l1", 3, 2, Default::default());
        let _frozen = vs.root().zeros_no_train("stats", &[2]);
        let (named, trainable) = store_parts(&vs);
        assert_eq!(named.keys().cloned().collect::<Vec<_>>(), vec!["l1.bias", "l1.weight", "stats"]);
        let mut names: Vec<&str> = trainable.iter().map(|(n, _)| n.as_str()).collect();
        names.sort();
        assert_eq!(names, vec!["l1.bias", "l1.weight"]);
        let rebuilt = build_store(Device::Cpu, named, &trainable);
        assert_eq!(rebuilt.len(), 3);
        assert_eq!(rebuilt.trainable_variables().len(), 2);
        let original = vs.variables();
        for (name, t) in rebuilt.variables() {
            assert_eq!(t.data_ptr(), original[&name].data_ptr(), "{name} is the same memory");
        }
    }

    /// The forward-relevant configuration (initialisers are not sent: a rebuilt module
    /// gets the shared tensors, not new ones).
    fn spec_of<M: std::fmt::Debug, S>(m: &M, read: impl FnOnce(&Dbg) -> std::result::Result<S, String>) -> S {
        spec(m, &|| "m".into(), read).unwrap()
    }

    /// Rebuilding every module from its configuration and its (CPU, here) tensors gives
    /// the same configuration and the same forward, over the same memory.
    #[test]
    fn every_module_is_rebuilt_with_its_configuration() {
        tch::manual_seed(3);
        let vs = nn::VarStore::new(Device::Cpu);
        let root = vs.root();
        let conv_config = nn::ConvConfigND::<[i64; 2]> {
            stride: [1, 2],
            padding: [2, 1],
            dilation: [1, 2],
            groups: 2,
            bias: true,
            ws_init: nn::init::DEFAULT_KAIMING_UNIFORM,
            bs_init: nn::Init::Const(0.5),
            padding_mode: nn::PaddingMode::Reflect,
        };
        let conv = nn::conv(&root / "conv", 4, 6, [3, 3], conv_config);
        let copy = conv.alias().unwrap();
        assert_eq!(spec_of(&conv, conv_spec), spec_of(&copy, conv_spec));
        assert_eq!(conv.ws.data_ptr(), copy.ws.data_ptr());
        let x = Tensor::randn([1, 4, 9, 9], (Kind::Float, Device::Cpu));
        assert!(conv.forward(&x).equal(&copy.forward(&x)));

        let c1 = nn::conv1d(&root / "c1", 3, 5, 3, nn::ConvConfig { stride: 2, ..Default::default() });
        assert_eq!(spec_of(&c1, conv_spec), spec_of(&c1.alias().unwrap(), conv_spec));
        let c3 = nn::conv3d(&root / "c3", 2, 2, 2, nn::ConvConfig { bias: false, ..Default::default() });
        assert_eq!(spec_of(&c3, conv_spec), spec_of(&c3.alias().unwrap(), conv_spec));
        assert!(c3.alias().unwrap().bs.is_none());

        let tconfig =
            nn::ConvTransposeConfig { stride: 2, padding: 1, output_padding: 1, groups: 1, ..Default::default() };
        let t2 = nn::conv_transpose2d(&root / "t2", 3, 4, 3, tconfig);
        let t2c = t2.alias().unwrap();
        assert_eq!(spec_of(&t2, conv_transpose_spec), spec_of(&t2c, conv_transpose_spec));
        let y = Tensor::randn([1, 3, 5, 5], (Kind::Float, Device::Cpu));
        assert!(t2.forward(&y).equal(&t2c.forward(&y)));
        let t1 = nn::conv_transpose1d(&root / "t1", 3, 4, 3, Default::default());
        assert_eq!(spec_of(&t1, conv_transpose_spec), spec_of(&t1.alias().unwrap(), conv_transpose_spec));
        let t3 = nn::conv_transpose3d(&root / "t3", 2, 2, 2, Default::default());
        assert_eq!(spec_of(&t3, conv_transpose_spec), spec_of(&t3.alias().unwrap(), conv_transpose_spec));

        let emb = nn::embedding(
            &root / "emb",
            10,
            4,
            nn::EmbeddingConfig { padding_idx: 3, scale_grad_by_freq: true, ..Default::default() },
        );
        assert_eq!(spec_of(&emb, embedding_spec), spec_of(&emb.alias().unwrap(), embedding_spec));
        assert_eq!(spec_of(&emb, embedding_spec).padding_idx, 3);
        let ids = Tensor::from_slice(&[0i64, 3, 9]);
        assert!(emb.forward(&ids).equal(&emb.alias().unwrap().forward(&ids)));

        let ln = nn::layer_norm(&root / "ln", vec![4], nn::LayerNormConfig { eps: 1e-3, ..Default::default() });
        assert_eq!(
            spec_of(&ln, norm_spec("elementwise_affine")),
            spec_of(&ln.alias().unwrap(), norm_spec("elementwise_affine"))
        );
        assert_eq!(spec_of(&ln, norm_spec("elementwise_affine")).eps, 1e-3);
        let z = Tensor::randn([3, 4], (Kind::Float, Device::Cpu));
        assert!(ln.forward(&z).equal(&ln.alias().unwrap().forward(&z)));
        assert_eq!(ln.alias().unwrap().normalized_shape, vec![4]);
        let ln_plain = nn::layer_norm(
            &root / "ln2",
            vec![4],
            nn::LayerNormConfig { elementwise_affine: false, ..Default::default() },
        );
        assert!(!spec_of(&ln_plain.alias().unwrap(), norm_spec("elementwise_affine")).affine);

        let bn =
            nn::batch_norm2d(&root / "bn", 4, nn::BatchNormConfig { momentum: 0.3, eps: 1e-4, ..Default::default() });
        let bnc = bn.alias().unwrap();
        assert_eq!(spec_of(&bn, norm_spec("affine")), spec_of(&bnc, norm_spec("affine")));
        assert_eq!(spec_of(&bn, norm_spec("affine")).momentum, 0.3);
        assert_eq!((bnc.nd, bnc.running_var.data_ptr()), (bn.nd, bn.running_var.data_ptr()));
        let _ = bn.forward_t(&x, true); // running statistics that are not the defaults
        assert!(bn.forward_t(&x, false).equal(&bnc.forward_t(&x, false)));

        let gn = nn::group_norm(&root / "gn", 2, 4, nn::GroupNormConfig { eps: 1e-2, ..Default::default() });
        assert_eq!(spec_of(&gn, norm_spec("affine")), spec_of(&gn.alias().unwrap(), norm_spec("affine")));
        let gnc = gn.alias().unwrap();
        assert_eq!((gnc.num_groups, gnc.num_channels), (2, 4));
        assert!(gn.forward(&x).equal(&gnc.forward(&x)));
    }

    /// A CPU weight of `shape` that holds one real element (expanded): far more than any
    /// host could allocate, so a rebuild that allocated anything proportional to the
    /// weights would fail.
    fn enormous(shape: &[i64]) -> Tensor {
        Tensor::zeros([1], (Kind::Float, Device::Cpu)).expand(shape, false)
    }

    /// Receiving (decode) and local cache hits (alias) rebuild modules through these
    /// functions: none may allocate memory proportional to the weights.
    #[test]
    fn rebuilding_a_module_allocates_nothing_proportional_to_its_weights() {
        // 2^52 f32 = 16 PiB, beyond any host's address space (2^47 bytes for a process).
        let rows = 1i64 << 50;
        let es = EmbeddingSpec { sparse: false, scale_grad_by_freq: true, padding_idx: 7 };
        let emb = rebuild_embedding(enormous(&[rows, 4]), &es).unwrap().alias().unwrap();
        assert_eq!((emb.ws.size(), spec_of(&emb, embedding_spec)), (vec![rows, 4], es));
        let ids = Tensor::from_slice(&[0i64, rows - 1]);
        assert_eq!(emb.forward(&ids).size(), vec![2, 4]);

        let cs = ConvSpec {
            stride: vec![2, 1],
            padding: vec![1, 0],
            dilation: vec![1, 2],
            groups: 4,
            padding_mode: "Circular".into(),
        };
        let big = [1i64 << 24, 1 << 22, 3, 5]; // 2^48 × 15 elements
        let conv = rebuild_conv::<2>(enormous(&big), Some(enormous(&[big[0]])), &cs).unwrap().alias().unwrap();
        assert_eq!((conv.ws.size(), spec_of(&conv, conv_spec)), (big.to_vec(), cs.clone()));
        let c3 = rebuild_conv::<3>(
            enormous(&[1 << 24, 1 << 24, 3, 3, 3]),
            None,
            &ConvSpec {
                stride: vec![1; 3],
                padding: vec![0; 3],
                dilation: vec![1; 3],
                groups: 1,
                padding_mode: "Zeros".into(),
            },
        );
        assert!(c3.unwrap().alias().unwrap().bs.is_none());

        let ts = ConvTransposeSpec { stride: 2, padding: 1, output_padding: 1, dilation: 1, groups: 2 };
        let t2 = nn::ConvTranspose2D::rebuild(enormous(&big), Some(enormous(&[big[1] * 2])), &ts).unwrap();
        assert_eq!((t2.alias().unwrap().ws.size(), spec_of(&t2, conv_transpose_spec)), (big.to_vec(), ts));

        let norm = NormSpec { cudnn_enabled: true, eps: 1e-3, momentum: 0.2, affine: true };
        let wide = || Some(enormous(&[rows]));
        let ln = rebuild_layer_norm(wide(), wide(), vec![rows], &norm).alias().unwrap();
        assert_eq!(
            (ln.normalized_shape.clone(), spec_of(&ln, norm_spec("elementwise_affine")).eps),
            (vec![rows], 1e-3)
        );
        let parts = BatchNormParts {
            running_mean: enormous(&[rows]),
            running_var: enormous(&[rows]),
            ws: wide(),
            bs: wide(),
            nd: 2,
        };
        let bn = rebuild_batch_norm(parts, &norm).unwrap().alias().unwrap();
        assert_eq!((bn.running_var.size(), spec_of(&bn, norm_spec("affine"))), (vec![rows], norm.clone()));
        let gn = rebuild_group_norm(wide(), wide(), 1 << 20, rows, &norm).alias().unwrap();
        assert_eq!((gn.num_groups, gn.num_channels), (1 << 20, rows));
    }

    #[test]
    fn shareable_recurrent_layers_match_tch() {
        tch::manual_seed(5);
        let config = nn::RNNConfig { num_layers: 2, bidirectional: true, ..Default::default() };
        let a = nn::VarStore::new(Device::Cpu);
        let mut b = nn::VarStore::new(Device::Cpu);
        let mut ours = Lstm::new(a.root(), 3, 5, config);
        let ptrs: Vec<usize> = ours.weights.iter().map(|w| w.data_ptr() as usize).collect();
        ours.flatten_parameters().unwrap();
        assert!(ours.weights.iter().map(|w| w.data_ptr() as usize).eq(ptrs), "on the CPU: nothing moves");
        let theirs = nn::lstm(b.root(), 3, 5, config);
        // Same variables, names and shapes as tch's: copy ours into theirs and compare.
        let mut names: Vec<String> = a.variables().keys().cloned().collect();
        let mut tch_names: Vec<String> = b.variables().keys().cloned().collect();
        names.sort();
        tch_names.sort();
        assert_eq!(names, tch_names);
        b.copy(&a).unwrap();
        let x = Tensor::randn([2, 7, 3], (Kind::Float, Device::Cpu));
        let (ours_out, _) = ours.seq(&x);
        let (theirs_out, _) = theirs.seq(&x);
        assert!(ours_out.equal(&theirs_out), "the same forward as tch's LSTM");

        let c = nn::VarStore::new(Device::Cpu);
        let mut d = nn::VarStore::new(Device::Cpu);
        let gru = Gru::new(c.root(), 3, 4, Default::default());
        let tch_gru = nn::gru(d.root(), 3, 4, Default::default());
        d.copy(&c).unwrap();
        assert!(gru.seq(&x).0.equal(&tch_gru.seq(&x).0), "the same forward as tch's GRU");
    }
}
