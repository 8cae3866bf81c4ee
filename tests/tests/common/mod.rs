//! Helpers of the end-to-end tests: build and locate the `aggregator` and `device-agent`
//! binaries, run them as processes that are killed if a test fails, create a PKI with the
//! `aggregator ca` commands, write run configs for the tiny test model, read metrics.

#![allow(dead_code)]

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Paths of the binaries under test.
pub struct Bins {
    pub aggregator: PathBuf,
    pub device_agent: PathBuf,
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Builds both binaries (a no-op inside `cargo test --workspace`, which already did) into the target
/// directory and profile this test runs from, once per test binary.
pub fn bins() -> &'static Bins {
    static BINS: OnceLock<Bins> = OnceLock::new();
    BINS.get_or_init(|| {
        // The test executable lives in <target>/<profile>/deps/.
        let exe = std::env::current_exe().expect("test executable path");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("<target>/<profile>")
            .to_path_buf();
        let target = profile_dir.parent().expect("<target>").to_path_buf();
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        // Drop what `cargo test` set for this test process: a build script that watches one
        // of these (ring watches CARGO_MANIFEST_DIR) would otherwise see a change and rebuild
        // everything above it, here and again in the next ordinary build.
        for (key, _) in std::env::vars_os() {
            let Some(key) = key.to_str() else { continue };
            if key == "OUT_DIR"
                || key.starts_with("CARGO_PKG_")
                || key.starts_with("CARGO_BIN_EXE_")
                || matches!(
                    key,
                    "CARGO_MANIFEST_DIR"
                        | "CARGO_MANIFEST_PATH"
                        | "CARGO_CRATE_NAME"
                        | "CARGO_PRIMARY_PACKAGE"
                        | "CARGO_TARGET_TMPDIR"
                )
            {
                cmd.env_remove(key);
            }
        }
        cmd.current_dir(workspace_root())
            // The same package and target selection as `cargo test --workspace`, so features
            // resolve the same way and this is a no-op inside that run (`-p aggregator -p
            // device-agent` alone would resolve burn's features differently and build it again).
            .args(["build", "-q", "--workspace", "--bins", "--tests"])
            .arg("--target-dir")
            .arg(&target);
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("running cargo build");
        assert!(status.success(), "building the binaries failed: {status}");
        let bins = Bins {
            aggregator: profile_dir.join(format!("aggregator{}", std::env::consts::EXE_SUFFIX)),
            device_agent: profile_dir.join(format!("device-agent{}", std::env::consts::EXE_SUFFIX)),
        };
        assert!(bins.aggregator.is_file(), "{}", bins.aggregator.display());
        assert!(
            bins.device_agent.is_file(),
            "{}",
            bins.device_agent.display()
        );
        bins
    })
}

