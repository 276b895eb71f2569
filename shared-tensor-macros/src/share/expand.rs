//! Code generation for `#[share]`: one generator, one method per emitted item.
//!
//! For `fn NAME(params) -> R` it emits:
//! - `fn NAME(params) -> shared_tensor::Result<Out>`: the stub, the same line in every role
//!   (`Out` is `R`, or `Managed<R>` for a managed endpoint): one call with
//! - `struct __shared_tensor_args_NAME { params }`, hidden, implementing
//!   `__private::CallArgs` (the key, the encoding, the body now or later);
//! - `mod NAME { submit, call_async, invalidate, endpoint }`: the companions, each one
//!   call with the same arguments struct;
//! - a hidden body function holding the original body;
//! - a hidden endpoint definition registered through `inventory`, with a dispatch
//!   function that decodes a client's arguments.
//!
//! Everything refers to the runtime through `::shared_tensor::__private`.

use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{Attribute, Ident, ItemFn, LitStr};

use super::options::{Concurrency, Execution, Options};
use super::signature::{Param, Signature};

pub struct Generator<'a> {
    pub item: &'a ItemFn,
    pub opts: &'a Options,
    pub sig: &'a Signature,
    /// `format!(...)` computing the key from bindings named like the parameters, if the
    /// endpoint has an explicit `cache_key`.
    pub key: Option<TokenStream>,
}

