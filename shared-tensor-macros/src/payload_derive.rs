//! `#[derive(Payload)]`: parse the type and its attributes, then generate
//! `encode`, `decode` and `alias` field by field.
//!
//! - a field of a concrete type travels as a payload if it is one (tensors, modules,
//!   containers of them) and as MessagePack otherwise (numbers, strings, serde types);
//! - a field whose type mentions a type parameter is a payload, or MessagePack with
//!   `#[payload(data)]` (the derive adds the matching bounds);
//! - `#[payload(skip)]` fields are not sent and are rebuilt with `Default`;
//! - the value is checked as a module (at least one CUDA tensor, one GPU) unless the
//!   type has `#[payload(container)]`;
//! - `#[payload(crate = "my_sdk::shared_tensor")]` names the runtime for a crate that
//!   re-exports shared-tensor (default `::shared_tensor`).

use proc_macro2::TokenStream;
use quote::{format_ident, quote};
use syn::visit::Visit;
use syn::{Data, DeriveInput, Field, Fields, Ident, Type};

use crate::errors::Errors;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Concrete type: IPC or MessagePack, decided by the `Argument` trait.
    Auto,
    /// Generic payload field.
    Payload,
    /// Generic MessagePack field.
    Data,
    /// Not sent; `Default` on the other side.
    Skip,
}

struct FieldSpec {
    /// The field's name in paths and on the wire (`weight`, or `0` for tuple fields).
    name: String,
    /// How to reach it: `weight` or `0`.
    member: syn::Member,
    ty: Type,
    mode: Mode,
}

/// Whether a type mentions one of the generic parameters.
fn mentions(ty: &Type, params: &[Ident]) -> bool {
    struct Finder<'a> {
        params: &'a [Ident],
        found: bool,
    }
    impl<'ast> Visit<'ast> for Finder<'_> {
        fn visit_path(&mut self, p: &'ast syn::Path) {
            if let Some(first) = p.segments.first() {
                if self.params.contains(&first.ident) {
                    self.found = true;
                }
            }
            syn::visit::visit_path(self, p);
        }
    }
    let mut f = Finder { params, found: false };
    f.visit_type(ty);
    f.found
}

fn field_mode(field: &Field, params: &[Ident], errors: &mut Errors) -> Mode {
    let mut mode = None;
    for attr in field.attrs.iter().filter(|a| a.path().is_ident("payload")) {
        let result = attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("skip") {
                mode = Some(Mode::Skip);
                Ok(())
            } else if meta.path.is_ident("data") {
                mode = Some(Mode::Data);
                Ok(())
            } else {
                Err(meta.error("unknown field option; expected `skip` or `data`"))
            }
        });
        if let Err(e) = result {
            errors.add(e);
        }
    }
    match mode {
        Some(m) => m,
        None if mentions(&field.ty, params) => Mode::Payload,
        None => Mode::Auto,
    }
}

fn field_specs(fields: &Fields, params: &[Ident], errors: &mut Errors) -> Vec<FieldSpec> {
    fields
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let (name, member) = match &f.ident {
                Some(id) => (id.to_string(), syn::Member::Named(id.clone())),
                None => (i.to_string(), syn::Member::Unnamed(i.into())),
            };
            FieldSpec { name, member, ty: f.ty.clone(), mode: field_mode(f, params, errors) }
        })
        .collect()
}

