//! The crate's top-level modules must not import each other in a loop: the layering the crate
//! doc draws (config at the bottom; consensus and apply both above `state_machine`, neither
//! above the other; the front end on top) is checked here from the `crate::` paths in the code.
//!
//! Comments and `#[cfg(test)]` modules are left out: a doc link or a unit test may reach
//! anywhere.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top-level module -> the top-level modules its code names.
type Graph = BTreeMap<String, BTreeSet<String>>;

fn module_graph(src: &Path) -> Graph {
    let mut graph = Graph::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(src).unwrap();
            let first = rel.components().next().unwrap().as_os_str();
            let module = first.to_string_lossy().trim_end_matches(".rs").to_string();
            if module == "lib" || module == "main" {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let deps = graph.entry(module.clone()).or_default();
            for name in crate_paths(&text) {
                if name != module {
                    deps.insert(name);
                }
            }
        }
    }
    graph
}

/// The first segment of every `crate::x` path in `text`'s code.
fn crate_paths(text: &str) -> Vec<String> {
    let code = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    };
    let mut names = Vec::new();
    for line in code.lines() {
        let line = match line.find("//") {
            Some(i) => &line[..i],
            None => line,
        };
        let mut rest = line;
        while let Some(i) = rest.find("crate::") {
            let after = &rest[i + "crate::".len()..];
            let name: String = after
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                names.push(name);
            }
            rest = after;
        }
    }
    names
}

/// A path `from -> ... -> to` in `graph`, if any.
fn path(graph: &Graph, from: &str, to: &str) -> Option<Vec<String>> {
    let mut seen = BTreeSet::new();
    let mut stack = vec![vec![from.to_string()]];
    while let Some(p) = stack.pop() {
        let last = p.last().unwrap().clone();
        for next in graph.get(&last).into_iter().flatten() {
            let mut q = p.clone();
            q.push(next.clone());
            if next == to {
                return Some(q);
            }
            if seen.insert(next.clone()) {
                stack.push(q);
            }
        }
    }
    None
}

#[test]
fn no_module_imports_itself_through_others() {
    let graph = module_graph(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    assert!(graph.contains_key("consensus") && graph.contains_key("apply"));
    let mut loops = Vec::new();
    for (module, deps) in &graph {
        for dep in deps {
            if let Some(back) = path(&graph, dep, module) {
                loops.push(format!("{module} -> {}", back.join(" -> ")));
            }
        }
    }
    assert!(loops.is_empty(), "import loops:\n{}", loops.join("\n"));
}

#[test]
fn consensus_and_apply_meet_only_in_state_machine() {
    let graph = module_graph(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    assert!(!graph["consensus"].contains("apply"));
    assert!(!graph["apply"].contains("consensus"));
    assert!(graph["consensus"].contains("state_machine"));
    assert!(graph["apply"].contains("state_machine"));
    // The boundary sits below both: it names only leaves.
    let below: BTreeSet<String> = ["auth", "config", "error", "proto"]
        .map(String::from)
        .into();
    assert!(
        graph["state_machine"].is_subset(&below),
        "{:?}",
        graph["state_machine"]
    );
}

#[test]
fn config_is_a_leaf() {
    let graph = module_graph(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    assert!(graph["config"].is_empty(), "{:?}", graph["config"]);
}

#[test]
fn finds_a_loop_and_ignores_comments() {
    let text = "use crate::b::X;\n// crate::c in a comment\nfn f() { crate::d::g() }\n\
                #[cfg(test)]\nmod tests { use crate::e; }\n";
    assert_eq!(crate_paths(text), vec!["b", "d"]);
    let mut g = Graph::new();
    g.entry("a".into()).or_default().insert("b".into());
    g.entry("b".into()).or_default().insert("a".into());
    assert_eq!(path(&g, "b", "a"), Some(vec!["b".into(), "a".into()]));
    assert_eq!(path(&g, "b", "c"), None);
}
