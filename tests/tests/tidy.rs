//! House rules as an ordinary test: sans-IO cores read no clock and create no RNG of their
//! own, only transport modules and binaries touch tokio/quinn, burn stays out of the
//! burn-free crates and the aggregator out of the device agent, no import cycles between a
//! crate's modules, every source file says what it is for and stays under 800 lines and is
//! named in ARCHITECTURE.md, no ignored or should-panic tests, and no web addresses in code or
//! docs.

#[path = "tidy/modgraph.rs"]
mod modgraph;

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if p.is_dir() {
            if name != "target" && !name.starts_with('.') {
                rust_files(&p, out);
            }
        } else if name.ends_with(".rs") {
            out.push(p);
        }
    }
}

/// The workspace members, as the root manifest's `members = [...]` lists them.
fn crates() -> Vec<String> {
    let manifest = std::fs::read_to_string(root().join("Cargo.toml")).expect("root manifest");
    let start = manifest.find("members").expect("workspace members");
    let list = &manifest[start..];
    let list = &list[list.find('[').expect("members list") + 1..];
    let list = &list[..list.find(']').expect("members list end")];
    list.split(',')
        .map(|m| m.trim().trim_matches('"').to_string())
        .filter(|m| !m.is_empty())
        .collect()
}

fn all_sources() -> Vec<PathBuf> {
    let mut v = Vec::new();
    for c in crates() {
        rust_files(&root().join(c), &mut v);
    }
    v.sort();
    v
}

/// Library sources of a crate (`src/**` without `main.rs` and `src/bin/`), as (path relative to
/// `src/`, text).
fn library_sources(krate: &str) -> Vec<(String, String)> {
    let src = root().join(krate).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    files
        .into_iter()
        .filter_map(|p| {
            let r = p.strip_prefix(&src).ok()?.to_str()?.replace('\\', "/");
            if r == "main.rs" || r.starts_with("bin/") {
                return None;
            }
            Some((r, std::fs::read_to_string(&p).ok()?))
        })
        .collect()
}

fn rel(p: &Path) -> String {
    p.strip_prefix(root()).unwrap_or(p).display().to_string()
}

/// Code without comment lines (a rule about calls should not trip on prose).
fn code_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines().enumerate().filter(|(_, l)| {
        let t = l.trim_start();
        !(t.starts_with("//") || t.starts_with("///") || t.starts_with("//!"))
    })
}

/// Files that are sans-IO cores: no wall clock, no unseeded randomness.
fn is_core(r: &str) -> bool {
    let core_prefixes = [
        "protocol/src/",
        "bandit/src/",
        "aggregator/src/coordinator",
        "aggregator/src/aggregate",
        "aggregator/src/strategy",
        "device-agent/src/session",
        "sim/src/",
        "charts/src/",
    ];
    // The progress bar and the calibration grid read the clock by design: one draws the
    // terminal, the other measures wall time into a measurement file, never into a report.
    let exempt = [
        "/bin/",
        "src/main.rs",
        "sim/src/progress",
        "sim/src/time_model/grid",
    ];
    core_prefixes.iter().any(|p| r.starts_with(p)) && !exempt.iter().any(|e| r.contains(e))
}

/// Files allowed to use tokio / quinn.
fn may_do_io(r: &str) -> bool {
    r.contains("/bin/")
        || r.ends_with("src/main.rs")
        || r.starts_with("tests/")
        || r.contains("/tests/")
        || r.contains("/benches/")
        || r.starts_with("transport/src/")
        || r.starts_with("aggregator/src/server")
        || r.starts_with("aggregator/src/pki")
        || r.starts_with("device-agent/src/client")
}

#[test]
fn cores_read_no_clock_and_make_no_rng() {
    let banned = [
        "Instant::now",
        "SystemTime::now",
        "thread_rng",
        "rand::rng()",
        "from_entropy",
        "OsRng",
        "from_os_rng",
    ];
    let mut bad = Vec::new();
    for p in all_sources() {
        let r = rel(&p);
        if !is_core(&r) {
            continue;
        }
        let text = std::fs::read_to_string(&p).expect("source readable");
        for (i, line) in code_lines(&text) {
            for b in banned {
                if line.contains(b) {
                    bad.push(format!("{r}:{}: {b}", i + 1));
                }
            }
        }
    }
    assert!(
        bad.is_empty(),
        "sans-IO cores must take time and randomness from their caller:\n{}",
        bad.join("\n")
    );
}

