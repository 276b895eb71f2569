//! The options of `#[share(...)]`, parsed with every mistake reported at its span.

use syn::punctuated::Punctuated;
use syn::{Expr, ExprLit, Lit, LitStr, Meta, Token};

use crate::errors::Errors;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Execution {
    Direct,
    Task,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Concurrency {
    Parallel,
    Serialized,
}

/// `#[share(...)]` as written, with defaults filled in.
pub struct Options {
    pub execution: Execution,
    pub concurrency: Concurrency,
    pub cache: bool,
    /// Explicit `singleflight = ...`; when absent it follows `cache`.
    pub singleflight: Option<bool>,
    pub managed: bool,
    pub keep: bool,
    pub cache_key: Option<LitStr>,
    pub name: Option<LitStr>,
    /// The path generated code reaches the runtime by (`crate = "..."`; default
    /// `::shared_tensor`), for crates that re-export shared-tensor under another name.
    pub krate: syn::Path,
}

impl Options {
    pub fn singleflight(&self) -> bool {
        self.singleflight.unwrap_or(self.cache)
    }

    /// Whether calls carry a key (for the cache or for singleflight).
    pub fn keyed(&self) -> bool {
        self.cache || self.singleflight()
    }
}

const KNOWN: &str = "execution, concurrency, cache, cache_key, singleflight, managed, keep, name, crate";

fn string_value(expr: &Expr, option: &str, expected: &str, errors: &mut Errors) -> Option<LitStr> {
    match expr {
        Expr::Lit(ExprLit { lit: Lit::Str(s), .. }) => Some(s.clone()),
        other => {
            errors.push(other, format!("`{option}` expects a string: {expected}"));
            None
        }
    }
}

fn bool_value(expr: &Expr, option: &str, errors: &mut Errors) -> Option<bool> {
    match expr {
        Expr::Lit(ExprLit { lit: Lit::Bool(b), .. }) => Some(b.value),
        other => {
            errors.push(other, format!("`{option}` expects `true` or `false`"));
            None
        }
    }
}

/// Parses the attribute's arguments. Unknown options and bad values are errors.
pub fn parse(args: Punctuated<Meta, Token![,]>, errors: &mut Errors) -> Options {
    let mut o = Options {
        execution: Execution::Task,
        concurrency: Concurrency::Parallel,
        cache: true,
        singleflight: None,
        managed: false,
        keep: false,
        cache_key: None,
        name: None,
        krate: syn::parse_quote!(::shared_tensor),
    };
    let mut seen: Vec<String> = Vec::new();
    let mut keep_span = None;
    for meta in args {
        let path = meta.path();
        if path.is_ident("keep") {
            keep_span = Some(syn::spanned::Spanned::span(&meta));
        }
        let Some(ident) = path.get_ident().map(|i| i.to_string()) else {
            errors.push(path, format!("unknown option; expected one of: {KNOWN}"));
            continue;
        };
        if seen.contains(&ident) {
            errors.push(path, format!("`{ident}` is given twice"));
            continue;
        }
        seen.push(ident.clone());
        match (&*ident, &meta) {
            ("managed", Meta::Path(_)) => o.managed = true,
            ("managed", Meta::NameValue(nv)) => o.managed = bool_value(&nv.value, "managed", errors).unwrap_or(false),
            ("keep", Meta::Path(_)) => o.keep = true,
            ("keep", Meta::NameValue(nv)) => o.keep = bool_value(&nv.value, "keep", errors).unwrap_or(false),
            ("cache", Meta::NameValue(nv)) => o.cache = bool_value(&nv.value, "cache", errors).unwrap_or(true),
            ("singleflight", Meta::NameValue(nv)) => o.singleflight = bool_value(&nv.value, "singleflight", errors),
            ("execution", Meta::NameValue(nv)) => {
                if let Some(s) = string_value(&nv.value, "execution", "\"direct\" or \"task\"", errors) {
                    match s.value().as_str() {
                        "direct" => o.execution = Execution::Direct,
                        "task" => o.execution = Execution::Task,
                        other => {
                            errors.push(&s, format!("unknown execution {other:?}; expected \"direct\" or \"task\""))
                        }
                    }
                }
            }
            ("concurrency", Meta::NameValue(nv)) => {
                if let Some(s) = string_value(&nv.value, "concurrency", "\"parallel\" or \"serialized\"", errors) {
                    match s.value().as_str() {
                        "parallel" => o.concurrency = Concurrency::Parallel,
                        "serialized" => o.concurrency = Concurrency::Serialized,
                        other => errors.push(
                            &s,
                            format!("unknown concurrency {other:?}; expected \"parallel\" or \"serialized\""),
                        ),
                    }
                }
            }
            ("cache_key", Meta::NameValue(nv)) => {
                o.cache_key = string_value(&nv.value, "cache_key", "a template such as \"model:{hidden_size}\"", errors)
            }
            ("name", Meta::NameValue(nv)) => {
                if let Some(s) = string_value(&nv.value, "name", "the endpoint's name", errors) {
                    if s.value().is_empty() {
                        errors.push(&s, "`name` must not be empty");
                    } else {
                        o.name = Some(s);
                    }
                }
            }
            ("crate", Meta::NameValue(nv)) => {
                let expected = "the path of the shared_tensor crate, such as \"my_sdk::shared_tensor\"";
                if let Some(s) = string_value(&nv.value, "crate", expected, errors) {
                    match s.parse::<syn::Path>() {
                        Ok(path) => o.krate = path,
                        Err(_) => errors.push(&s, format!("`crate` expects {expected}; {:?} is not a path", s.value())),
                    }
                }
            }
            ("cache_format_key", _) => errors.push(
                path,
                "`cache_format_key` is spelled `cache_key` here: #[share(cache_key = \"model:{hidden_size}\")]",
            ),
            ("managed" | "keep", _) => {
                errors.push(&meta, format!("`{ident}` is a flag: write `{ident}` or `{ident} = true`"))
            }
            ("cache" | "singleflight" | "execution" | "concurrency" | "cache_key" | "name" | "crate", _) => {
                errors.push(&meta, format!("`{ident}` needs a value: `{ident} = ...`"))
            }
            (other, _) => errors.push(path, format!("unknown option `{other}`; expected one of: {KNOWN}")),
        }
    }
    if o.keep && !(o.managed && o.cache) {
        errors.add(syn::Error::new(
            keep_span.unwrap_or_else(proc_macro2::Span::call_site),
            "`keep` keeps a cached managed object alive with no handles: it needs `managed` and `cache` (the default)",
        ));
    }
    if let (Some(key), false) = (&o.cache_key, o.keyed()) {
        errors.push(key, "`cache_key` has no effect with `cache = false` and `singleflight = false`; remove it");
    }
    o
}
