//! The layering rule of ARCHITECTURE.md, enforced: every `crate::` reference in a library
//! module's code (test modules and comments aside) points to a module of a strictly lower
//! layer, so the import graph has no cycles and no upward arrows. Only `worker` (and the
//! binary's `cli/`) may use `config`; nothing uses `worker`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Each library module's layer: a module may use only modules of lower layers.
const LAYERS: &[(&str, u8)] = &[
    ("protocol", 0),
    ("backoff", 0),
    ("settings", 0),
    ("http_server", 0),
    ("record", 1),
    ("client", 1),
    ("telemetry", 1),
    ("nats", 1),
    ("normalize", 2),
    ("alert", 2),
    ("sink", 3),
    ("source", 3),
    ("sandbox", 3),
    ("cluster", 3),
    ("lifecycle", 4),
    ("import", 4),
    ("query", 4),
    ("config", 5),
    ("worker", 6),
];

/// The modules a file's code names through `crate::` (paths and `use crate::{a, b}` groups).
fn referenced(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() && name != "self" {
                    found.insert(name);
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            found.insert(name);
        }
    }
    found
}

/// The library's code, per module: comments and `#[cfg(test)]` tails left out.
fn module_code() -> BTreeMap<String, String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut modules: BTreeMap<String, String> = BTreeMap::new();
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let relative = path.strip_prefix(&src).unwrap();
            let first = relative.components().next().unwrap();
            let module = first
                .as_os_str()
                .to_string_lossy()
                .trim_end_matches(".rs")
                .to_owned();
            if ["main", "lib", "cli"].contains(&module.as_str()) {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let text = text.split("#[cfg(test)]").next().unwrap_or_default();
            let code: String = text
                .lines()
                .map(|line| line.split("//").next().unwrap_or_default())
                .collect::<Vec<_>>()
                .join("\n");
            modules.entry(module).or_default().push_str(&code);
        }
    }
    modules
}

#[test]
fn every_import_points_down() {
    let layers: BTreeMap<&str, u8> = LAYERS.iter().copied().collect();
    let mut wrong = Vec::new();
    for (module, code) in module_code() {
        let Some(own) = layers.get(module.as_str()) else {
            wrong.push(format!(
                "src/{module}: not in LAYERS; give it a layer in tests/layering.rs and ARCHITECTURE.md"
            ));
            continue;
        };
        for used in referenced(&code) {
            if used == module {
                continue;
            }
            match layers.get(used.as_str()) {
                Some(layer) if layer < own => {}
                Some(layer) => wrong.push(format!(
                    "{module} (layer {own}) uses {used} (layer {layer}): an arrow up or sideways"
                )),
                None => wrong.push(format!(
                    "{module} uses crate::{used}, which is not a module"
                )),
            }
        }
    }
    assert!(wrong.is_empty(), "layering broken:\n{}", wrong.join("\n"));
}

#[test]
fn the_checker_sees_groups_and_paths() {
    let found =
        referenced("use crate::{sink::Backlog, telemetry};\nlet x = crate::config::duration;");
    let expected: BTreeSet<String> = ["sink", "telemetry", "config"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(found, expected);
}

/// The sibling modules of `src/cli/` a file's code names as `super::NAME`.
fn cli_references(code: &str, siblings: &BTreeSet<String>) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find("super::") {
        rest = &rest[at + "super::".len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if siblings.contains(&name) {
            found.insert(name);
        }
    }
    found
}

/// A cycle in `graph` as its modules in order, if there is one.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

/// The command line's verbs are peers over the shared helpers in `cli/mod.rs`: one may use
/// another (`demo` uses `api`), but never in a circle, which would make neither readable
/// alone (`lifecycle` took `ConfigArgs` from `worker`, which printed through `lifecycle`).
#[test]
fn the_command_line_modules_form_no_cycle() {
    let cli = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/cli");
    let files: Vec<_> = std::fs::read_dir(&cli)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "rs"))
        .collect();
    let siblings: BTreeSet<String> = files
        .iter()
        .filter_map(|p| p.file_stem()?.to_str().map(str::to_owned))
        .filter(|name| name != "mod")
        .collect();
    let mut graph = BTreeMap::new();
    for path in &files {
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        if name == "mod" {
            continue;
        }
        let text = std::fs::read_to_string(path).unwrap();
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        let mut uses = cli_references(code, &siblings);
        uses.remove(&name);
        graph.insert(name, uses);
    }
    assert!(graph.len() >= 10, "read src/cli/: {graph:?}");
    assert_eq!(
        find_cycle(&graph),
        None,
        "src/cli/ modules use each other in a circle"
    );
}

#[test]
fn the_cycle_finder_finds_the_old_one() {
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("lifecycle", vec!["worker"]),
        ("worker", vec!["lifecycle", "systemd"]),
        ("systemd", vec![]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.into_iter().map(String::from).collect()))
    .collect();
    assert_eq!(
        find_cycle(&graph),
        Some(vec![
            "lifecycle".to_owned(),
            "worker".to_owned(),
            "lifecycle".to_owned()
        ])
    );
}
