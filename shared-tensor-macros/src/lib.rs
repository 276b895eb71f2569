//! Procedural macros of [shared-tensor](https://docs.rs/shared-tensor). Use them through the
//! `shared_tensor` crate, which re-exports them with their documentation.

#![forbid(unsafe_code)]

use proc_macro::TokenStream;

mod errors;
mod payload_derive;
mod share;

/// Turns a function into a shared-tensor endpoint. See `shared_tensor::share` for the
/// full documentation.
#[proc_macro_attribute]
pub fn share(args: TokenStream, item: TokenStream) -> TokenStream {
    share::share(args.into(), item.into()).into()
}

/// Makes a struct or enum a payload. See `shared_tensor::Payload` for the full
/// documentation.
#[proc_macro_derive(Payload, attributes(payload))]
pub fn derive_payload(input: TokenStream) -> TokenStream {
    payload_derive::derive(input.into()).into()
}
