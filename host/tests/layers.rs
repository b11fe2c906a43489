//! The host's layers, checked: a lower layer never names a higher one, and
//! no two of the host's modules import each other, directly or in a circle.
//!
//! The layers are the top-level modules that `host/src/lib.rs` declares,
//! lowest first. A module may name modules of its own layer and of the
//! layers declared before it. Modules name each other by `crate::` paths
//! (a `super::` that leaves its file is refused, so that no path escapes the
//! check); the paths are read from the source text, comments and string
//! literals left out, and each is resolved to the longest module it names.
//!
//! Run alone: `cargo test -p quiet-host --test layers`.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

/// A module path inside the crate, such as `["engine", "scheduler"]`.
type ModPath = Vec<String>;

/// One reference from a module to another, where it was found.
struct Edge {
    to: ModPath,
    line: usize,
}

/// What was found wrong, one line each.
fn check(src: &Path) -> Vec<String> {
    let layers = declared_modules(&src.join("lib.rs"));
    let modules = modules(src);
    let mut problems = Vec::new();
    let mut graph: BTreeMap<ModPath, BTreeSet<ModPath>> = BTreeMap::new();
    for (module, file) in &modules {
        let text = fs::read_to_string(file).expect("reading a source file");
        let code = strip_comments_and_strings(&text);
        for line in escaping_supers(&code, file.ends_with("mod.rs")) {
            problems.push(format!(
                "{}:{line}: `super::` leaves the file; name other modules by `crate::` paths",
                file.display()
            ));
        }
        for edge in references(&code, &modules) {
            // A module may name itself, and its own submodules.
            if edge.to.starts_with(module) || module.starts_with(&edge.to) {
                continue;
            }
            let (from_layer, to_layer) = (rank(&layers, module), rank(&layers, &edge.to));
            if to_layer > from_layer {
                problems.push(format!(
                    "{}:{}: {} names {}, a higher layer",
                    file.display(),
                    edge.line,
                    join(module),
                    join(&edge.to)
                ));
            }
            graph.entry(module.clone()).or_default().insert(edge.to);
        }
    }
    for component in cycles(&graph) {
        let names: Vec<String> = shortest_cycle(&graph, &component)
            .iter()
            .map(join)
            .collect();
        problems.push(format!(
            "import cycle: {} -> {} ({} modules import each other in all)",
            names.join(" -> "),
            names[0],
            component.len()
        ));
    }
    problems
}

fn join(m: &ModPath) -> String {
    match m.is_empty() {
        true => "crate".into(),
        false => m.join("::"),
    }
}

/// Where a module's layer comes in `layers` (the crate root counts as the
/// top, so that it may name every layer).
fn rank(layers: &[String], m: &ModPath) -> usize {
    m.first()
        .and_then(|l| layers.iter().position(|x| x == l))
        .unwrap_or(layers.len())
}

/// The `mod` items of `lib.rs`, in order.
fn declared_modules(lib: &Path) -> Vec<String> {
    let text = fs::read_to_string(lib).expect("reading lib.rs");
    strip_comments_and_strings(&text)
        .lines()
        .filter_map(|l| {
            let l = l.trim().trim_start_matches("pub ");
            let name = l.strip_prefix("mod ")?.strip_suffix(';')?;
            Some(name.trim().to_string())
        })
        .collect()
}

/// Every module of the library under `src`, with its file (`main.rs` is
/// the binary, not part of the library).
fn modules(src: &Path) -> BTreeMap<ModPath, PathBuf> {
    fn walk(dir: &Path, src: &Path, out: &mut BTreeMap<ModPath, PathBuf>) {
        for entry in fs::read_dir(dir).expect("reading a source folder") {
            let path = entry.expect("a folder entry").path();
            if path.is_dir() {
                walk(&path, src, out);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") || path == src.join("main.rs") {
                continue;
            }
            let rel = path
                .strip_prefix(src)
                .expect("under src")
                .with_extension("");
            let mut parts: ModPath = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
                parts.pop();
            }
            out.insert(parts, path);
        }
    }
    let mut out = BTreeMap::new();
    walk(src, src, &mut out);
    out
}

