//! Procedural macros of shared-tensor. The `#[share]` endpoint attribute is built on the
//! runtime's IPC codec and lands with the endpoint layer.
