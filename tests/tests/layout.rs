//! The layout stays as ARCHITECTURE.md draws it: no module of the engine or of the workflows
//! crate imports a module that imports it back, directly or through others.
//!
//! Each source file is a module. Its edges are every path it names that starts at `crate::`,
//! `super::` or `self::` (in `use` items, types, expressions, patterns and macros' paths), and
//! `use child::…` of a child module it declares. A path is resolved to the module that defines
//! the item, following `pub use` re-exports, so `crate::Engine` counts as the module `Engine`
//! is written in. Not counted: a module declaring its children (`mod x;`) and re-exporting
//! their items, and `#[cfg(test)]` code (tests may reach anywhere).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use syn::visit::Visit;

/// A module: its path from the crate root (`["triggers", "webhook"]`) and its file.
#[derive(Debug)]
struct Module {
    file: PathBuf,
    /// Names of the items this module re-exports (`pub use a::b::C` → C → [a, b, C]), resolved
    /// to absolute paths.
    reexports: BTreeMap<String, Vec<String>>,
    /// Absolute paths the module names, with the line of each.
    uses: Vec<(Vec<String>, usize)>,
}

fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap();
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    let last = parts.pop().unwrap();
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" && stem != "lib" && stem != "main" {
        parts.push(stem.to_string());
    }
    parts
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

fn is_cfg_test(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        a.path().is_ident("cfg")
            && a.meta
                .require_list()
                .is_ok_and(|l| l.tokens.to_string().contains("test"))
    })
}

/// Makes a path written in module `here` absolute; `None` for a path outside the crate.
fn absolute(here: &[String], children: &BTreeSet<String>, segments: &[String]) -> Option<Vec<String>> {
    let first = segments.first()?;
    let mut base: Vec<String> = match first.as_str() {
        "crate" => Vec::new(),
        "self" => here.to_vec(),
        "super" => {
            let mut b = here.to_vec();
            let mut rest = segments;
            while rest.first().is_some_and(|s| s == "super") {
                b.pop();
                rest = &rest[1..];
            }
            b.extend(rest.iter().cloned());
            return Some(b);
        }
        name if children.contains(name) => {
            let mut b = here.to_vec();
            b.push(name.to_string());
            b.extend(segments[1..].iter().cloned());
            return Some(b);
        }
        _ => return None,
    };
    base.extend(segments[1..].iter().cloned());
    Some(base)
}

/// Flattens a `use` tree into the paths it names.
fn flatten(tree: &syn::UseTree, prefix: &mut Vec<String>, out: &mut Vec<(Vec<String>, Option<String>)>) {
    match tree {
        syn::UseTree::Path(p) => {
            prefix.push(p.ident.to_string());
            flatten(&p.tree, prefix, out);
            prefix.pop();
        }
        syn::UseTree::Name(n) => {
            let name = n.ident.to_string();
            let mut full = prefix.clone();
            if name != "self" {
                full.push(name.clone());
            }
            let alias = if name == "self" {
                prefix.last().cloned()
            } else {
                Some(name)
            };
            out.push((full, alias));
        }
        syn::UseTree::Rename(r) => {
            let mut full = prefix.clone();
            full.push(r.ident.to_string());
            out.push((full, Some(r.rename.to_string())));
        }
        syn::UseTree::Glob(_) => out.push((prefix.clone(), None)),
        syn::UseTree::Group(g) => {
            for t in &g.items {
                flatten(t, prefix, out);
            }
        }
    }
}

struct Collector<'a> {
    here: &'a [String],
    children: BTreeSet<String>,
    reexports: BTreeMap<String, Vec<String>>,
    uses: Vec<(Vec<String>, usize)>,
}

