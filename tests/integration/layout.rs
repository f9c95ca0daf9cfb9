//! The product's layout keeps its one-way streets: the top-level modules of `src/` form no
//! import cycle, and each depends only on the layers below it (the order ARCHITECTURE.md draws).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The layers of `src/`, top first; a module may use modules of its own layer's lower
/// neighbours and below, never above. Within a layer, modules do not use each other.
const LAYERS: &[&[&str]] = &[
    &["bridge", "fuzzing"],
    &["http"],
    &["fleet"],
    &["mo", "mt", "provision"],
    &["devices"],
    &["delivery"],
    &["socket", "store", "t8"],
    &["exchange", "metrics", "onboarding", "queue", "reachability"],
    &["config"],
    &["routing"],
    &["coap", "identity", "clock"],
];

/// `module -> modules it names as crate::X`, leaving out `#[cfg(test)] mod tests` blocks.
fn dependencies() -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut pending = vec![src.clone()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let relative = path.strip_prefix(&src).unwrap();
            let top = relative
                .components()
                .next()
                .unwrap()
                .as_os_str()
                .to_string_lossy()
                .trim_end_matches(".rs")
                .to_string();
            if top == "lib" || top == "main" {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let code = text
                .split("#[cfg(test)]\nmod tests")
                .next()
                .unwrap_or_default();
            let used = graph.entry(top.clone()).or_default();
            for (index, _) in code.match_indices("crate::") {
                let name: String = code[index + "crate::".len()..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                    .collect();
                assert!(
                    !name.is_empty(),
                    "{}: name modules one by one (`use crate::{{..}}` hides edges)",
                    path.display()
                );
                if name != top {
                    used.insert(name);
                }
            }
        }
    }
    graph
}

fn layer_of(module: &str) -> usize {
    LAYERS
        .iter()
        .position(|layer| layer.contains(&module))
        .unwrap_or_else(|| panic!("module {module} is not in LAYERS (tests/integration/layout.rs)"))
}

#[test]
fn top_level_modules_depend_only_downwards() {
    let graph = dependencies();
    assert!(graph.contains_key("bridge") && graph.contains_key("mt"));
    for (module, used) in &graph {
        let own = layer_of(module);
        for dependency in used {
            assert!(
                layer_of(dependency) > own,
                "{module} (layer {own}) uses {dependency} (layer {}): dependencies point down",
                layer_of(dependency)
            );
        }
    }
}

#[test]
fn there_is_no_import_cycle() {
    let graph = dependencies();
    // Depth-first search with colours: reaching a grey module again is a cycle.
    fn visit<'a>(
        module: &'a str,
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        grey: &mut Vec<&'a str>,
        black: &mut BTreeSet<&'a str>,
    ) {
        if black.contains(module) {
            return;
        }
        if let Some(start) = grey.iter().position(|m| *m == module) {
            panic!("import cycle: {} -> {module}", grey[start..].join(" -> "));
        }
        grey.push(module);
        for next in graph.get(module).into_iter().flatten() {
            visit(next, graph, grey, black);
        }
        grey.pop();
        black.insert(module);
    }
    let mut black = BTreeSet::new();
    for module in graph.keys() {
        visit(module, &graph, &mut Vec::new(), &mut black);
    }
}
