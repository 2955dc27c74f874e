//! The layering `src/lib.rs` describes, checked on the source: each top-level module may
//! import only the modules below it, the two front doors never import each other, and the
//! layers under the front doors name no wire-format or CLI crate. A new import that points
//! the wrong way fails here with the file and the line.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Each layer and the crate modules it may use (besides itself).
const ALLOWED: &[(&str, &[&str])] = &[
    ("engine", &[]),
    ("data", &[]),
    ("observability", &["engine"]),
    ("control", &["engine"]),
    ("repository", &["engine", "control"]),
    ("scheduling", &["engine", "observability"]),
    ("train", &["engine", "data", "repository", "control"]),
    ("serving", &["engine", "data", "control", "repository", "scheduling", "observability"]),
    ("protocol", &["serving", "control", "engine", "observability"]),
    ("server", &["protocol", "serving", "control", "observability"]),
    ("bench", &["engine", "control", "repository", "data"]),
    (
        "cli",
        &[
            "bench",
            "control",
            "data",
            "engine",
            "observability",
            "protocol",
            "repository",
            "server",
            "serving",
            "train",
        ],
    ),
];

/// Crates that belong to the front doors or the command line, not below them.
const FOREIGN: &[(&str, &[&str])] = &[
    ("engine", &["clap", "axum", "tonic", "hyper", "prost", "prometheus", "tokio"]),
    ("control", &["clap", "axum", "tonic", "hyper", "prost"]),
    ("repository", &["clap", "axum", "tonic", "hyper", "prost"]),
    ("scheduling", &["clap", "axum", "tonic", "hyper", "prost"]),
    ("serving", &["clap", "axum", "tonic", "hyper", "prost"]),
    ("observability", &["axum", "tonic", "hyper", "prost"]),
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file of `src/` belongs to (`src/serving/mod.rs` → `serving`,
/// `src/server.rs` → `server`).
fn layer_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    Some(first.trim_end_matches(".rs").to_string())
}

/// Every `crate::<module>` a line names, including inside `crate::{a, b::c}` groups.
fn crate_modules(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = line;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let name: String =
                    item.trim().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                if !name.is_empty() {
                    out.push(name);
                }
            }
        } else {
            let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            out.push(name);
        }
    }
    out
}

/// Lines that are code (not comments).
fn code_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines().enumerate().map(|(i, l)| (i + 1, l)).filter(|(_, l)| {
        let t = l.trim_start();
        !(t.starts_with("//") || t.starts_with("///") || t.starts_with("//!"))
    })
}

#[test]
fn every_import_points_down_the_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut violations = Vec::new();
    let mut checked = 0;
    for file in &files {
        let Some(layer) = layer_of(&src, file) else { continue };
        if matches!(layer.as_str(), "lib" | "main") {
            continue;
        }
        let Some(may) = allowed.get(layer.as_str()) else {
            violations.push(format!("{}: module `{layer}` has no place in the layering", file.display()));
            continue;
        };
        let text = std::fs::read_to_string(file).unwrap();
        for (n, line) in code_lines(&text) {
            for module in crate_modules(line) {
                checked += 1;
                if module != layer && !may.contains(&module.as_str()) {
                    violations.push(format!("{}:{n}: `{layer}` imports `crate::{module}`", file.display()));
                }
            }
            if let Some((_, crates)) = FOREIGN.iter().find(|(l, _)| *l == layer) {
                for c in *crates {
                    if line.contains(&format!("{c}::")) || line.contains(&format!("use {c};")) {
                        violations.push(format!("{}:{n}: `{layer}` uses the `{c}` crate", file.display()));
                    }
                }
            }
        }
    }
    assert!(checked > 100, "the scan found only {checked} crate paths: is it reading src/?");
    assert!(violations.is_empty(), "imports against the layering:\n{}", violations.join("\n"));
}

#[test]
fn the_front_doors_do_not_import_each_other() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/protocol");
    let mut violations = Vec::new();
    for (door, other) in [("http", "grpc"), ("grpc", "http")] {
        let mut files = Vec::new();
        rust_files(&src.join(door), &mut files);
        assert!(!files.is_empty(), "no files under src/protocol/{door}");
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            for (n, line) in code_lines(&text) {
                if line.contains(&format!("protocol::{other}")) || line.contains(&format!("super::{other}")) {
                    violations.push(format!("{}:{n}: {door} imports {other}", file.display()));
                }
            }
        }
    }
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

#[test]
fn the_scanner_sees_grouped_and_plain_paths() {
    assert_eq!(crate_modules("use crate::serving::{ApiError, X};"), vec!["serving"]);
    assert_eq!(crate_modules("use crate::{engine::X, data};"), vec!["engine", "data"]);
    assert_eq!(
        crate_modules("let x = crate::protocol::EXTENSIONS; crate::server::run()"),
        vec!["protocol", "server"]
    );
}
