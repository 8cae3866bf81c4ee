//! Load run: the `aggregator serve` binary in its own process and N scripted devices (default
//! 1,000) in this one, each with its own certificate and mutual-TLS QUIC connection (with
//! Retry), spread over loopback addresses, all connecting at once, for a few rounds of small
//! updates (the tiny test model). Prints Markdown: connection and Join-to-Welcome p50/p99 as
//! the devices saw them, each round's open-to-close time from the server's metrics, and the
//! server process's resident memory (before the devices, peak) and CPU time from `/proc`.
//!
//! `cargo bench -p aggregator --bench load [-- --devices N --rounds R --per-address K]`
//! (Linux: it reads `/proc/<pid>`).

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/netkit/mod.rs"]
mod netkit;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use netkit::load::{self, quantile};

struct Args {
    devices: u64,
    rounds: u64,
    per_address: usize,
}

fn parse_args() -> Args {
    let mut args = Args {
        devices: 1000,
        rounds: 3,
        per_address: 50,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |name: &str| -> u64 {
            it.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} needs a positive number"))
        };
        match a.as_str() {
            "--devices" => args.devices = value("--devices").max(1),
            "--rounds" => args.rounds = value("--rounds").max(1),
            "--per-address" => args.per_address = value("--per-address").max(1) as usize,
            // cargo bench passes --bench.
            _ => {}
        }
    }
    args
}

/// Resident set now and its peak (kB), from `/proc/<pid>/status`.
fn rss_kb(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// User plus system CPU seconds of `pid`, from `/proc/<pid>/stat` (100 ticks a second).
fn cpu_s(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

fn write_config(path: &Path, devices: u64, rounds: u64) {
    let mut config = netkit::config(rounds, devices as usize);
    config.round_deadline_ms = 120_000;
    config.round_interval_ms = 100;
    let mut text = toml::to_string(&config).unwrap();
    let dims = common::dims();
    text.push_str(&format!(
        "\n[model]\nn_blocks = {}\nd_model = {}\nn_heads = {}\nn_kv_heads = {}\nhead_dim = {}\nffn = {}\n",
        dims.n_blocks, dims.d_model, dims.n_heads, dims.n_kv_heads, dims.head_dim, dims.ffn
    ));
    std::fs::write(path, text).unwrap();
}

fn main() {
    let args = parse_args();
    let n = args.devices;
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let issued = Instant::now();
    netkit::pki_dir(&pki, 1..=n);
    let issue_s = issued.elapsed().as_secs_f64();
    // The server gets its bundle without the CA key.
    let server_pki = dir.path().join("server-pki");
    aggregator::pki::export_server(&pki, &server_pki).unwrap();
    let config = dir.path().join("run.toml");
    write_config(&config, n, args.rounds);
    let metrics = dir.path().join("metrics.jsonl");

    let mut server = Command::new(env!("CARGO_BIN_EXE_aggregator"))
        .arg("serve")
        .args(["--config", config.to_str().unwrap()])
        .args(["--pki", server_pki.to_str().unwrap()])
        .args(["--state", dir.path().join("state").to_str().unwrap()])
        .args(["--metrics", metrics.to_str().unwrap()])
        .args(["--listen", "127.0.0.1:0"])
        .args(["--max-connections", &(n + 64).to_string()])
        .args(["--max-handshakes-per-ip", &args.per_address.to_string()])
        .args(["--max-connections-per-ip", &args.per_address.to_string()])
        .args(["--finish-grace-s", "2"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting the aggregator binary");
    let pid = server.id();
    let mut stdout = BufReader::new(server.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let addr: SocketAddr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .parse()
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let (rss_before_kb, _) = rss_kb(pid).unwrap();
    let cpu_before = cpu_s(pid).unwrap();

    // Sample the server until it exits (its peak RSS and CPU are gone with the process).
    let last = Arc::new(Mutex::new((0u64, 0.0f64)));
    let running = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (last, running) = (last.clone(), running.clone());
        std::thread::spawn(move || {
            while running.load(Ordering::SeqCst) {
                if let (Some((_, hwm)), Some(cpu)) = (rss_kb(pid), cpu_s(pid)) {
                    *last.lock().unwrap() = (hwm, cpu);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let started = Instant::now();
    let report = runtime.block_on(load::run_devices(&pki, addr, 1..=n, args.per_address));
    let devices_s = started.elapsed().as_secs_f64();
    let status = server.wait().unwrap();
    running.store(false, Ordering::SeqCst);
    sampler.join().unwrap();
    let (peak_kb, cpu_after) = *last.lock().unwrap();

    let rounds: Vec<(u64, u64, usize)> = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == "round")
        .map(|v| {
            let ms = v["closed_at"].as_u64().unwrap_or(0) - v["started_at"].as_u64().unwrap_or(0);
            let parts = v["participants"].as_array().map_or(0, |p| p.len());
            (v["round"].as_u64().unwrap_or(0), ms, parts)
        })
        .collect();

    println!("## Load run: {n} devices, {} rounds\n", args.rounds);
    println!(
        "{} devices per loopback address; certificates issued in {issue_s:.1} s; server exit {status}\n",
        args.per_address
    );
    println!("| figure | value |\n|---|---|");
    println!("| devices finished | {} of {n} |", report.answered.len());
    println!("| device failures | {} |", report.failures.len());
    println!(
        "| connect (QUIC + Retry + mTLS) p50 / p99 | {:.0} / {:.0} ms |",
        quantile(&report.connect_ms, 0.5),
        quantile(&report.connect_ms, 0.99)
    );
    println!(
        "| Join-to-Welcome p50 / p99 | {:.0} / {:.0} ms |",
        quantile(&report.join_ms, 0.5),
        quantile(&report.join_ms, 0.99)
    );
    for (round, ms, parts) in &rounds {
        println!("| round {round}: open to close, updates | {ms} ms, {parts} |");
    }
    println!("| devices' wall time, connect to goodbye | {devices_s:.1} s |");
    println!(
        "| server RSS before devices / peak | {:.1} / {:.1} MiB |",
        rss_before_kb as f64 / 1024.0,
        peak_kb as f64 / 1024.0
    );
    println!(
        "| server RSS growth per device | {:.1} KiB |",
        peak_kb.saturating_sub(rss_before_kb) as f64 / n as f64
    );
    println!(
        "| server CPU during the run (user + system) | {:.1} s |",
        cpu_after - cpu_before
    );
    for f in report.failures.iter().take(10) {
        println!("\nfailure: {f}");
    }
}
