//! Examples of shared-tensor.