/// A child process with its stdout lines on a channel and its stderr in a file. Dropping it
/// kills the process.
pub struct Proc {
    pub name: String,
    child: Child,
    lines: Receiver<String>,
    /// Every stdout line seen so far.
    pub stdout: Vec<String>,
    stderr: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command, log_dir: &Path) -> Proc {
        let stderr = log_dir.join(format!("{name}.stderr"));
        cmd.stdout(Stdio::piped())
            .stderr(File::create(&stderr).expect("stderr file"))
            .env("RUST_LOG", "info,quinn=warn,rustls=warn");
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {name}: {e}"));
        let out = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Proc {
            name: name.to_string(),
            child,
            lines,
            stdout: Vec::new(),
            stderr,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The first stdout line (from now on or already seen) satisfying `pred`.
    pub fn wait_line(&mut self, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        if let Some(l) = self.stdout.iter().find(|l| pred(l)) {
            return l.clone();
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.stdout.push(line.clone());
                    if pred(&line) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "{}: no matching stdout line within {timeout:?}; stdout {:?}\n{}",
                    self.name,
                    self.stdout,
                    self.log_tail()
                ),
            }
        }
    }

    /// Waits for the process to exit; panics with its log after `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
                    self.stdout.push(line);
                }
                return status;
            }
            if Instant::now() > deadline {
                panic!(
                    "{} did not exit within {timeout:?}\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL (no chance to clean up).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The last lines of the process's stderr.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(40);
        format!("--- {} stderr ---\n{}", self.name, lines[from..].join("\n"))
    }

    /// Peak resident memory (`VmHWM`) in bytes, from `/proc`.
    pub fn peak_rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        let kb: u64 = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        Some(kb * 1024)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs an `aggregator ca ...` command to completion.
pub fn aggregator_ca(args: &[&str]) {
    let out = Command::new(&bins().aggregator)
        .arg("ca")
        .args(args)
        .output()
        .expect("running aggregator ca");
    assert!(
        out.status.success(),
        "aggregator ca {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA with the server certificate (localhost, 127.0.0.1) and device certificates.
pub fn make_pki(dir: &Path, devices: &[u64]) {
    let d = dir.to_str().expect("utf-8 path");
    aggregator_ca(&["init", "--dir", d]);
    aggregator_ca(&[
        "issue-server",
        "--dir",
        d,
        "--name",
        "localhost",
        "--name",
        "127.0.0.1",
    ]);
    let mut args = vec!["issue-device", "--dir", d];
    let ids: Vec<String> = devices.iter().map(|i| i.to_string()).collect();
    for id in &ids {
        args.extend(["--id", id.as_str()]);
    }
    aggregator_ca(&args);
}

/// Dimensions of `device-agent --model tiny`.
pub const TINY_MODEL_TOML: &str = "[model]
n_blocks = 4
d_model = 64
n_heads = 4
n_kv_heads = 2
head_dim = 16
ffn = 128
";

/// A fedspine run over three tiny devices: every device in every round, full quorum, a
/// pruning range up to 0.2 and ranks 4 and 8, plus `extra` top-level settings.
pub fn tiny_run_config(rounds: u64, extra: &str) -> String {
    format!(
        "rounds = {rounds}
devices_per_round = 3
over_selection = 0.0
min_devices = 3
quorum_fraction = 1.0
round_deadline_ms = 120000
local_steps = 24
prune_interval_steps = 8
learning_rate = 0.01
batch_size = 4
lora_alpha = 16.0
max_rank = 8
heartbeat_interval_ms = 1000
seed = 11
{extra}
[arms]
ratio_min = 0.0
ratio_max = 0.2
ranks = [4, 8]

[aggregation]
method = \"exact\"

{TINY_MODEL_TOML}"
    )
}

/// `aggregator serve` on an ephemeral loopback port (or `listen`); returns the process and
/// the bound address.
pub fn start_aggregator(dir: &Path, name: &str, listen: &str, resume: bool) -> (Proc, String) {
    let mut cmd = Command::new(&bins().aggregator);
    cmd.arg("serve")
        .arg("--config")
        .arg(dir.join("run.toml"))
        .arg("--pki")
        .arg(dir.join("pki"))
        .arg("--listen")
        .arg(listen)
        .arg("--state")
        .arg(dir.join("state"))
        .arg("--metrics")
        .arg(dir.join("metrics.jsonl"))
        .args(["--finish-grace-s", "3"]);
    if resume {
        cmd.arg("--resume");
    }
    let mut proc = Proc::spawn(name, cmd, dir);
    let line = proc.wait_line(Duration::from_secs(60), |l| l.starts_with("listening on "));
    let addr = line.trim_start_matches("listening on ").to_string();
    (proc, addr)
}

/// The `device-agent join` command line of device `id` with the tiny test model and
/// synthetic data (callers may add flags before spawning it).
pub fn agent_command(dir: &Path, id: u64, addr: &str) -> Command {
    let mut cmd = Command::new(&bins().device_agent);
    cmd.arg("join")
        .args(["--aggregator", addr, "--server-name", "localhost"])
        .arg("--pki")
        .arg(dir.join("pki"))
        .args(["--id", &id.to_string()])
        .args([
            "--model",
            "tiny",
            "--dataset",
            "synthetic",
            "--seq-len",
            "32",
        ])
        .args(["--idle-timeout-s", "5", "--reconnect-max-s", "2"])
        .args(["--max-attempts", "60"]);
    cmd
}

/// `device-agent join` with the tiny test model and synthetic data.
pub fn start_agent(dir: &Path, id: u64, addr: &str) -> Proc {
    Proc::spawn(&format!("device-{id}"), agent_command(dir, id, addr), dir)
}

/// The metrics file's JSON lines.
pub fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The `round` lines of the metrics file.
pub fn round_lines(dir: &Path) -> Vec<serde_json::Value> {
    metrics(dir)
        .into_iter()
        .filter(|v| v["event"] == "round")
        .collect()
}

/// Polls `cond` every 50 ms; panics with `what` after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
