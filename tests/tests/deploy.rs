//! The deployment files under `deploy/` stay true: the agent's systemd unit passes
//! `systemd-analyze verify` (where systemd is installed) and every flag its `ExecStart` gives
//! `device-agent` is one the binary accepts, with the values from the example `agent.env`.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use common::bins;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
}

/// `KEY=value` lines of a systemd environment file.
fn env_file(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

#[test]
fn the_agent_unit_verifies_and_its_command_line_parses() {
    let unit = std::fs::read_to_string(root().join("deploy/fedspine-agent.service")).unwrap();
    let env = env_file(&std::fs::read_to_string(root().join("deploy/agent.env")).unwrap());
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("an ExecStart line");
    let mut words: Vec<String> = exec
        .split_whitespace()
        .map(|w| {
            let mut w = w.to_string();
            for (k, v) in &env {
                w = w.replace(&format!("${{{k}}}"), v);
            }
            assert!(!w.contains("${"), "{w}: not set by agent.env");
            w
        })
        .collect();
    assert_eq!(words[0], "/usr/local/bin/device-agent");
    // Every flag is known to the binary: clap refuses an unknown one before it prints help.
    words.push("--help".into());
    let out = Command::new(&bins().device_agent)
        .args(&words[1..])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "device-agent {:?}: {}",
        &words[1..],
        String::from_utf8_lossy(&out.stderr)
    );
    let probe = Command::new("systemd-analyze").arg("--version").output();
    if probe.is_err() {
        eprintln!("systemd-analyze not installed: the unit's syntax was not verified");
        return;
    }
    // Verify a copy whose ExecStart names the binary under test (verify checks that it exists).
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("fedspine-agent.service");
    let agent = bins().device_agent.canonicalize().unwrap();
    std::fs::write(
        &copy,
        unit.replace("/usr/local/bin/device-agent", agent.to_str().unwrap()),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {stderr}"
    );
}

#[test]
fn an_agent_config_file_sets_join_flags_and_the_command_line_overrides_it() {
    let agent = &bins().device_agent;
    // The example file's keys are all `join` flags with valid values.
    let example = root().join("deploy/agent.toml");
    let out = Command::new(agent)
        .args(["join", "--config"])
        .arg(&example)
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A file's values are used (the error names the file's PKI directory), and a flag on the
    // command line wins over the file.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agent.toml");
    std::fs::write(
        &file,
        "aggregator = \"127.0.0.1:9\"\nid = 1\npki = \"/nonexistent/from-file\"\nmodel = \"tiny\"\ndataset = \"synthetic\"\nmax_attempts = 1\n",
    )
    .unwrap();
    let run = |extra: &[&str]| {
        let out = Command::new(agent)
            .env("RUST_BACKTRACE", "0")
            .args(["join", "--config"])
            .arg(&file)
            .args(extra)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    assert!(run(&[]).contains("/nonexistent/from-file/device-1.pem"));
    let over = run(&["--pki", "/nonexistent/from-cli"]);
    assert!(
        over.contains("/nonexistent/from-cli/device-1.pem"),
        "{over}"
    );
    // The file's device class is checked at start with the aggregator's rule (every value in
    // the file is, even one the command line overrides); a good one is used.
    let with_class = |class: &str| {
        std::fs::write(
            &file,
            format!("aggregator = \"127.0.0.1:9\"\nid = 1\npki = \"/nonexistent/from-file\"\nmodel = \"tiny\"\ndataset = \"synthetic\"\nmax_attempts = 1\ndevice_class = \"{class}\"\n"),
        )
        .unwrap();
        run(&[])
    };
    let refused = with_class("Jetson NX");
    assert!(
        refused.contains("--device-class")
            && refused.contains("device class \"Jetson NX\" holds 'J': only a-z, 0-9"),
        "{refused}"
    );
    let accepted = with_class("jetson-nx");
    assert!(
        accepted.contains("/nonexistent/from-file/device-1.pem"),
        "{accepted}"
    );
    // A key that is no flag is refused with the file and the key named.
    std::fs::write(&file, "agregator = \"x\"\n").unwrap();
    let bad = run(&[]);
    assert!(
        bad.contains("agent.toml") && bad.contains("unknown key 'agregator'"),
        "{bad}"
    );
}
