//! Cache key templates: `"model:{hidden_size}"` (or `"model:<hidden_size>"`, as the design
//! card writes it) becomes `format!("model:{}", hidden_size)`.

use proc_macro2::TokenStream;
use quote::{format_ident, quote};
use syn::LitStr;

use super::signature::Param;
use crate::errors::Errors;

/// A parsed template: the `format!` string and the parameters it names, in order.
pub struct KeyTemplate {
    pub format: String,
    pub names: Vec<String>,
}

fn is_ident(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_alphabetic()) && chars.all(|c| c == '_' || c.is_alphanumeric())
}

/// Splits the template into literal text and `{name}` / `{name:spec}` / `<name>` holes.
pub fn parse_template(template: &str) -> Result<KeyTemplate, String> {
    let mut format = String::new();
    let mut names = Vec::new();
    let mut rest = template;
    while let Some(c) = rest.chars().next() {
        if rest.starts_with("{{") || rest.starts_with("}}") {
            format.push_str(&rest[..2]);
            rest = &rest[2..];
            continue;
        }
        let close = match c {
            '{' => Some('}'),
            '<' => Some('>'),
            '}' => return Err("unmatched `}` (write `}}` for a literal brace)".into()),
            _ => None,
        };
        if let Some(close) = close {
            if let Some(end) = rest[1..].find(close) {
                let inner = &rest[1..1 + end];
                let (name, spec) = inner.split_once(':').unwrap_or((inner, ""));
                let name = name.trim();
                if is_ident(name) {
                    format.push_str(&if spec.is_empty() { "{}".to_string() } else { format!("{{:{spec}}}") });
                    names.push(name.to_string());
                    rest = &rest[2 + end..];
                    continue;
                }
                if c == '{' {
                    return Err(format!("`{{{inner}}}` does not name a parameter"));
                }
            } else if c == '{' {
                return Err("unclosed `{`".into());
            }
        }
        // Literal text; braces were handled above.
        format.push(c);
        rest = &rest[c.len_utf8()..];
    }
    Ok(KeyTemplate { format, names })
}

/// The expression computing the key from bindings named like the parameters, or an error
/// at the template's span naming what is wrong.
pub fn key_expr(template: &LitStr, params: &[Param], fn_name: &str, errors: &mut Errors) -> TokenStream {
    let parsed = match parse_template(&template.value()) {
        Ok(p) => p,
        Err(e) => {
            errors.push(template, format!("bad cache_key: {e}"));
            return quote!(::std::string::String::new());
        }
    };
    let known: Vec<String> = params.iter().map(|p| p.name.to_string()).collect();
    for name in &parsed.names {
        if !known.contains(name) {
            errors.push(
                template,
                format!(
                    "cache_key names `{name}`, which is not a parameter of `{fn_name}` (parameters: {})",
                    if known.is_empty() { "none".to_string() } else { known.join(", ") }
                ),
            );
        }
    }
    let format = &parsed.format;
    let args = parsed.names.iter().map(|n| format_ident!("{}", n));
    quote!(::std::format!(#format, #(#args),*))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_spellings_parse() {
        let a = parse_template("model:{hidden_size}").unwrap();
        let b = parse_template("model:<hidden_size>").unwrap();
        assert_eq!((a.format.as_str(), a.names.clone()), ("model:{}", vec!["hidden_size".to_string()]));
        assert_eq!((b.format, b.names), (a.format, a.names));
    }

    #[test]
    fn specs_escapes_and_literal_angles() {
        let t = parse_template("{name}:{dtype:?}:{{x}}:a<b").unwrap();
        assert_eq!(t.format, "{}:{:?}:{{x}}:a<b");
        assert_eq!(t.names, vec!["name", "dtype"]);
    }

    #[test]
    fn mistakes_are_reported() {
        assert!(parse_template("model:{hidden").is_err());
        assert!(parse_template("model:}").is_err());
        assert!(parse_template("model:{1x}").is_err());
    }
}