impl<'ast> Visit<'ast> for Collector<'_> {
    fn visit_item(&mut self, item: &'ast syn::Item) {
        let attrs: &[syn::Attribute] = match item {
            syn::Item::Mod(m) => &m.attrs,
            syn::Item::Fn(f) => &f.attrs,
            syn::Item::Impl(i) => &i.attrs,
            syn::Item::Use(u) => &u.attrs,
            syn::Item::Const(c) => &c.attrs,
            syn::Item::Static(s) => &s.attrs,
            _ => &[],
        };
        if is_cfg_test(attrs) {
            return;
        }
        if let syn::Item::Use(u) = item {
            let mut paths = Vec::new();
            flatten(&u.tree, &mut Vec::new(), &mut paths);
            let public = !matches!(u.vis, syn::Visibility::Inherited);
            let line = u.use_token.span.start().line;
            for (path, alias) in paths {
                let Some(abs) = absolute(self.here, &self.children, &path) else {
                    continue;
                };
                let into_descendant = abs.len() > self.here.len() && abs.starts_with(self.here);
                if public && into_descendant {
                    // A parent re-exporting its children's items: structure, not a dependency.
                    if let Some(alias) = alias {
                        self.reexports.insert(alias, abs);
                    }
                    continue;
                }
                if public && let Some(alias) = alias.clone() {
                    self.reexports.insert(alias, abs.clone());
                }
                self.uses.push((abs, line));
            }
            return;
        }
        syn::visit::visit_item(self, item);
    }

    fn visit_path(&mut self, path: &'ast syn::Path) {
        let segments: Vec<String> = path.segments.iter().map(|s| s.ident.to_string()).collect();
        if let Some(abs) = absolute(self.here, &self.children, &segments)
            && segments.len() > 1
        {
            let line = path.segments[0].ident.span().start().line;
            self.uses.push((abs, line));
        }
        syn::visit::visit_path(self, path);
    }

    fn visit_macro(&mut self, mac: &'ast syn::Macro) {
        // Paths inside macro calls (`format!`, `json!`, `tracing::info!`) are tokens; catch
        // the `crate::a::b` runs among them.
        let text = mac.tokens.to_string();
        for (i, _) in text.match_indices("crate ::") {
            let rest = &text[i..];
            let segs: Vec<String> = rest
                .split(" :: ")
                .map(|s| s.split_whitespace().next().unwrap_or("").to_string())
                .take_while(|s| !s.is_empty() && s.chars().all(|c| c.is_alphanumeric() || c == '_'))
                .collect();
            if segs.len() > 1 {
                self.uses
                    .push((segs[1..].to_vec(), mac.path.segments[0].ident.span().start().line));
            }
        }
        syn::visit::visit_macro(self, mac);
    }
}

fn read_crate(src: &Path) -> BTreeMap<Vec<String>, Module> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut modules = BTreeMap::new();
    for file in files {
        let here = module_path(src, &file);
        if file.file_name().is_some_and(|n| n == "main.rs") && file.parent() != Some(src) {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        let ast = syn::parse_file(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let children = ast
            .items
            .iter()
            .filter_map(|i| match i {
                syn::Item::Mod(m) if m.content.is_none() => Some(m.ident.to_string()),
                _ => None,
            })
            .collect();
        let mut c = Collector {
            here: &here,
            children,
            reexports: BTreeMap::new(),
            uses: Vec::new(),
        };
        c.visit_file(&ast);
        let (reexports, uses) = (c.reexports, c.uses);
        modules.insert(here, Module { file, reexports, uses });
    }
    modules
}

/// The module that defines what `path` names: its longest prefix that is a module, following
/// re-exports of the item after it.
fn resolve(modules: &BTreeMap<Vec<String>, Module>, path: &[String], depth: usize) -> Vec<String> {
    let mut n = path.len();
    while n > 0 && !modules.contains_key(&path[..n]) {
        n -= 1;
    }
    let module = path[..n].to_vec();
    if depth < 8
        && let Some(item) = path.get(n)
        && let Some(target) = modules[&module].reexports.get(item)
        && target.as_slice() != path
    {
        let mut next = target.clone();
        next.extend(path[n + 1..].iter().cloned());
        return resolve(modules, &next, depth + 1);
    }
    module
}

/// The import circles of the crate at `src`, each as its modules with one line per edge.
fn circles(src: &Path) -> Vec<String> {
    let modules = read_crate(src);
    let mut edges: BTreeMap<Vec<String>, BTreeMap<Vec<String>, String>> = BTreeMap::new();
    for (name, m) in &modules {
        for (path, line) in &m.uses {
            let target = resolve(&modules, path, 0);
            if &target == name || target.is_empty() && name.is_empty() {
                continue;
            }
            // A module reaching into its own descendants is how a parent uses its parts.
            edges
                .entry(name.clone())
                .or_default()
                .entry(target)
                .or_insert_with(|| format!("{}:{line}", m.file.display()));
        }
    }
    // Tarjan's strongly connected components, iteratively simple: for each pair, reachability.
    let names: Vec<&Vec<String>> = modules.keys().collect();
    let reach = |from: &Vec<String>| -> BTreeSet<Vec<String>> {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from.clone()];
        while let Some(n) = stack.pop() {
            for next in edges.get(&n).into_iter().flat_map(|e| e.keys()) {
                if seen.insert(next.clone()) {
                    stack.push(next.clone());
                }
            }
        }
        seen
    };
    let reachable: BTreeMap<&Vec<String>, BTreeSet<Vec<String>>> = names.iter().map(|n| (*n, reach(n))).collect();
    let mut done = BTreeSet::new();
    let mut out = Vec::new();
    for n in &names {
        if done.contains(*n) || !reachable[n].contains(*n) {
            continue;
        }
        let scc: Vec<&Vec<String>> = names
            .iter()
            .copied()
            .filter(|m| reachable[n].contains(*m) && reachable[m].contains(*n))
            .collect();
        let show = |m: &Vec<String>| {
            if m.is_empty() {
                "crate".to_string()
            } else {
                m.join("::")
            }
        };
        let mut lines = vec![format!(
            "circle: {}",
            scc.iter().map(|m| show(m)).collect::<Vec<_>>().join(", ")
        )];
        for a in &scc {
            for b in &scc {
                if let Some(at) = edges.get(*a).and_then(|e| e.get(*b)) {
                    lines.push(format!("  {} -> {}   ({at})", show(a), show(b)));
                }
            }
            done.insert((*a).clone());
        }
        out.push(lines.join("\n"));
    }
    out
}

