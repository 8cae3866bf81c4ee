//! The module graph of one crate, read from its sources, and the import cycles in it.
//!
//! Each file is a module (`lib.rs` the root, `a.rs` or `a/mod.rs` the module `a`, `a/b.rs` the
//! module `a::b`). An edge is a reference from one file to another module: a `use` item or an
//! inline path that starts with `crate::`, `super::` or `self::` (or a child module's name).
//! A `mod x;` declaration is not an edge, and neither is a reference between a module and one
//! of its ancestors (a child naming its parent's items, a parent re-exporting a child's). The
//! other edges are lifted to the two sibling modules under the nearest common ancestor, so
//! `policy::sucb -> feasibility` becomes `policy -> feasibility`. A path that names an item a
//! module re-exports with `pub use` leads to the module the item comes from. Comments, strings
//! and character literals are skipped, and so are `#[cfg(test)]` modules (unit tests may use
//! any module); `super` inside another inline module means the file's own module.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// A module inside a crate, e.g. `["policy", "sucb"]`; the crate root is empty.
pub type ModPath = Vec<String>;

/// The module of a source file from its path relative to `src/` (`None` for non-Rust files).
pub fn module_of(rel: &str) -> Option<ModPath> {
    let stem = rel.strip_suffix(".rs")?;
    let mut parts: ModPath = stem.split('/').map(String::from).collect();
    if parts.len() == 1 && parts[0] == "lib" {
        parts.clear();
    } else if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    Some(parts)
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Ident(String),
    PathSep,
    Punct(char),
}