#[test]
fn only_transport_modules_and_binaries_use_tokio_or_quinn() {
    let mut bad = Vec::new();
    for p in all_sources() {
        let r = rel(&p);
        if may_do_io(&r) {
            continue;
        }
        let text = std::fs::read_to_string(&p).expect("source readable");
        for (i, line) in code_lines(&text) {
            if line.contains("tokio::")
                || line.contains("quinn::")
                || line.contains("use tokio")
                || line.contains("use quinn")
            {
                bad.push(format!("{r}:{}", i + 1));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "tokio/quinn outside transport modules and binaries:\n{}",
        bad.join("\n")
    );
}

#[test]
fn burn_free_crates_do_not_depend_on_burn() {
    for c in [
        "protocol",
        "durable",
        "bandit",
        "aggregator",
        "charts",
        "test-support",
    ] {
        let manifest =
            std::fs::read_to_string(root().join(c).join("Cargo.toml")).expect("manifest");
        assert!(
            !manifest
                .lines()
                .any(|l| l.trim_start().starts_with("burn") || l.contains("device-agent")),
            "{c}/Cargo.toml must not depend on burn or the device agent"
        );
    }
    let proto = std::fs::read_to_string(root().join("protocol/Cargo.toml")).expect("manifest");
    for dep in ["tokio", "quinn"] {
        assert!(
            !proto.lines().any(|l| l.trim_start().starts_with(dep)),
            "protocol must not depend on {dep}"
        );
    }
}

#[test]
fn every_source_file_says_what_it_is_for() {
    let missing: Vec<String> = all_sources()
        .into_iter()
        .filter(|p| {
            let text = std::fs::read_to_string(p).unwrap_or_default();
            !text.trim_start().starts_with("//!")
        })
        .map(|p| rel(&p))
        .collect();
    assert!(
        missing.is_empty(),
        "files without a leading //! line:\n{}",
        missing.join("\n")
    );
}

#[test]
fn no_ignored_or_should_panic_tests() {
    let attrs = [concat!("#[", "ignore"), concat!("#[", "should_panic")];
    let mut bad = Vec::new();
    for p in all_sources() {
        let text = std::fs::read_to_string(&p).unwrap_or_default();
        for (i, line) in text.lines().enumerate() {
            if attrs.iter().any(|a| line.contains(a)) {
                bad.push(format!("{}:{}", rel(&p), i + 1));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "assert the error or the outcome instead:\n{}",
        bad.join("\n")
    );
}

#[test]
fn no_web_addresses_in_code_or_docs() {
    let mut files = all_sources();
    for d in ["README.md", "ARCHITECTURE.md", "BENCHMARKS.md", ".ci/run"] {
        files.push(root().join(d));
    }
    let mut bad = Vec::new();
    for p in files {
        let Ok(text) = std::fs::read_to_string(&p) else {
            continue;
        };
        for (i, line) in text.lines().enumerate() {
            // The SVG namespace is an identifier that image viewers require, not a location.
            if line.contains("www.w3.org/2000/svg") {
                continue;
            }
            if line.contains(concat!("http", "://")) || line.contains(concat!("https", "://")) {
                bad.push(format!("{}:{}", rel(&p), i + 1));
            }
        }
    }
    assert!(bad.is_empty(), "web addresses found:\n{}", bad.join("\n"));
}

/// Dependency lines (`name = ...`, `name.workspace = true`) of a manifest, any section.
fn depends_on(manifest: &str, dep: &str) -> bool {
    manifest.lines().any(|l| {
        let key = l.trim_start();
        key.strip_prefix(dep)
            .is_some_and(|rest| rest.trim_start().starts_with(['=', '.']))
    })
}

#[test]
fn the_device_agent_does_not_depend_on_the_aggregator() {
    let manifest =
        std::fs::read_to_string(root().join("device-agent/Cargo.toml")).expect("manifest");
    assert!(
        !depends_on(&manifest, "aggregator"),
        "device-agent/Cargo.toml must not depend on the aggregator: what both need belongs in \
         protocol or a shared crate"
    );
}

#[test]
fn no_import_cycles_between_modules() {
    let mut found = Vec::new();
    for c in crates() {
        let graph = modgraph::Crate::new(&library_sources(&c));
        found.extend(
            graph
                .cycles()
                .into_iter()
                .map(|cycle| format!("{c}: {cycle}")),
        );
    }
    assert!(
        found.is_empty(),
        "modules that import each other (move the shared part into its own module):\n{}",
        found.join("\n")
    );
}

#[test]
fn no_source_file_over_800_lines() {
    let mut long = Vec::new();
    for p in all_sources() {
        let r = rel(&p);
        if !r.contains("/src/") {
            continue;
        }
        let lines = std::fs::read_to_string(&p)
            .unwrap_or_default()
            .lines()
            .count();
        if lines > 800 {
            long.push(format!("{r}: {lines} lines"));
        }
    }
    assert!(
        long.is_empty(),
        "split these files (one concern per file):\n{}",
        long.join("\n")
    );
}

/// Whether `text` names `path` (not as the tail of a longer path or name).
fn names(text: &str, path: &str) -> bool {
    text.match_indices(path).any(|(i, _)| {
        !text[..i]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || "_-/".contains(c))
    })
}

#[test]
fn architecture_names_every_source_file() {
    let map = std::fs::read_to_string(root().join("ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let mut missing = Vec::new();
    for p in all_sources() {
        let r = rel(&p);
        let Some((krate, in_src)) = r.split_once("/src/") else {
            continue;
        };
        // The crate's section of the code map, up to the next crate's heading.
        let heading = format!("### `{krate}`");
        let section = map.find(&heading).map_or("", |at| {
            let rest = &map[at + heading.len()..];
            &rest[..rest.find("\n### ").unwrap_or(rest.len())]
        });
        let dir = in_src.strip_suffix("mod.rs");
        let named = names(&map, &r)
            || names(section, in_src)
            || dir.is_some_and(|d| !d.is_empty() && names(section, d));
        if !named {
            missing.push(r);
        }
    }
    assert!(
        missing.is_empty(),
        "ARCHITECTURE.md's code map does not name (as `crate/src/path.rs`, or as `path.rs` or \
         `dir/` in the crate's section):\n{}",
        missing.join("\n")
    );
}

#[test]
fn every_unsafe_block_says_why_it_is_sound() {
    let mut bad = Vec::new();
    for p in all_sources() {
        let text = std::fs::read_to_string(&p).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in code_lines(&text) {
            let unsafe_site = [concat!("unsafe", " {"), concat!("unsafe", " impl")]
                .iter()
                .any(|u| line.contains(u));
            // The justification sits on the lines just above (or on the same line).
            let justified = lines[i.saturating_sub(8)..=i]
                .iter()
                .any(|l| l.contains("SAFETY:"));
            if unsafe_site && !justified {
                bad.push(format!("{}:{}", rel(&p), i + 1));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "unsafe without a `// SAFETY:` comment saying why it is sound:\n{}",
        bad.join("\n")
    );
}
