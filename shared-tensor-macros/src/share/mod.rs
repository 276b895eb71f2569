//! `#[share(...)]`: parse the options and the function, check them, generate.

mod expand;
mod key;
mod options;
mod signature;

use proc_macro2::TokenStream;
use syn::punctuated::Punctuated;
use syn::{ItemFn, Meta, Token};

use crate::errors::{self, Errors};

pub fn share(args: TokenStream, item: TokenStream) -> TokenStream {
    let parsed_args = syn::parse::Parser::parse2(Punctuated::<Meta, Token![,]>::parse_terminated, args);
    let function: ItemFn = match syn::parse2(item.clone()) {
        Ok(f) => f,
        Err(_) => {
            let e =
                syn::Error::new_spanned(&item, "#[share] goes on a free function: `fn name(params) -> Result { .. }`");
            return errors::with_item(item, e);
        }
    };
    let mut errors = Errors::default();
    let args = match parsed_args {
        Ok(a) => a,
        Err(e) => {
            errors.add(e);
            Punctuated::new()
        }
    };
    let opts = options::parse(args, &mut errors);
    let sig = signature::parse(&function, &mut errors);
    let key = opts.cache_key.as_ref().map(|t| key::key_expr(t, &sig.params, &sig.name.to_string(), &mut errors));
    if let Err(e) = errors.finish() {
        return errors::with_item(item, e);
    }
    expand::Generator { item: &function, opts: &opts, sig: &sig, key }.generate()
}