/// `text` with comments and the insides of string and char literals
/// blanked out, lines kept where they were.
fn strip_comments_and_strings(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let blank = |out: &mut Vec<u8>, c: u8| out.push(if c == b'\n' { b'\n' } else { b' ' });
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            let mut depth = 0;
            while i < b.len() {
                if b[i..].starts_with(b"/*") {
                    depth += 1;
                    i += 2;
                    out.extend_from_slice(b"  ");
                } else if b[i..].starts_with(b"*/") {
                    depth -= 1;
                    i += 2;
                    out.extend_from_slice(b"  ");
                    if depth == 0 {
                        break;
                    }
                } else {
                    blank(&mut out, b[i]);
                    i += 1;
                }
            }
        } else if b[i] == b'r' && matches!(b.get(i + 1), Some(b'"' | b'#')) && raw_start(b, i) {
            // A raw string: r"…", r#"…"#, …
            let hashes = b[i + 1..].iter().take_while(|&&c| c == b'#').count();
            let mut end = b"\"".to_vec();
            end.extend(std::iter::repeat_n(b'#', hashes));
            i += 2 + hashes;
            while i < b.len() && !b[i..].starts_with(&end) {
                blank(&mut out, b[i]);
                i += 1;
            }
            i += end.len();
            out.extend_from_slice(b"\"\"");
        } else if b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    blank(&mut out, b[i]);
                    i += 1;
                }
                if i < b.len() {
                    blank(&mut out, b[i]);
                    i += 1;
                }
            }
            i += 1;
            out.extend_from_slice(b"\"\"");
        } else if b[i] == b'\'' {
            // A char literal ('x', '\n', '"'), or else a lifetime.
            let len = match (b.get(i + 1), b.get(i + 2)) {
                (Some(b'\\'), _) => b[i + 2..].iter().position(|&c| c == b'\'').map(|p| p + 3),
                (Some(_), Some(b'\'')) => Some(3),
                _ => None,
            };
            match len {
                Some(n) => {
                    out.extend_from_slice(b"' '");
                    i += n;
                }
                None => {
                    out.push(b'\'');
                    i += 1;
                }
            }
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether the `r` at `i` starts a raw string rather than ends a name.
fn raw_start(b: &[u8], i: usize) -> bool {
    let name_before = i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_');
    let rest = &b[i + 1..];
    let quote_after_hashes = rest.iter().find(|&&c| c != b'#') == Some(&b'"');
    !name_before && quote_after_hashes
}

/// Lines whose `super::` refers to a module outside the file: one at the
/// top level of a file that is not a folder's `mod.rs`, or `super::super`.
fn escaping_supers(code: &str, is_mod_rs: bool) -> Vec<usize> {
    code.lines()
        .enumerate()
        .filter(|(_, l)| {
            l.contains("super::super")
                || (!is_mod_rs && !l.starts_with(char::is_whitespace) && l.contains("super::"))
        })
        .map(|(n, _)| n + 1)
        .collect()
}

/// The modules that `code` names through `crate::` paths (use trees
/// included), resolved to the longest module of `modules` each names.
fn references(code: &str, modules: &BTreeMap<ModPath, PathBuf>) -> Vec<Edge> {
    let mut out = Vec::new();
    let b = code.as_bytes();
    let mut from = 0;
    while let Some(at) = code[from..].find("crate::") {
        let start = from + at;
        from = start + "crate::".len();
        // `$crate` in a macro, or a name ending in `crate`.
        if start > 0
            && (b[start - 1] == b'$'
                || b[start - 1].is_ascii_alphanumeric()
                || b[start - 1] == b'_')
        {
            continue;
        }
        let line = code[..start].matches('\n').count() + 1;
        let mut paths = Vec::new();
        use_tree(b, from, Vec::new(), &mut paths);
        for path in paths {
            let longest = (1..=path.len())
                .rev()
                .map(|n| path[..n].to_vec())
                .find(|p| modules.contains_key(p));
            if let Some(to) = longest {
                out.push(Edge { to, line });
            }
        }
    }
    out
}

/// Reads the use tree (or plain path) at `b[i..]`, pushing each full path
/// onto `out`; returns where it ended.
fn use_tree(b: &[u8], mut i: usize, prefix: ModPath, out: &mut Vec<ModPath>) -> usize {
    let skip_ws = |mut i: usize| {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        i
    };
    i = skip_ws(i);
    if b.get(i) == Some(&b'{') {
        i += 1;
        loop {
            i = skip_ws(i);
            match b.get(i) {
                None => return i,
                Some(b'}') => return i + 1,
                Some(b',') => i += 1,
                Some(_) => {
                    let next = use_tree(b, i, prefix.clone(), out);
                    if next == i {
                        return i;
                    }
                    i = next;
                }
            }
        }
    }
    let name_end = b[i..]
        .iter()
        .position(|&c| !(c.is_ascii_alphanumeric() || c == b'_'))
        .map_or(b.len(), |p| i + p);
    if name_end == i {
        // `*`, or the end of the path.
        if !prefix.is_empty() {
            out.push(prefix);
        }
        return i + usize::from(b.get(i) == Some(&b'*'));
    }
    let mut path = prefix;
    path.push(String::from_utf8_lossy(&b[i..name_end]).into_owned());
    if b[name_end..].starts_with(b"::") {
        return use_tree(b, name_end + 2, path, out);
    }
    out.push(path);
    name_end
}

/// The import cycles of `graph`, each once, as the modules in it (its
/// strongly connected components of more than one module).
fn cycles(graph: &BTreeMap<ModPath, BTreeSet<ModPath>>) -> Vec<Vec<ModPath>> {
    // Tarjan's algorithm, on a graph of a few dozen modules.
    struct Tarjan<'g> {
        graph: &'g BTreeMap<ModPath, BTreeSet<ModPath>>,
        index: BTreeMap<&'g ModPath, usize>,
        low: BTreeMap<&'g ModPath, usize>,
        stack: Vec<&'g ModPath>,
        out: Vec<Vec<ModPath>>,
    }
    impl<'g> Tarjan<'g> {
        fn visit(&mut self, v: &'g ModPath) {
            let n = self.index.len();
            self.index.insert(v, n);
            self.low.insert(v, n);
            self.stack.push(v);
            for w in self.graph.get(v).into_iter().flatten() {
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let low = self.low[v].min(self.low[w]);
                    self.low.insert(v, low);
                } else if self.stack.contains(&w) {
                    let low = self.low[v].min(self.index[w]);
                    self.low.insert(v, low);
                }
            }
            if self.low[v] == self.index[v] {
                let at = self
                    .stack
                    .iter()
                    .rposition(|m| *m == v)
                    .expect("on the stack");
                let component: Vec<ModPath> = self.stack.drain(at..).cloned().collect();
                if component.len() > 1 {
                    self.out.push(component);
                }
            }
        }
    }
    let mut t = Tarjan {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !t.index.contains_key(v) {
            t.visit(v);
        }
    }
    t.out
}