/// `(name, node)` for one field of a value bound as `value` (a reference).
fn encode_field(f: &FieldSpec, value: TokenStream) -> Option<TokenStream> {
    let name = &f.name;
    let call = match f.mode {
        Mode::Skip => return None,
        Mode::Auto => quote!(__shared_tensor::__private::encode_arg(__enc, #name, #value)?),
        Mode::Payload => {
            quote!(__enc.field(#name, |__enc| __shared_tensor::Payload::encode(#value, __enc))?)
        }
        Mode::Data => quote!(__enc.field(#name, |__enc| __enc.data(#value))?),
    };
    Some(quote!((::std::string::String::from(#name), #call)))
}

/// The expression decoding one field from `__fields`.
fn decode_field(f: &FieldSpec) -> TokenStream {
    let name = &f.name;
    match f.mode {
        Mode::Skip => quote!(::core::default::Default::default()),
        Mode::Auto => quote!(__fields.take_arg(__dec, #name)?),
        Mode::Payload => quote!(__fields.take(__dec, #name)?),
        Mode::Data => quote!(__fields.take_data(__dec, #name)?),
    }
}

/// The expression aliasing one field bound as `value` (a reference).
fn alias_field(f: &FieldSpec, value: TokenStream) -> TokenStream {
    match f.mode {
        Mode::Skip => quote!(::core::default::Default::default()),
        Mode::Auto => quote!(__shared_tensor::__private::owned_arg(#value)?),
        Mode::Payload => quote!(__shared_tensor::Payload::alias(#value)?),
        Mode::Data => quote!(::core::clone::Clone::clone(#value)),
    }
}

/// Bindings `__f0, __f1, ..` for the fields of a variant or struct pattern (`_` for
/// skipped fields, which are never read).
fn bindings(fields: &[FieldSpec]) -> Vec<TokenStream> {
    fields
        .iter()
        .enumerate()
        .map(|(i, f)| {
            if f.mode == Mode::Skip {
                quote!(_)
            } else {
                let id = format_ident!("__f{}", i);
                quote!(#id)
            }
        })
        .collect()
}

fn pattern(path: TokenStream, fields: &Fields, specs: &[FieldSpec]) -> TokenStream {
    let binds = bindings(specs);
    match fields {
        Fields::Named(_) => {
            let members = specs.iter().map(|f| &f.member);
            quote!(#path { #(#members: #binds),* })
        }
        Fields::Unnamed(_) => quote!(#path(#(#binds),*)),
        Fields::Unit => quote!(#path),
    }
}

fn construct(path: TokenStream, fields: &Fields, specs: &[FieldSpec], values: Vec<TokenStream>) -> TokenStream {
    match fields {
        Fields::Named(_) => {
            let members = specs.iter().map(|f| &f.member);
            quote!(#path { #(#members: #values),* })
        }
        Fields::Unnamed(_) => quote!(#path(#(#values),*)),
        Fields::Unit => quote!(#path),
    }
}

/// Encode, decode and alias of one struct or variant whose fields are bound as `__fN`.
struct Shape {
    encode: TokenStream,
    decode: TokenStream,
    alias: TokenStream,
}

fn shape(path: TokenStream, fields: &Fields, specs: &[FieldSpec]) -> Shape {
    let binds = bindings(specs);
    let entries: Vec<TokenStream> = specs.iter().zip(&binds).filter_map(|(f, b)| encode_field(f, quote!(#b))).collect();
    let encode = match fields {
        Fields::Unit => quote!(__shared_tensor::payload::Node::Unit),
        _ => quote!(__shared_tensor::payload::Node::Map(::std::vec![#(#entries),*])),
    };
    let decode_values = specs.iter().map(decode_field).collect();
    let construct_decoded = construct(path.clone(), fields, specs, decode_values);
    let decode = match fields {
        Fields::Unit => quote!(#construct_decoded),
        _ => quote!({
            let mut __fields = __shared_tensor::payload::nn::Fields::new(__node, __dec)?;
            #construct_decoded
        }),
    };
    let alias_values = specs.iter().zip(&binds).map(|(f, b)| alias_field(f, quote!(#b))).collect();
    let alias = construct(path, fields, specs, alias_values);
    Shape { encode, decode, alias }
}

pub fn derive(input: TokenStream) -> TokenStream {
    let input: DeriveInput = match syn::parse2(input) {
        Ok(i) => i,
        Err(e) => return e.to_compile_error(),
    };
    let mut errors = Errors::default();
    let mut container = false;
    let mut krate: syn::Path = syn::parse_quote!(::shared_tensor);
    for attr in input.attrs.iter().filter(|a| a.path().is_ident("payload")) {
        let result = attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("container") {
                container = true;
                Ok(())
            } else if meta.path.is_ident("crate") {
                let s: syn::LitStr = meta.value()?.parse()?;
                krate = s.parse().map_err(|_| {
                    syn::Error::new(
                        s.span(),
                        format!("`crate` expects a path such as \"my_sdk::shared_tensor\"; {:?} is not one", s.value()),
                    )
                })?;
                Ok(())
            } else {
                Err(meta.error("unknown type option; expected `container` or `crate = \"...\"`"))
            }
        });
        if let Err(e) = result {
            errors.add(e);
        }
    }
    if let Some(lt) = input.generics.lifetimes().next() {
        errors.push(lt, "a payload cannot borrow: it must own its data (`'static`), since it crosses processes");
    }
    let params: Vec<Ident> = input.generics.type_params().map(|p| p.ident.clone()).collect();
    let name = &input.ident;
    let name_str = name.to_string();

    let mut bounds: Vec<TokenStream> = params.iter().map(|p| quote!(#p: ::core::marker::Send + 'static)).collect();
    let mut add_bounds = |specs: &[FieldSpec]| {
        for f in specs {
            if !mentions(&f.ty, &params) {
                continue;
            }
            let ty = &f.ty;
            bounds.push(match f.mode {
                Mode::Payload | Mode::Auto => quote!(#ty: __shared_tensor::Payload),
                Mode::Data => quote!(#ty: __shared_tensor::__private::serde::Serialize
                    + __shared_tensor::__private::serde::de::DeserializeOwned
                    + ::core::clone::Clone),
                Mode::Skip => quote!(#ty: ::core::default::Default),
            });
        }
    };

    let (encode_body, decode_body, alias_body) = match &input.data {
        Data::Struct(s) => {
            let specs = field_specs(&s.fields, &params, &mut errors);
            add_bounds(&specs);
            let pat = pattern(quote!(#name), &s.fields, &specs);
            let sh = shape(quote!(#name), &s.fields, &specs);
            let (encode, decode, alias) = (sh.encode, sh.decode, sh.alias);
            (
                quote!({ let #pat = self; #encode }),
                quote!(::core::result::Result::Ok(#decode)),
                quote!({ let #pat = self; ::core::result::Result::Ok(#alias) }),
            )
        }
        Data::Enum(e) => {
            let mut encode_arms = Vec::new();
            let mut decode_arms = Vec::new();
            let mut alias_arms = Vec::new();
            for v in &e.variants {
                let vname = &v.ident;
                let vstr = vname.to_string();
                let specs = field_specs(&v.fields, &params, &mut errors);
                add_bounds(&specs);
                let pat = pattern(quote!(#name::#vname), &v.fields, &specs);
                let sh = shape(quote!(#name::#vname), &v.fields, &specs);
                let (encode, decode, alias) = (sh.encode, sh.decode, sh.alias);
                encode_arms.push(quote!(#pat => __enc.field(#vstr, |__enc| ::core::result::Result::Ok::<_, __shared_tensor::Error>(
                    __shared_tensor::payload::Node::Variant(::std::string::String::from(#vstr), ::std::boxed::Box::new(#encode))
                ))?));
                decode_arms.push(quote!(#vstr => __dec.field(#vstr, |__dec| {
                    let __node = *__inner;
                    ::core::result::Result::Ok::<_, __shared_tensor::Error>(#decode)
                })?));
                alias_arms.push(quote!(#pat => #alias));
            }
            (
                quote!(match self { #(#encode_arms,)* }),
                quote!(match __node {
                    __shared_tensor::payload::Node::Variant(__variant, __inner) => ::core::result::Result::Ok(match __variant.as_str() {
                        #(#decode_arms,)*
                        __other => return ::core::result::Result::Err(__shared_tensor::Error::Protocol(::std::format!(
                            "{}: {} has no variant {:?}", __dec.path(), #name_str, __other
                        ))),
                    }),
                    __other => ::core::result::Result::Err(__dec.mismatch("an enum variant", &__other)),
                }),
                quote!(::core::result::Result::Ok(match self { #(#alias_arms,)* })),
            )
        }
        Data::Union(u) => {
            errors.push(u.union_token, "#[derive(Payload)] works on structs and enums, not unions");
            (quote!(unreachable!()), quote!(unreachable!()), quote!(unreachable!()))
        }
    };
    if let Err(e) = errors.finish() {
        return e.to_compile_error();
    }
    let encode = if container {
        quote!(::core::result::Result::Ok(#encode_body))
    } else {
        quote!(__enc.module(|__enc| ::core::result::Result::Ok(#encode_body)))
    };
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();
    let mut where_preds: Vec<TokenStream> =
        where_clause.map(|w| w.predicates.iter().map(|p| quote!(#p)).collect()).unwrap_or_default();
    where_preds.extend(bounds);
    // Everything generated names the runtime through `__shared_tensor`, the `crate` path.
    quote! {
        const _: () = {
        use #krate as __shared_tensor;
        #[allow(unused_variables, clippy::needless_update)]
        impl #impl_generics __shared_tensor::Payload for #name #ty_generics where #(#where_preds),* {
            fn encode(&self, __enc: &mut __shared_tensor::payload::Encoder) -> __shared_tensor::Result<__shared_tensor::payload::Node> {
                #encode
            }
            fn decode(__node: __shared_tensor::payload::Node, __dec: &mut __shared_tensor::payload::Decoder) -> __shared_tensor::Result<Self> {
                #decode_body
            }
            fn alias(&self) -> __shared_tensor::Result<Self> {
                #alias_body
            }
        }
        };
    }
}
