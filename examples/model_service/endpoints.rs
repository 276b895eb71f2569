//! The model service's endpoints: compiled into the server binary only. The client
//! calls them by name (manual mode) and does not link them.

use shared_tensor::share;
use tch::nn;

/// Scenarios 2 and 3 of the seed: slow model construction, one at a time, and a
/// reusable registry of models keyed by name and dtype. `keep`: a model stays in the
/// registry when its last client lets go (clients come and go; it is built once), until
/// `load_model::invalidate(..)` or `invalidate_cache_key` drops it.
#[share(execution = "task", managed, keep, concurrency = "serialized", cache_key = "model:{model_name}:{dtype}")]
pub fn load_model(model_name: String, dtype: String) -> Result<nn::Linear, String> {
    let kind = match dtype.as_str() {
        "f32" => tch::Kind::Float,
        "f16" => tch::Kind::Half,
        "bf16" => tch::Kind::BFloat16,
        other => return Err(format!("dtype {other:?} is not served: ask for \"f32\", \"f16\" or \"bf16\"")),
    };
    let width = if model_name == "large" { 4096 } else { 256 };
    let mut vs = nn::VarStore::new(tch::Device::Cuda(0));
    let layer = nn::linear(vs.root(), width, width, Default::default());
    vs.set_kind(kind);
    Ok(layer)
}
