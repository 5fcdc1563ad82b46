//! The layering the code promises in ARCHITECTURE.md, checked against `src/`: every `crate::`
//! path in a module names only modules it may depend on. Layers point down, so a change that
//! makes the core reach an adapter, or the engine reach memory, fails here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Each top-level module and the modules it may use. Keep in step with ARCHITECTURE.md.
const RULES: &[(&str, &[&str])] = &[
    // Ground floor: the words every layer shares, and systemd's notification socket.
    ("chat", &[]),
    ("service", &[]),
    ("config", &["chat"]),
    // Memory and the engine; the engine knows nothing of chat.
    ("memory", &["chat"]),
    ("inference", &["config"]),
    ("prompt", &["chat", "inference"]),
    ("core", &["chat", "config", "inference", "memory", "prompt"]),
    ("metrics", &["chat", "core", "inference"]),
    ("adapters", &["chat", "config", "core"]),
    // Wiring, tools and the commands on top.
    ("app", &["config", "inference", "memory"]),
    ("bench", &["chat", "config", "inference", "memory"]),
    (
        "serve",
        &[
            "adapters", "app", "chat", "config", "core", "metrics", "service",
        ],
    ),
    (
        "cli",
        &[
            "adapters",
            "app",
            "bench",
            "chat",
            "config",
            "core",
            "inference",
            "memory",
            "prompt",
        ],
    ),
];

/// A `crate::x` use that the rules do not allow.
#[derive(Debug, PartialEq)]
struct Violation {
    file: String,
    line: usize,
    from: String,
    to: String,
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

/// The top-level module a file belongs to (`src/core/answer.rs` -> `core`).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (!matches!(name, "lib" | "main")).then(|| name.to_string())
}

/// Every `crate::name` in a line of code (comments and doc comments do not count).
fn crate_paths(line: &str) -> Vec<String> {
    let code = line.split("//").next().unwrap_or("");
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let before = rest[..i].chars().next_back();
        let after = &rest[i + "crate::".len()..];
        let name: String = after
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        // `synthia_bot::crate` never occurs; `$crate` and `other_crate::` are not ours.
        if !before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') && !name.is_empty()
        {
            out.push(name);
        }
        // `use crate::{a, b}`: each name in the braces.
        if let Some(braced) = after.strip_prefix('{') {
            let inner = braced.split('}').next().unwrap_or("");
            for part in inner.split(',') {
                let n: String = part
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !n.is_empty() {
                    out.push(n);
                }
            }
        }
        rest = after;
    }
    out
}

fn check(src: &Path) -> (Vec<Violation>, Vec<String>) {
    let rules: BTreeMap<&str, &[&str]> = RULES.iter().copied().collect();
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files.sort();
    let mut violations = Vec::new();
    let mut unknown = Vec::new();
    for file in files {
        let Some(module) = module_of(src, &file) else {
            continue;
        };
        let Some(allowed) = rules.get(module.as_str()) else {
            unknown.push(module);
            continue;
        };
        let text = std::fs::read_to_string(&file).unwrap();
        // A multi-line `use crate::{...}` is joined so every name in it is seen.
        let joined = text.replace(",\n", ", ").replace("{\n", "{");
        for (i, line) in joined.lines().enumerate() {
            for to in crate_paths(line) {
                if to != module && !allowed.contains(&to.as_str()) {
                    violations.push(Violation {
                        file: file.strip_prefix(src).unwrap().display().to_string(),
                        line: i + 1,
                        from: module.clone(),
                        to,
                    });
                }
            }
        }
    }
    unknown.sort();
    unknown.dedup();
    (violations, unknown)
}

#[test]
fn layers_only_point_down() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let (violations, unknown) = check(&src);
    assert!(
        unknown.is_empty(),
        "modules with no layering rule (add them to RULES and ARCHITECTURE.md): {unknown:?}"
    );
    assert!(
        violations.is_empty(),
        "imports against the layering:\n{}",
        violations
            .iter()
            .map(|v| format!(
                "  {}:{}: {} may not use crate::{}",
                v.file, v.line, v.from, v.to
            ))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// The checker itself catches a wrong import, a braced one and a new module without a rule,
/// and is not fooled by comments.
#[test]
fn the_checker_finds_upward_imports() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path();
    std::fs::create_dir_all(src.join("inference")).unwrap();
    std::fs::create_dir_all(src.join("core")).unwrap();
    std::fs::write(
        src.join("inference/worker.rs"),
        "use crate::config::ModelSettings;\nuse crate::memory::Store;\n// crate::adapters in a comment\n",
    )
    .unwrap();
    std::fs::write(
        src.join("core/mod.rs"),
        "use crate::{\n    chat::Incoming,\n    adapters::discord,\n};\nfn f() { crate::prompt::build(); }\n",
    )
    .unwrap();
    std::fs::write(src.join("plugins.rs"), "pub fn x() {}\n").unwrap();
    let (violations, unknown) = check(src);
    let found: Vec<(&str, &str)> = violations
        .iter()
        .map(|v| (v.from.as_str(), v.to.as_str()))
        .collect();
    assert_eq!(found, vec![("core", "adapters"), ("inference", "memory")]);
    assert_eq!(unknown, vec!["plugins".to_string()]);
}