/// The shortest cycle through the first module of `component`, a strongly
/// connected component of `graph`, found breadth first.
fn shortest_cycle(
    graph: &BTreeMap<ModPath, BTreeSet<ModPath>>,
    component: &[ModPath],
) -> Vec<ModPath> {
    let start = &component[0];
    let mut came_from: BTreeMap<&ModPath, &ModPath> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([start]);
    while let Some(v) = queue.pop_front() {
        for w in graph.get(v).into_iter().flatten() {
            if !component.contains(w) {
                continue;
            }
            if w == start {
                let mut path = vec![v.clone()];
                let mut at = v;
                while at != start {
                    at = came_from[at];
                    path.push(at.clone());
                }
                path.reverse();
                return path;
            }
            if !came_from.contains_key(w) {
                came_from.insert(w, v);
                queue.push_back(w);
            }
        }
    }
    component.to_vec()
}

#[test]
fn no_layer_names_a_higher_one_and_no_modules_import_each_other_in_a_circle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let problems = check(&src);
    assert!(
        problems.is_empty(),
        "the host's layers are broken:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_check_finds_an_upward_import_a_cycle_and_an_escaping_super() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path();
    let write = |path: &str, text: &str| {
        let path = src.join(path);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    };
    write("lib.rs", "pub mod low;\npub mod high;\n");
    write("low/mod.rs", "pub mod a;\npub mod b;\n");
    // An upward import, and a and b naming each other through a use tree
    // and an expression path.
    write(
        "low/a.rs",
        "use crate::{high::top::Top, low::b};\nfn f() { b::g() }\n",
    );
    write(
        "low/b.rs",
        "// crate::high::top in a comment does not count\n\
         const S: &str = \"crate::high::top\";\n\
         pub fn g() { crate::low::a::f() }\n",
    );
    write("high/mod.rs", "pub mod other;\npub mod top;\n");
    write("high/top.rs", "use super::other;\npub struct Top;\n");
    write("high/other.rs", "fn ok() { crate::low::b::g() }\n");
    let problems = check(src);
    let found = |what: &str| problems.iter().any(|p| p.contains(what));
    assert!(
        found("low::a names high::top, a higher layer"),
        "{problems:#?}"
    );
    assert!(
        found("import cycle: low::a -> low::b -> low::a (2 modules")
            || found("import cycle: low::b -> low::a -> low::b (2 modules"),
        "{problems:#?}"
    );
    assert!(
        found("top.rs:1: `super::` leaves the file"),
        "{problems:#?}"
    );
    // Neither the comment nor the string in b, nor other's downward use.
    assert_eq!(problems.len(), 3, "{problems:#?}");
}