impl Generator<'_> {
    fn endpoint_name(&self) -> String {
        self.opts.name.as_ref().map(LitStr::value).unwrap_or_else(|| self.sig.name.to_string())
    }

    fn static_ident(&self) -> Ident {
        format_ident!("__SHARED_TENSOR_ENDPOINT_{}", self.sig.name)
    }

    fn body_ident(&self) -> Ident {
        format_ident!("__shared_tensor_body_{}", self.sig.name)
    }

    fn dispatch_ident(&self) -> Ident {
        format_ident!("__shared_tensor_dispatch_{}", self.sig.name)
    }

    fn names(&self) -> Vec<&Ident> {
        self.sig.params.iter().map(|p| &p.name).collect()
    }

    /// `Out`: what the stub returns inside `Result`.
    fn out_ty(&self) -> TokenStream {
        let krate = &self.opts.krate;
        let value = &self.sig.value_ty;
        if self.opts.managed {
            quote!(#krate::Managed<#value>)
        } else {
            quote!(#value)
        }
    }

    fn key_fn_ident(&self) -> Ident {
        format_ident!("__shared_tensor_key_{}", self.sig.name)
    }

    /// The parameters the key is made of: those the `cache_key` template names, else all.
    fn key_params(&self) -> Vec<&Param> {
        match &self.opts.cache_key {
            Some(t) => {
                let names = super::key::parse_template(&t.value()).map(|k| k.names).unwrap_or_default();
                self.sig.params.iter().filter(|p| names.contains(&p.name.to_string())).collect()
            }
            None => self.sig.params.iter().collect(),
        }
    }

    /// `fn __shared_tensor_key_NAME(key params by reference) -> Result<String>`: the one
    /// place keys are computed. Every key parameter must be a `KeyPart` (errors point at
    /// its type): tensors and modules cannot key a call.
    fn key_fn(&self) -> TokenStream {
        let krate = &self.opts.krate;
        if !self.opts.keyed() {
            return TokenStream::new();
        }
        let ident = self.key_fn_ident();
        let params = self.key_params();
        let decls = params.iter().map(|p| {
            let (n, t) = (&p.name, &p.owned_ty);
            quote!(#n: &#t)
        });
        let body = match &self.key {
            Some(template) => {
                let checks = params.iter().map(|p| {
                    let n = &p.name;
                    quote_spanned! {p.ty.span()=> #krate::__private::assert_key_part(#n); }
                });
                quote! {
                    #(#checks)*
                    ::core::result::Result::Ok(#template)
                }
            }
            None => {
                let name = self.endpoint_name();
                let parts = params.iter().map(|p| {
                    let n = &p.name;
                    quote_spanned! {p.ty.span()=> __key.part(#n); }
                });
                quote! {
                    let mut __key = #krate::__private::CallKey::new(#name);
                    #(#parts)*
                    __key.finish()
                }
            }
        };
        let inherited = self.inherited();
        quote! {
            #inherited
            #[doc(hidden)]
            #[allow(clippy::ptr_arg, clippy::trivially_copy_pass_by_ref)]
            fn #ident(#(#decls),*) -> #krate::Result<::std::string::String> {
                #body
            }
        }
    }

    /// `Option<String>` (with `?` on failure): the key from bindings named like the
    /// parameters, references to the arguments if `refs`, else the arguments themselves.
    fn key_value(&self, refs: bool, path: TokenStream) -> TokenStream {
        if !self.opts.keyed() {
            return quote!(::core::option::Option::None);
        }
        let ident = self.key_fn_ident();
        let args = self.key_params().into_iter().map(|p| {
            let n = &p.name;
            if refs {
                quote!(#n)
            } else {
                quote!(&#n)
            }
        });
        quote!(::core::option::Option::Some(#path #ident(#(#args),*)?))
    }

    /// The body called with `args`, as a `shared_tensor::Result<value>`.
    fn call_body(&self, args: &[TokenStream], body_path: TokenStream) -> TokenStream {
        let krate = &self.opts.krate;
        let call = quote!(#body_path(#(#args),*));
        if self.sig.fallible {
            let name = self.endpoint_name();
            quote!(#krate::__private::body_result(#name, #call))
        } else {
            quote!(::core::result::Result::Ok(#call))
        }
    }

    fn args_ident(&self) -> Ident {
        format_ident!("__shared_tensor_args_{}", self.sig.name)
    }

    /// The call's arguments as a hidden struct implementing `__private::CallArgs` (its
    /// key, its encoding, the body run now or later): the stub and the companions are each
    /// one call with it. Borrowed parameters make it borrow (`'__st`).
    fn args_struct(&self) -> TokenStream {
        let krate = &self.opts.krate;
        let ident = self.args_ident();
        let params = &self.sig.params;
        let lifetime = params.iter().any(|p| p.by_ref).then(|| quote!(<'__st>));
        let fields = params.iter().map(|p| {
            let (n, t) = (&p.name, &p.owned_ty);
            if p.by_ref {
                quote!(#n: &'__st #t)
            } else {
                quote!(#n: #t)
            }
        });
        let names = self.names();
        let value_ty = &self.sig.value_ty;
        let static_ident = self.static_ident();
        let body_ident = self.body_ident();
        let key = self.key_value(true, quote!());
        // Bound by reference (`&self`): a borrowed parameter is `&&T` here.
        let encode = params.iter().map(|p| {
            let name = &p.name;
            let name_str = name.to_string();
            let value = if p.by_ref { quote!(*#name) } else { quote!(#name) };
            quote!(#krate::__private::encode_arg(__enc, #name_str, #value)?)
        });
        let run_args: Vec<TokenStream> = names.iter().map(|n| quote!(#n)).collect();
        let run = self.call_body(&run_args, quote!(#body_ident));
        let owned = params.iter().filter(|p| p.by_ref).map(|p| {
            let name = &p.name;
            quote!(let #name = #krate::__private::owned_arg(#name)?;)
        });
        let later_args: Vec<TokenStream> = params
            .iter()
            .map(|p| {
                let name = &p.name;
                if p.by_ref {
                    quote!(&#name)
                } else {
                    quote!(#name)
                }
            })
            .collect();
        let later = self.call_body(&later_args, quote!(#body_ident));
        let inherited = self.inherited();
        quote! {
            #[doc(hidden)]
            #inherited
            #[allow(non_camel_case_types)]
            struct #ident #lifetime { #(#fields,)* }

            #inherited
            #[allow(unused_variables, clippy::needless_pass_by_value)]
            impl #lifetime #krate::__private::CallArgs for #ident #lifetime {
                type Value = #value_ty;
                fn def(&self) -> &'static #krate::__private::EndpointDef {
                    &#static_ident
                }
                fn key(&self) -> #krate::Result<::core::option::Option<::std::string::String>> {
                    let Self { #(#names),* } = self;
                    ::core::result::Result::Ok(#key)
                }
                fn encode(
                    &self,
                    __enc: &mut #krate::__private::Encoder,
                ) -> #krate::Result<::std::vec::Vec<#krate::__private::Node>> {
                    let Self { #(#names),* } = self;
                    ::core::result::Result::Ok(::std::vec![#(#encode),*])
                }
                fn run(self) -> #krate::Result<#value_ty> {
                    let Self { #(#names),* } = self;
                    #run
                }
                fn detach(
                    self,
                ) -> #krate::Result<
                    ::std::boxed::Box<dyn ::core::ops::FnOnce() -> #krate::Result<#value_ty> + ::core::marker::Send>,
                > {
                    let Self { #(#names),* } = self;
                    #(#owned)*
                    ::core::result::Result::Ok(::std::boxed::Box::new(move || #later))
                }
            }
        }
    }

    fn lint_attrs(attrs: &[Attribute]) -> Vec<&Attribute> {
        attrs
            .iter()
            .filter(|a| ["allow", "warn", "deny", "expect", "forbid"].iter().any(|l| a.path().is_ident(l)))
            .collect()
    }

    /// What every generated item carries from the user's function: its `cfg`s (a
    /// configured-out endpoint generates and registers nothing) and its lint levels, with
    /// `#[expect(..)]` as `#[allow(..)]` (an item the lint does not fire on must not
    /// report an unfulfilled expectation; the body keeps the `expect`).
    fn inherited(&self) -> TokenStream {
        let attrs = &self.item.attrs;
        let cfgs = attrs.iter().filter(|a| a.path().is_ident("cfg"));
        let lints = Self::lint_attrs(attrs).into_iter().map(|a| match &a.meta {
            syn::Meta::List(list) if a.path().is_ident("expect") => {
                let tokens = &list.tokens;
                quote!(#[allow(#tokens)])
            }
            _ => quote!(#a),
        });
        quote!(#(#cfgs)* #(#lints)*)
    }

    /// The user's doc comments, for the companions module.
    fn docs(&self) -> Vec<&Attribute> {
        self.item.attrs.iter().filter(|a| a.path().is_ident("doc")).collect()
    }

    /// The stub that replaces the function.
    fn stub(&self) -> TokenStream {
        let krate = &self.opts.krate;
        let item = self.item;
        // Everything but the lint levels as written; those as every generated item has them.
        let lints = Self::lint_attrs(&item.attrs);
        let attrs = item.attrs.iter().filter(|a| !a.path().is_ident("cfg") && !lints.contains(a));
        let inherited = self.inherited();
        let vis = &item.vis;
        let name = &self.sig.name;
        let inputs = &item.sig.inputs;
        let out = self.out_ty();
        let names = self.names();
        let args_ident = self.args_ident();
        quote! {
            #(#attrs)*
            #inherited
            #[allow(dead_code)]
            #vis fn #name(#inputs) -> #krate::Result<#out> {
                #krate::__private::call::<#out, _>(#args_ident { #(#names),* })
            }
        }
    }

    /// The original body, renamed and hidden.
    fn body(&self) -> TokenStream {
        let item = self.item;
        let lints = Self::lint_attrs(&item.attrs);
        let cfgs = item.attrs.iter().filter(|a| a.path().is_ident("cfg"));
        let ident = self.body_ident();
        let inputs = &item.sig.inputs;
        let output = &item.sig.output;
        let block = &item.block;
        quote! {
            #[doc(hidden)]
            #(#cfgs)*
            #(#lints)*
            #[allow(clippy::needless_pass_by_value)]
            fn #ident(#inputs) #output #block
        }
    }

    /// The companions module.
    fn companions(&self) -> TokenStream {
        let krate = &self.opts.krate;
        let item = self.item;
        let vis = &item.vis;
        let name = &self.sig.name;
        let inputs = &item.sig.inputs;
        let out = self.out_ty();
        let static_ident = self.static_ident();
        let names = self.names();
        let args_ident = self.args_ident();
        let doc = format!(
            "Companions of [`{name}`](fn@{name}): `submit` (run as a task), `call_async`, \
             `endpoint`{}.",
            if self.opts.cache { ", `invalidate` (drop a cache entry)" } else { "" }
        );
        let invalidate = self.opts.cache.then(|| self.invalidate());
        let inherited = self.inherited();
        let docs = self.docs();
        let blank = (!docs.is_empty()).then(|| quote!(#[doc = ""]));
        quote! {
            #[doc = #doc]
            #blank
            #(#docs)*
            #inherited
            #[allow(dead_code, non_snake_case, unused_imports, clippy::needless_pass_by_value)]
            #vis mod #name {
                use super::*;

                /// Submits a call as a task and returns its handle at once.
                pub fn submit(#inputs) -> #krate::Result<#krate::TaskHandle<#out>> {
                    #krate::__private::submit::<#out, _>(super::#args_ident { #(#names),* })
                }

                /// The call, as a future for async code: the request is sent now; the future
                /// waits for the reply on any executor (no Tokio needed) and, dropped early,
                /// releases what the reply lends.
                ///
                /// Connecting is synchronous: the first call of a client (or the first after
                /// a lost connection) connects on the calling thread and may block it up to
                /// the connect timeout (`SHARED_TENSOR_CONNECT_TIMEOUT_MS`, 2 s by default)
                /// before the future is returned. To keep that off an executor thread, connect
                /// at start-up on a blocking thread: `shared_tensor::wait_for_server(timeout)`
                /// (or `shared_tensor::client()?.connect()`), e.g. in `spawn_blocking`.
                pub fn call_async(#inputs) -> #krate::BoxFuture<#krate::Result<#out>> {
                    #krate::__private::call_async::<#out, _>(super::#args_ident { #(#names),* })
                }

                /// This endpoint's definition (for serving chosen endpoints in manual mode).
                pub fn endpoint() -> &'static #krate::__private::EndpointDef {
                    &super::#static_ident
                }

                #invalidate
            }
        }
    }

    /// `invalidate(params the key is made of)`.
    fn invalidate(&self) -> TokenStream {
        let krate = &self.opts.krate;
        let static_ident = self.static_ident();
        let params = self.key_params();
        let decls = params.iter().map(|p| {
            let (n, t) = (&p.name, &p.ty);
            quote!(#n: #t)
        });
        let refs = params.iter().map(|p| {
            let n = &p.name;
            (!p.by_ref).then(|| quote!(let #n = &#n;))
        });
        let key = self.key_value(true, quote!(super::));
        quote! {
            /// Drops the cache entry these arguments map to; true if it existed. Handles
            /// already issued stay valid.
            pub fn invalidate(#(#decls),*) -> #krate::Result<bool> {
                #(#refs)*
                let __key: ::core::option::Option<::std::string::String> = #key;
                #krate::__private::invalidate(&super::#static_ident, __key.unwrap_or_default())
            }
        }
    }

    /// The endpoint definition, its registration and its dispatch function.
    fn registration(&self) -> TokenStream {
        let krate = &self.opts.krate;
        let static_ident = self.static_ident();
        let dispatch_ident = self.dispatch_ident();
        let body_ident = self.body_ident();
        let endpoint = self.endpoint_name();
        let fn_name = self.sig.name.to_string();
        let o = self.opts;
        let execution = match o.execution {
            Execution::Direct => quote!(Direct),
            Execution::Task => quote!(Task),
        };
        let concurrency = match o.concurrency {
            Concurrency::Parallel => quote!(Parallel),
            Concurrency::Serialized => quote!(Serialized),
        };
        let cache = o.cache;
        let singleflight = o.singleflight();
        let managed = o.managed;
        let keep = o.keep;
        let cache_key = match &o.cache_key {
            Some(t) => quote!(::core::option::Option::Some(#t)),
            None => quote!(::core::option::Option::None),
        };
        let param_strs = self.sig.params.iter().map(|p| p.name.to_string());
        let decode = self.sig.params.iter().map(|p| {
            let (n, t) = (&p.name, &p.owned_ty);
            let s = n.to_string();
            quote!(let #n: #t = #krate::__private::decode_arg(__dec, __def, #s, __nodes.next())?;)
        });
        let args: Vec<TokenStream> = self
            .sig
            .params
            .iter()
            .map(|p| {
                let n = &p.name;
                if p.by_ref {
                    quote!(&#n)
                } else {
                    quote!(#n)
                }
            })
            .collect();
        let call = self.call_body(&args, quote!(#body_ident));
        let key = self.key_value(false, quote!());
        let value_ty = &self.sig.value_ty;
        let inherited = self.inherited();
        quote! {
            #[doc(hidden)]
            #inherited
            #[allow(non_upper_case_globals)]
            static #static_ident: #krate::__private::EndpointDef = #krate::__private::EndpointDef {
                name: #endpoint,
                path: ::core::concat!(::core::module_path!(), "::", #fn_name),
                options: #krate::__private::EndpointOptions {
                    execution: #krate::__private::Execution::#execution,
                    concurrency: #krate::__private::Concurrency::#concurrency,
                    cache: #cache,
                    cache_key: #cache_key,
                    singleflight: #singleflight,
                    managed: #managed,
                    keep: #keep,
                },
                params: &[#(#param_strs),*],
                dispatch: #dispatch_ident,
            };

            #[doc(hidden)]
            #inherited
            fn #dispatch_ident(
                __dec: &mut #krate::__private::Decoder,
            ) -> #krate::Result<#krate::__private::Prepared> {
                let __def = &#static_ident;
                let mut __nodes = #krate::__private::decode_args(__dec, __def)?;
                #(#decode)*
                let __key: ::core::option::Option<::std::string::String> = #key;
                ::core::result::Result::Ok(#krate::__private::Prepared::new::<#value_ty>(__key, move || #call))
            }

            #inherited
            const _: () = {
                #krate::__private::inventory::submit! {
                    #krate::__private::Registration(&#static_ident)
                }
            };
        }
    }

    /// Compile-time checks with the errors at the offending types: the result must be a
    /// payload and every parameter an argument.
    fn assertions(&self) -> TokenStream {
        let krate = &self.opts.krate;
        let value_ty = &self.sig.value_ty;
        let ret_span = match &self.item.sig.output {
            syn::ReturnType::Type(_, t) => t.span(),
            syn::ReturnType::Default => Span::call_site(),
        };
        let result_check = quote_spanned! {ret_span=>
            #krate::__private::assert_payload::<#value_ty>();
        };
        let arg_checks = self.sig.params.iter().map(|p| {
            let t = &p.owned_ty;
            quote_spanned! {p.ty.span()=> #krate::__private::assert_argument::<_, #t>(); }
        });
        let inherited = self.inherited();
        quote! {
            #inherited
            const _: fn() = || {
                #result_check
                #(#arg_checks)*
            };
        }
    }

    pub fn generate(&self) -> TokenStream {
        let args = self.args_struct();
        let stub = self.stub();
        let body = self.body();
        let companions = self.companions();
        let registration = self.registration();
        let assertions = self.assertions();
        let key_fn = self.key_fn();
        quote! {
            #stub
            #args
            #key_fn
            #body
            #companions
            #registration
            #assertions
        }
    }
}