fn crate_src(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../crates")
        .join(name)
        .join("src")
}

#[test]
fn no_module_of_the_engine_imports_one_that_imports_it_back() {
    let found = circles(&crate_src("engine"));
    assert!(
        found.is_empty(),
        "import circles in crates/engine:\n{}",
        found.join("\n")
    );
}

#[test]
fn no_module_of_the_workflows_imports_one_that_imports_it_back() {
    let found = circles(&crate_src("workflows"));
    assert!(
        found.is_empty(),
        "import circles in crates/workflows:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_check_finds_a_circle_when_there_is_one() {
    let dir = std::env::temp_dir().join(format!("layout-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("triggers")).unwrap();
    std::fs::write(dir.join("lib.rs"), "mod engine; mod triggers; pub use engine::Engine;").unwrap();
    std::fs::write(
        dir.join("engine.rs"),
        "pub struct Engine { s: crate::triggers::schedule::Schedule }",
    )
    .unwrap();
    std::fs::write(dir.join("triggers/mod.rs"), "pub mod schedule;").unwrap();
    std::fs::write(
        dir.join("triggers/schedule.rs"),
        "use crate::Engine; pub struct Schedule; fn f(_: &Engine) {}",
    )
    .unwrap();
    let found = circles(&dir);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].contains("engine -> triggers::schedule"), "{}", found[0]);
    assert!(found[0].contains("triggers::schedule -> engine"), "{}", found[0]);
}

/// Every line of the engine's sources outside `skip` that `matches`, as `file:line: text`.
fn engine_lines(skip: impl Fn(&Path) -> bool, matches: impl Fn(&str) -> bool) -> Vec<String> {
    let mut files = Vec::new();
    rust_files(&crate_src("engine"), &mut files);
    let mut found = Vec::new();
    for file in files.iter().filter(|f| !skip(f)) {
        let text = std::fs::read_to_string(file).unwrap();
        for (i, line) in text.lines().enumerate().filter(|(_, l)| matches(l)) {
            found.push(format!("{}:{}: {}", file.display(), i + 1, line.trim()));
        }
    }
    found
}

/// Routes are added only through `api::access::Routes`, which takes who may call each one: no
/// other file of the API adds a route of its own (`Router::route`, `.route_service`, `.nest`).
#[test]
fn every_route_is_added_with_its_access() {
    let found = engine_lines(
        |f| f.ends_with("api/access.rs"),
        |line| {
            [".route(", ".route_service(", ".nest(", ".nest_service("]
                .iter()
                .any(|call| line.contains(call))
        },
    );
    assert!(
        found.is_empty(),
        "routes added outside api::access::Routes:\n{}",
        found.join("\n")
    );
}

/// The engine's SQL lives in its store (`core/store/`, a module per concern), never in a
/// handler or a trigger.
#[test]
fn the_engines_sql_is_all_in_its_store() {
    let store = crate_src("engine").join("core/store");
    let found = engine_lines(|f| f.starts_with(&store), |line| line.contains("sqlx::query"));
    assert!(
        found.is_empty(),
        "SQL outside crates/engine/src/core/store:\n{}",
        found.join("\n")
    );
}