/// Identifiers, `::` and single punctuation characters with their line numbers; comments,
/// string and character literals, numbers and lifetimes leave nothing behind.
fn tokens(src: &str) -> Vec<(Tok, usize)> {
    let b: Vec<char> = src.chars().collect();
    let at = |i: usize| b.get(i).copied().unwrap_or('\0');
    let (mut i, mut line, mut out) = (0, 1, Vec::new());
    // Skips to just past the closing `"` (honouring escapes), counting newlines.
    let skip_string = |mut i: usize, line: &mut usize| {
        while i < b.len() && b[i] != '"' {
            if b[i] == '\\' {
                i += 1;
            }
            if at(i) == '\n' {
                *line += 1;
            }
            i += 1;
        }
        i + 1
    };
    while i < b.len() {
        let c = b[i];
        if c == '\n' {
            line += 1;
            i += 1;
        } else if c.is_whitespace() {
            i += 1;
        } else if c == '/' && at(i + 1) == '/' {
            while i < b.len() && b[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && at(i + 1) == '*' {
            let mut depth = 1;
            i += 2;
            while i < b.len() && depth > 0 {
                if b[i] == '/' && at(i + 1) == '*' {
                    depth += 1;
                    i += 2;
                } else if b[i] == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    i += 2;
                } else {
                    line += usize::from(b[i] == '\n');
                    i += 1;
                }
            }
        } else if let Some(end) = raw_string_end(&b, i) {
            line += b[i..end].iter().filter(|&&ch| ch == '\n').count();
            i = end;
        } else if c == '"' {
            i = skip_string(i + 1, &mut line);
        } else if c == 'b' && at(i + 1) == '"' {
            i = skip_string(i + 2, &mut line);
        } else if c == '\'' || (c == 'b' && at(i + 1) == '\'') {
            let q = if c == 'b' { i + 1 } else { i };
            if at(q + 1) == '\\' {
                // An escaped character literal: up to the next quote after the escape.
                let mut j = q + 3;
                while j < b.len() && b[j] != '\'' {
                    j += 1;
                }
                i = j + 1;
            } else if at(q + 2) == '\'' {
                i = q + 3;
            } else {
                // A lifetime or label: its name follows as an identifier, which is harmless.
                i = q + 1;
            }
        } else if c.is_alphabetic() || c == '_' {
            let start = if c == 'r' && at(i + 1) == '#' {
                i + 2
            } else {
                i
            };
            let mut j = start;
            while j < b.len() && (b[j].is_alphanumeric() || b[j] == '_') {
                j += 1;
            }
            out.push((Tok::Ident(b[start..j].iter().collect()), line));
            i = j.max(i + 1);
        } else if c.is_ascii_digit() {
            while i < b.len() && (b[i].is_alphanumeric() || b[i] == '_') {
                i += 1;
            }
        } else if c == ':' && at(i + 1) == ':' {
            out.push((Tok::PathSep, line));
            i += 2;
        } else {
            out.push((Tok::Punct(c), line));
            i += 1;
        }
    }
    out
}

/// If a raw (byte) string literal starts at `i`, the index just past it.
fn raw_string_end(b: &[char], i: usize) -> Option<usize> {
    let mut j = i;
    if b.get(j) == Some(&'b') {
        j += 1;
    }
    if b.get(j) != Some(&'r') {
        return None;
    }
    j += 1;
    let hashes = b[j..].iter().take_while(|&&c| c == '#').count();
    j += hashes;
    if b.get(j) != Some(&'"') {
        return None;
    }
    j += 1;
    while j < b.len() {
        if b[j] == '"'
            && b[j + 1..]
                .iter()
                .take(hashes)
                .filter(|&&c| c == '#')
                .count()
                == hashes
        {
            return Some(j + 1 + hashes);
        }
        j += 1;
    }
    Some(b.len())
}

/// One path a file refers to.
#[derive(Clone, Debug, PartialEq)]
struct Reference {
    /// Inline modules (`mod tests { .. }`) around the reference, innermost last.
    scope: Vec<String>,
    path: Vec<String>,
    glob: bool,
    line: usize,
    /// For a `pub use` (any visibility), the name it makes visible in the module.
    exported_as: Option<String>,
}

fn ident(toks: &[(Tok, usize)], i: usize) -> Option<&str> {
    match toks.get(i) {
        Some((Tok::Ident(s), _)) => Some(s),
        _ => None,
    }
}

fn is(toks: &[(Tok, usize)], i: usize, t: &Tok) -> bool {
    toks.get(i).is_some_and(|(x, _)| x == t)
}

/// Expands one use tree starting at `*pos` into full paths with the names they bind.
fn use_tree(
    toks: &[(Tok, usize)],
    pos: &mut usize,
    prefix: Vec<String>,
    out: &mut Vec<(Vec<String>, bool, String)>,
) {
    let mut path = prefix;
    loop {
        match toks.get(*pos).map(|t| &t.0) {
            Some(Tok::PathSep) => *pos += 1,
            Some(Tok::Ident(s)) => {
                path.push(s.clone());
                *pos += 1;
                if is(toks, *pos, &Tok::PathSep) {
                    *pos += 1;
                } else {
                    break;
                }
            }
            Some(Tok::Punct('*')) => {
                *pos += 1;
                out.push((path, true, String::new()));
                return;
            }
            Some(Tok::Punct('{')) => {
                *pos += 1;
                while *pos < toks.len() && !is(toks, *pos, &Tok::Punct('}')) {
                    let before = *pos;
                    use_tree(toks, pos, path.clone(), out);
                    if is(toks, *pos, &Tok::Punct(',')) || *pos == before {
                        *pos += 1;
                    }
                }
                *pos += 1;
                return;
            }
            _ => return,
        }
    }
    if path.len() > 1 && path.last().is_some_and(|s| s == "self") {
        path.pop();
    }
    let mut name = path.last().cloned().unwrap_or_default();
    if ident(toks, *pos) == Some("as") {
        name = ident(toks, *pos + 1).unwrap_or("_").to_string();
        *pos += 2;
    }
    out.push((path, false, name));
}

/// Whether the `use` at `i` is preceded by a visibility (`pub`, `pub(crate)`, ...).
fn is_pub(toks: &[(Tok, usize)], i: usize) -> bool {
    if i >= 1 && ident(toks, i - 1) == Some("pub") {
        return true;
    }
    if i >= 1 && is(toks, i - 1, &Tok::Punct(')')) {
        let open = (0..i - 1).rev().find(|&k| is(toks, k, &Tok::Punct('(')));
        return open.is_some_and(|k| k >= 1 && ident(toks, k - 1) == Some("pub"));
    }
    false
}

/// Whether the item whose keyword is at `i` carries `#[cfg(test)]` among its attributes.
fn cfg_test_before(toks: &[(Tok, usize)], i: usize) -> bool {
    let cfg_test = [
        Tok::Ident("cfg".into()),
        Tok::Punct('('),
        Tok::Ident("test".into()),
        Tok::Punct(')'),
    ];
    let mut k = i;
    // Step back over a visibility, then over each `#[...]`.
    if k >= 1 && ident(toks, k - 1) == Some("pub") {
        k -= 1;
    }
    while k >= 1 && is(toks, k - 1, &Tok::Punct(']')) {
        let Some(open) = (0..k - 1).rev().find(|&j| is(toks, j, &Tok::Punct('['))) else {
            return false;
        };
        if toks[open + 1..k - 1]
            .iter()
            .map(|t| &t.0)
            .eq(cfg_test.iter())
        {
            return true;
        }
        if open == 0 || !is(toks, open - 1, &Tok::Punct('#')) {
            return false;
        }
        k = open - 1;
    }
    false
}

/// The index just past the block whose `{` is at `open`.
fn block_end(toks: &[(Tok, usize)], open: usize) -> usize {
    let mut depth = 0usize;
    for (k, (t, _)) in toks.iter().enumerate().skip(open) {
        match t {
            Tok::Punct('{') => depth += 1,
            Tok::Punct('}') => {
                depth -= 1;
                if depth == 0 {
                    return k + 1;
                }
            }
            _ => {}
        }
    }
    toks.len()
}

/// The names of the out-of-line modules a file declares under `#[cfg(test)]` (`mod x;`).
fn test_modules(src: &str) -> Vec<String> {
    let toks = tokens(src);
    (0..toks.len())
        .filter(|&i| {
            matches!(&toks[i].0, Tok::Ident(kw) if kw == "mod")
                && is(&toks, i + 2, &Tok::Punct(';'))
                && cfg_test_before(&toks, i)
        })
        .filter_map(|i| ident(&toks, i + 1).map(String::from))
        .collect()
}

/// Every `use` path and every inline `crate::`/`super::`/`self::` path in one file.
fn references(src: &str) -> Vec<Reference> {
    let toks = tokens(src);
    let mut out = Vec::new();
    let (mut depth, mut scope) = (0usize, Vec::<(String, usize)>::new());
    let mut i = 0;
    while i < toks.len() {
        let names = || scope.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
        match &toks[i].0 {
            Tok::Punct('{') => depth += 1,
            Tok::Punct('}') => {
                if scope.last().is_some_and(|&(_, d)| d == depth) {
                    scope.pop();
                }
                depth = depth.saturating_sub(1);
            }
            Tok::Ident(kw) if kw == "mod" && is(&toks, i + 2, &Tok::Punct('{')) => {
                if cfg_test_before(&toks, i) {
                    // Unit tests may use any module of the crate: not part of the graph.
                    i = block_end(&toks, i + 2);
                    continue;
                }
                if let Some(name) = ident(&toks, i + 1) {
                    scope.push((name.to_string(), depth + 1));
                }
            }
            Tok::Ident(kw) if kw == "use" => {
                let (line, exported) = (toks[i].1, is_pub(&toks, i));
                let mut pos = i + 1;
                let mut trees = Vec::new();
                use_tree(&toks, &mut pos, Vec::new(), &mut trees);
                for (path, glob, name) in trees {
                    out.push(Reference {
                        scope: names(),
                        path,
                        glob,
                        line,
                        exported_as: (exported && !glob).then_some(name),
                    });
                }
                while pos < toks.len() && !is(&toks, pos, &Tok::Punct(';')) {
                    pos += 1;
                }
                i = pos;
                continue;
            }
            Tok::Ident(head)
                if ["crate", "super", "self"].contains(&head.as_str())
                    && is(&toks, i + 1, &Tok::PathSep)
                    && !(i >= 1 && is(&toks, i - 1, &Tok::PathSep)) =>
            {
                let mut path = vec![head.clone()];
                let mut j = i + 1;
                while is(&toks, j, &Tok::PathSep) {
                    match ident(&toks, j + 1) {
                        Some(s) => path.push(s.to_string()),
                        None => break,
                    }
                    j += 2;
                }
                out.push(Reference {
                    scope: names(),
                    path,
                    glob: false,
                    line: toks[i].1,
                    exported_as: None,
                });
                i = j;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    out
}

/// A crate's modules and what each file refers to.
pub struct Crate {
    files: BTreeMap<ModPath, (String, Vec<Reference>)>,
}

/// Two modules, each a child of their nearest common ancestor, with one reference that made
/// the edge (`file:line path`).
type Edges = BTreeMap<(ModPath, ModPath), String>;

fn show(m: &[String]) -> String {
    if m.is_empty() {
        "crate".into()
    } else {
        m.join("::")
    }
}

impl Crate {
    /// `files`: (path relative to `src/`, text) of the library's files.
    pub fn new(files: &[(String, String)]) -> Crate {
        // Files of unit tests declared out of line (`#[cfg(test)] mod tests;`) are left out
        // as inline test modules are: unit tests may use any module of the crate.
        let tests: Vec<ModPath> = files
            .iter()
            .filter_map(|(rel, text)| Some((module_of(rel)?, text)))
            .flat_map(|(m, text)| {
                test_modules(text).into_iter().map(move |name| {
                    let mut c = m.clone();
                    c.push(name);
                    c
                })
            })
            .collect();
        let files = files
            .iter()
            .filter_map(|(rel, text)| Some((module_of(rel)?, (rel.clone(), references(text)))))
            .filter(|(m, _)| !tests.iter().any(|t| m.starts_with(t)))
            .collect();
        Crate { files }
    }

    /// The longest prefix of `m` that is a file's module.
    fn known(&self, m: &[String]) -> ModPath {
        let mut m = m.to_vec();
        while !m.is_empty() && !self.files.contains_key(&m) {
            m.pop();
        }
        m
    }

    /// The module `path` (seen from module `from`, inline scopes included) refers to, if it
    /// refers into this crate; `depth` bounds re-export chains.
    fn resolve(
        &self,
        from: &[String],
        path: &[String],
        glob: bool,
        depth: usize,
    ) -> Option<ModPath> {
        let first = path.first()?;
        let (mut cur, rest) = match first.as_str() {
            "crate" => (Vec::new(), &path[1..]),
            "self" => (from.to_vec(), &path[1..]),
            "super" => {
                let supers = path.iter().take_while(|s| *s == "super").count();
                let mut base = from.to_vec();
                for _ in 0..supers {
                    base.pop()?;
                }
                (base, &path[supers..])
            }
            _ => {
                let own = self.known(from);
                let mut child = own.clone();
                child.push(first.clone());
                if !self.files.contains_key(&child) {
                    return None;
                }
                (own, path)
            }
        };
        let mut k = 0;
        while k < rest.len() {
            let mut next = cur.clone();
            next.push(rest[k].clone());
            if !self.files.contains_key(&next) && !from.starts_with(&next) {
                break;
            }
            cur = next;
            k += 1;
        }
        let module = self.known(&cur);
        if k < rest.len() && !(glob && k + 1 == rest.len()) && depth < 8 {
            if let Some(target) = self.reexport(&module, &rest[k], depth + 1) {
                return Some(target);
            }
        }
        Some(module)
    }

    /// Where the item `name` that `module` re-exports comes from.
    fn reexport(&self, module: &ModPath, name: &str, depth: usize) -> Option<ModPath> {
        let (_, refs) = self.files.get(module)?;
        let r = refs
            .iter()
            .find(|r| r.scope.is_empty() && r.exported_as.as_deref() == Some(name))?;
        self.resolve(module, &r.path, r.glob, depth)
    }

    fn edges(&self) -> Edges {
        let mut edges = Edges::new();
        for (module, (rel, refs)) in &self.files {
            for r in refs {
                let from: ModPath = module.iter().chain(&r.scope).cloned().collect();
                let Some(target) = self.resolve(&from, &r.path, r.glob, 0) else {
                    continue;
                };
                let common = module
                    .iter()
                    .zip(&target)
                    .take_while(|(a, b)| a == b)
                    .count();
                if common == module.len() || common == target.len() {
                    continue;
                }
                edges
                    .entry((module[..=common].to_vec(), target[..=common].to_vec()))
                    .or_insert_with(|| format!("{rel}:{} {}", r.line, r.path.join("::")));
            }
        }
        edges
    }

    /// Each cycle as `a -> b -> a`, with the reference behind every step.
    pub fn cycles(&self) -> Vec<String> {
        let edges = self.edges();
        let mut next: BTreeMap<&ModPath, Vec<&ModPath>> = BTreeMap::new();
        for (a, b) in edges.keys() {
            next.entry(a).or_default().push(b);
        }
        let mut seen: BTreeSet<BTreeSet<&ModPath>> = BTreeSet::new();
        let mut out = Vec::new();
        for (a, b) in edges.keys() {
            // The shortest way back from `b` to `a` closes a cycle through the edge `a -> b`.
            let mut prev: BTreeMap<&ModPath, &ModPath> = BTreeMap::new();
            let mut queue = VecDeque::from([b]);
            while let Some(n) = queue.pop_front() {
                if n == a {
                    break;
                }
                for m in next.get(n).into_iter().flatten() {
                    if *m != b && !prev.contains_key(m) {
                        prev.insert(m, n);
                        queue.push_back(m);
                    }
                }
            }
            if !prev.contains_key(a) {
                continue;
            }
            let mut ring = vec![a];
            let mut n = a;
            while n != b {
                n = prev[n];
                ring.push(n);
            }
            ring.reverse();
            ring.insert(0, a);
            let members: BTreeSet<&ModPath> = ring.iter().copied().collect();
            if !seen.insert(members) {
                continue;
            }
            let steps: Vec<String> = ring
                .windows(2)
                .map(|w| edges[&(w[0].clone(), w[1].clone())].clone())
                .collect();
            let names: Vec<String> = ring.iter().map(|m| show(m)).collect();
            out.push(format!("{} (via {})", names.join(" -> "), steps.join("; ")));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cycles(files: &[(&str, &str)]) -> Vec<String> {
        let files: Vec<(String, String)> = files
            .iter()
            .map(|(p, t)| (p.to_string(), t.to_string()))
            .collect();
        Crate::new(&files).cycles()
    }

    #[test]
    fn parents_children_and_inline_test_modules_are_not_cycles() {
        let found = cycles(&[
            ("lib.rs", "pub mod a;\npub mod b;\npub use a::{A, Tr};\n"),
            ("a/mod.rs", "mod x;\npub use x::X;\npub trait Tr {}\npub struct A;\n"),
            (
                "a/x.rs",
                "use super::Tr;\nuse crate::a::A;\npub struct X;\n#[cfg(test)]\n#[allow(unused)]\nmod tests {\n    use crate::b::*;\n}\n",
            ),
            (
                "b.rs",
                "use crate::a::X;\nfn f() {}\nmod inner {\n    use super::*;\n    use super::f;\n}\n#[cfg(test)]\nmod tests;\n",
            ),
            // An out-of-line test module may import its parent's dependents too.
            ("b/tests.rs", "use crate::a::X;\nuse crate::c::C;\n"),
            ("c.rs", "use crate::b::*;\npub struct C;\n"),
        ]);
        assert!(found.is_empty(), "{found:?}");
        // A module declared without `#[cfg(test)]` still counts.
        let found = cycles(&[
            ("lib.rs", "pub mod b;\npub mod c;\n"),
            ("b.rs", "mod helpers;\n"),
            ("b/helpers.rs", "use crate::c::C;\n"),
            ("c.rs", "use crate::b::*;\npub struct C;\n"),
        ]);
        assert_eq!(found.len(), 1, "{found:?}");
    }

    #[test]
    fn sibling_cycles_are_found_through_paths_and_reexports() {
        let found = cycles(&[
            ("lib.rs", "pub mod a;\npub mod b;\npub use b::B;\n"),
            ("a/mod.rs", "mod x;\n"),
            ("a/x.rs", "fn f() -> crate::B { crate::B }\n"),
            ("b.rs", "use crate::{a::{self}, c};\npub struct B;\n"),
        ]);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with("a -> b -> a (via a/x.rs:1 crate::B"),
            "{found:?}"
        );
    }

    #[test]
    fn comments_strings_and_chars_are_not_references() {
        let found = cycles(&[
            ("lib.rs", "pub mod a;\npub mod b;\n"),
            ("a.rs", "use crate::b::B;\n"),
            (
                "b.rs",
                "// use crate::a::A;\n/* crate::a::A */\nconst S: &str = \"crate::a::A\";\nconst R: &str = r#\"crate::a\"#;\nconst C: char = '\"';\nfn f<'a>(x: &'a str) {}\npub struct B;\n",
            ),
        ]);
        assert!(found.is_empty(), "{found:?}");
    }
}
