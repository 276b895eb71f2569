//! Procedural macros of [shared-tensor](https://docs.rs/shared-tensor). Use them through the
//! `shared_tensor` crate, which re-exports them with their documentation.

use proc_macro::TokenStream;

mod errors;
mod share;

/// Turns a function into a shared-tensor endpoint. See `shared_tensor::share` for the
/// full documentation.
#[proc_macro_attribute]
pub fn share(args: TokenStream, item: TokenStream) -> TokenStream {
    share::share(args.into(), item.into()).into()
}
