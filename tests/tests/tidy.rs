//! House rules as an ordinary test: sans-IO cores read no clock and create no RNG of their
//! own, only transport modules and binaries touch tokio/quinn, burn stays out of the
//! burn-free crates, every source file says what it is for, no ignored or should-panic tests,
//! and no web addresses in code or docs.

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

fn all_sources() -> Vec<PathBuf> {
    let mut v = Vec::new();
    for c in [
        "device-agent",
        "aggregator",
        "bandit",
        "protocol",
        "sim",
        "tests",
    ] {
        rust_files(&root().join(c), &mut v);
    }
    v.sort();
    v
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
    ];
    let exempt = ["/bin/", "src/main.rs", "sim/src/progress"];
    core_prefixes.iter().any(|p| r.starts_with(p)) && !exempt.iter().any(|e| r.contains(e))
}

/// Files allowed to use tokio / quinn.
fn may_do_io(r: &str) -> bool {
    r.contains("/bin/")
        || r.ends_with("src/main.rs")
        || r.starts_with("tests/")
        || r.contains("/tests/")
        || r.contains("/benches/")
        || r.starts_with("aggregator/src/transport")
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
    for c in ["protocol", "bandit", "aggregator"] {
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
