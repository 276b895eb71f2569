//! The shared function's signature: parameters (owned or borrowed) and result.

use syn::{FnArg, GenericArgument, Ident, ItemFn, Pat, PathArguments, ReturnType, Type};

use crate::errors::Errors;

pub struct Param {
    pub name: Ident,
    /// The type as written (`&Tensor`).
    pub ty: Type,
    /// The type without the reference (`Tensor`): what travels and is decoded.
    pub owned_ty: Type,
    pub by_ref: bool,
}

pub struct Signature {
    pub name: Ident,
    pub params: Vec<Param>,
    /// The value the endpoint produces (`T` of a `Result<T, E>`, or the return type).
    pub value_ty: Type,
    /// Whether the body returns `Result<T, E>`.
    pub fallible: bool,
}

/// Reads the signature, reporting everything an endpoint cannot have.
pub fn parse(f: &ItemFn, errors: &mut Errors) -> Signature {
    let sig = &f.sig;
    if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
        errors.push(&sig.generics, "a #[share] function cannot be generic: an endpoint has one concrete signature");
    }
    if let Some(a) = &sig.asyncness {
        errors.push(
            a,
            "a #[share] function cannot be async; write it sync and call `NAME::call_async(..)` from async code",
        );
    }
    if let Some(c) = &sig.constness {
        errors.push(c, "a #[share] function cannot be const");
    }
    if let Some(u) = &sig.unsafety {
        errors.push(u, "a #[share] function cannot be unsafe: a remote caller cannot uphold its contract");
    }
    if let Some(abi) = &sig.abi {
        errors.push(abi, "a #[share] function cannot have an extern ABI");
    }
    if let Some(v) = &sig.variadic {
        errors.push(v, "a #[share] function cannot be variadic");
    }
    let mut params = Vec::new();
    for input in &sig.inputs {
        match input {
            FnArg::Receiver(r) => {
                errors.push(r, "#[share] works on free functions, not methods: an endpoint has no `self`")
            }
            FnArg::Typed(pt) => {
                let name = match &*pt.pat {
                    Pat::Ident(pi) if pi.by_ref.is_none() && pi.subpat.is_none() => pi.ident.clone(),
                    other => {
                        errors.push(
                            other,
                            "parameters of a #[share] function must be plain names (`tensor: Tensor`), not patterns",
                        );
                        continue;
                    }
                };
                if is_trait_object(&pt.ty) {
                    errors.push(
                        &pt.ty,
                        format!(
                            "a #[share] parameter cannot be a trait object (`{}`): arguments are decoded into \
                             owned values of one type on the server, and a trait object names none; take a \
                             concrete type, or an enum with one variant per type you accept",
                            written(&pt.ty)
                        ),
                    );
                    continue;
                }
                if let Some(owned) = unsized_owned(&pt.ty) {
                    errors.push(
                        &pt.ty,
                        format!(
                            "a #[share] parameter must be a sized, owned type: arguments are decoded into owned \
                             values on the server, so `{}` cannot arrive; take `{owned}` (or `&{owned}`) instead",
                            written(&pt.ty)
                        ),
                    );
                    continue;
                }
                let (owned_ty, by_ref) = match &*pt.ty {
                    Type::Reference(r) if r.mutability.is_some() => {
                        errors.push(&pt.ty, "a #[share] parameter cannot be `&mut`: take it by value or by `&`");
                        continue;
                    }
                    Type::Reference(r) => ((*r.elem).clone(), true),
                    Type::ImplTrait(_) => {
                        errors.push(&pt.ty, "a #[share] parameter cannot be `impl Trait`: name a concrete type");
                        continue;
                    }
                    other => (other.clone(), false),
                };
                params.push(Param { name, ty: (*pt.ty).clone(), owned_ty, by_ref });
            }
        }
    }
    let (value_ty, fallible) = match &sig.output {
        ReturnType::Default => (syn::parse_quote!(()), false),
        ReturnType::Type(_, ty) => match result_ok_type(ty) {
            Some(ok) => (ok, true),
            None => ((**ty).clone(), false),
        },
    };
    Signature { name: sig.ident.clone(), params, value_ty, fallible }
}

/// A type as written, without the spaces token streams print (`&[Tensor]`).
fn written(ty: &Type) -> String {
    let text = quote::ToTokens::to_token_stream(ty).to_string();
    match ty {
        // `& dyn std :: fmt :: Debug + Send` as written: `&dyn std::fmt::Debug + Send`.
        Type::Reference(_) | Type::TraitObject(_) if is_trait_object(ty) => text
            .replace(" :: ", "::")
            .replace("& ", "&")
            .replace(" < ", "<")
            .replace(" <", "<")
            .replace(" >", ">")
            .replace(" ,", ","),
        _ => text.replace(' ', ""),
    }
}

/// Whether `ty` is a trait object or a reference to one (`dyn Trait`, `&dyn Trait`).
fn is_trait_object(ty: &Type) -> bool {
    match ty {
        Type::Reference(r) => matches!(&*r.elem, Type::TraitObject(_)),
        other => matches!(other, Type::TraitObject(_)),
    }
}

/// The owned type to suggest if `ty` is (a reference to) an unsized type: `str`, a slice,
/// `Path`, `OsStr` or `CStr` (trait objects have their own message: [`is_trait_object`]).
fn unsized_owned(ty: &Type) -> Option<String> {
    let inner = match ty {
        Type::Reference(r) => &*r.elem,
        other => other,
    };
    match inner {
        Type::Slice(s) => Some(format!("Vec<{}>", written(&s.elem))),
        Type::Path(tp) if tp.qself.is_none() => {
            let last = tp.path.segments.last()?;
            let owned = match last.ident.to_string().as_str() {
                "str" => "String",
                "Path" => "PathBuf",
                "OsStr" => "OsString",
                "CStr" => "CString",
                _ => return None,
            };
            matches!(last.arguments, PathArguments::None).then(|| owned.to_string())
        }
        _ => None,
    }
}

/// `T` if the type is written `...Result<T, ..>`: the body may fail with an error that
/// implements `Display`, which the caller receives as `Error::Endpoint`.
fn result_ok_type(ty: &Type) -> Option<Type> {
    let Type::Path(tp) = ty else { return None };
    let last = tp.path.segments.last()?;
    if last.ident != "Result" {
        return None;
    }
    let PathArguments::AngleBracketed(args) = &last.arguments else {
        return None;
    };
    match args.args.first()? {
        GenericArgument::Type(t) => Some(t.clone()),
        _ => None,
    }
}
