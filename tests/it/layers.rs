//! The layers `src/lib.rs` states are the layers the code has: every top-level module is listed once, and no
//! module imports one of its own layer or of a layer above it. And files stay small enough to hold in mind.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The numbered list of the crate docs' Layout section: each top-level module named in it, with its layer
/// (1 is the top).
fn stated_layers(lib: &str) -> BTreeMap<String, usize> {
    let mut layers = BTreeMap::new();
    let mut layer = None;
    for line in lib.lines() {
        let Some(doc) = line.strip_prefix("//!") else {
            continue;
        };
        let doc = doc.trim_start();
        if let Some((number, _)) = doc.split_once(". ")
            && let Ok(n) = number.parse::<usize>()
        {
            layer = Some(n);
        } else if doc.is_empty() || doc.starts_with('#') || !line.starts_with("//!    ") {
            // A blank line, a heading or unindented prose ends an item.
            layer = None;
        }
        let Some(n) = layer else { continue };
        for name in doc.split("[`").skip(1).filter_map(|s| s.split_once("`]")) {
            let name = name.0;
            if !name.contains("::") {
                let earlier = layers.insert(name.to_string(), n);
                assert!(earlier.is_none(), "{name} is listed twice in the Layout");
            }
        }
    }
    layers
}

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

/// The top-level modules a file's code (not its comments) names through `crate::`.
fn imports(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in code.lines() {
        let line = line.split("//").next().unwrap_or_default();
        for rest in line.split("crate::").skip(1) {
            let names: Vec<&str> = match rest.strip_prefix('{') {
                // `crate::{a::X, b}`: each part's first name.
                Some(group) => group
                    .split('}')
                    .next()
                    .unwrap_or_default()
                    .split(',')
                    .collect(),
                None => vec![rest],
            };
            for name in names {
                let name: String = name
                    .trim()
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    out.push(name);
                }
            }
        }
    }
    out
}

#[test]
fn every_import_points_down_the_layers_lib_rs_states() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let layers = stated_layers(&std::fs::read_to_string(root.join("lib.rs")).unwrap());
    assert!(
        layers.len() > 20,
        "the Layout lists the modules: {layers:?}"
    );
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    let mut problems = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for file in files {
        let relative = file.strip_prefix(&root).unwrap();
        let first = relative.components().next().unwrap().as_os_str();
        let module = first.to_str().unwrap().trim_end_matches(".rs").to_string();
        if module == "lib" || module == "main" {
            continue;
        }
        seen.insert(module.clone());
        let Some(&layer) = layers.get(&module) else {
            problems.push(format!("{module} is not in lib.rs's Layout"));
            continue;
        };
        let code = std::fs::read_to_string(&file).unwrap();
        for import in imports(&code) {
            if import == module {
                continue;
            }
            match layers.get(&import) {
                Some(&below) if below > layer => {}
                Some(&other) => problems.push(format!(
                    "{} (layer {layer}) imports crate::{import} (layer {other})",
                    relative.display()
                )),
                None => problems.push(format!(
                    "{} imports crate::{import}, which is not in lib.rs's Layout",
                    relative.display()
                )),
            }
        }
    }
    for listed in layers.keys() {
        if !seen.contains(listed) {
            problems.push(format!(
                "lib.rs's Layout lists {listed}, which is not a module"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// No file of the crate, its tests or its benchmarks is over 600 lines: past that, split it by responsibility.
#[test]
fn no_source_file_is_over_600_lines() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for dir in ["src", "tests", "benches"] {
        rust_files(&root.join(dir), &mut files);
    }
    assert!(files.len() > 100, "{} files", files.len());
    let long: Vec<String> = files
        .iter()
        .filter_map(|f| {
            let lines = std::fs::read_to_string(f).unwrap().lines().count();
            (lines > 600).then(|| format!("{} ({lines} lines)", f.display()))
        })
        .collect();
    assert!(long.is_empty(), "split these: {long:?}");
}

#[test]
fn the_check_reads_imports_and_layers_as_written() {
    assert_eq!(
        imports(
            "use crate::keys::{Ask, Grant};\nlet x = crate::clock::Clock::system(); // crate::app\nuse crate::{a::B, c};"
        ),
        ["keys", "clock", "a", "c"]
    );
    let lib = "//! # Layout\n//!\n//! 1. [`top`]: a [`top::Thing`].\n//! 2. [`mid`], and\n//!    [`low`] too.\n//!\n//! Prose with [`other`].\n";
    let layers = stated_layers(lib);
    assert_eq!(
        layers.into_iter().collect::<Vec<_>>(),
        [("low".into(), 2), ("mid".into(), 2), ("top".to_string(), 1)]
    );
}
