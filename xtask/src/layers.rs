//! `cargo xtask test`'s first step: the runtime's modules import only downward.
//!
//! `shared-tensor-runtime/src` has one folder per layer (see `docs/architecture.md`); a
//! module may use `crate::` paths into its own layer and the layers below it, never
//! above. This reads every file as text (comments stripped), charges each `crate::x`
//! path to the layer of `x`, and reports the paths that point up. `lib.rs`, which
//! re-exports every layer under the short public names, is not checked.

use std::fs;
use std::path::{Path, PathBuf};

/// The layers, bottom first: a module may import its own layer and those before it.
pub const LAYERS: &[(&str, usize)] =
    &[("error", 0), ("info", 0), ("device", 1), ("protocol", 2), ("payload", 3), ("exec", 4), ("net", 5), ("api", 6)];

fn rank(module: &str) -> Option<usize> {
    LAYERS.iter().find(|(name, _)| *name == module).map(|(_, r)| *r)
}

/// The text without `//` and `/* */` comments (string literals are left as they are:
/// a `crate::` inside one is rare enough to allow).
fn strip_comments(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i..].starts_with(b"//") {
            while i < bytes.len() && bytes[i] != b'\n' {
                i += 1;
            }
        } else if bytes[i..].starts_with(b"/*") {
            i += 2;
            while i < bytes.len() && !bytes[i..].starts_with(b"*/") {
                i += 1;
            }
            i += 2;
        } else {
            out.push(bytes[i] as char);
            i += 1;
        }
    }
    out
}

/// The first segments of the `crate::` paths in `text`, including those of grouped
/// imports (`crate::{a::X, b}` names `a` and `b`).
pub fn imported_modules(text: &str) -> Vec<String> {
    let text = strip_comments(text);
    let mut found = Vec::new();
    let mut rest = text.as_str();
    while let Some(at) = rest.find("crate::") {
        let before = rest[..at].chars().next_back();
        rest = &rest[at + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
            continue; // `$crate::`-like or part of a longer name
        }
        let rest_trim = rest.trim_start();
        if let Some(group) = rest_trim.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let name: String = item.trim().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                if !name.is_empty() {
                    found.push(name);
                }
            }
        } else {
            let name: String = rest_trim.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            if !name.is_empty() {
                found.push(name);
            }
        }
    }
    found
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), String> {
    let entries = fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    for entry in entries {
        let path = entry.map_err(|e| format!("cannot read {}: {e}", dir.display()))?.path();
        if path.is_dir() {
            rust_files(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    Ok(())
}

/// Every upward import under `src`, as `file: layer imports crate::module (layer)`.
pub fn violations(src: &Path) -> Result<Vec<String>, String> {
    let mut files = Vec::new();
    rust_files(src, &mut files)?;
    files.sort();
    let texts = files
        .iter()
        .map(|file| fs::read_to_string(file).map_err(|e| format!("cannot read {}: {e}", file.display())))
        .collect::<Result<Vec<String>, String>>()?;
    // `#[macro_export]` macros live at the root whatever file defines them.
    let mut macros = Vec::new();
    for text in &texts {
        for (at, _) in text.match_indices("macro_rules!") {
            let name: String = text[at + "macro_rules!".len()..]
                .trim_start()
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            macros.push(name);
        }
    }
    let mut found = Vec::new();
    for (file, text) in files.iter().zip(&texts) {
        let rel = file.strip_prefix(src).unwrap_or(file);
        if rel == Path::new("lib.rs") {
            continue;
        }
        let first = rel.components().next().map(|c| c.as_os_str().to_string_lossy().into_owned()).unwrap_or_default();
        let module = first.strip_suffix(".rs").unwrap_or(&first).to_string();
        let Some(own) = rank(&module) else {
            found.push(format!("{}: `{module}` is in no layer (add it to xtask's LAYERS)", rel.display()));
            continue;
        };
        let mut seen = Vec::new();
        for target in imported_modules(text) {
            if target == module || seen.contains(&target) || macros.contains(&target) {
                continue;
            }
            seen.push(target.clone());
            match rank(&target) {
                Some(r) if r <= own => {}
                Some(_) => found.push(format!("{}: `{module}` imports `crate::{target}`, a layer above it", rel.display())),
                // A short public name (a re-export at the root): it hides the layer.
                None => found.push(format!(
                    "{}: `crate::{target}` is a root re-export; name the module by its layer (`crate::<layer>::{target}`)",
                    rel.display()
                )),
            }
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crate_paths_are_found_in_code_and_groups_but_not_in_comments() {
        let text = "use crate::device::ipc;\n// crate::api::x\n/* crate::net */ use crate::{error::Error, info};\nlet x = $crate::nope;";
        assert_eq!(imported_modules(text), vec!["device", "error", "info"]);
    }

    #[test]
    fn the_runtime_imports_only_downward() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared-tensor-runtime/src");
        assert_eq!(violations(&src).unwrap(), Vec::<String>::new());
    }
}
