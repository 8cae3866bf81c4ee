//! Benchmark: one whole coordinator round on SmolLM2-135M dimensions, in-process (no network):
//! N devices join, the round starts (selection, arms, one global slice per device), every
//! device answers with its slice plus a perturbation (validation + streaming aggregation in
//! `handle`), the round closes (finish, rewards, bandit updates), the state is checkpointed.
//! Reports wall time and peak heap per phase for HetLoRA and exact (randomised SVD).
//!
//! `cargo bench -p aggregator --bench coordinator [-- --devices N]`. Prints Markdown.

use std::time::Instant;

use aggregator::aggregate::AggregationMethod;
use aggregator::coordinator::{Command, Coordinator, CoordinatorConfig, Event};
use aggregator::strategy::{FixedPruneConfig, StrategyConfig};
use protocol::*;
use test_support::{peak_bytes, reset_peak, CountingAllocator};

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// Runs `f`, returning its result, seconds, and peak heap growth above the start.
fn measure<T>(f: impl FnOnce() -> T) -> (T, f64, usize) {
    let base = reset_peak();
    let t = Instant::now();
    let out = f();
    let s = t.elapsed().as_secs_f64();
    (out, s, peak_bytes().saturating_sub(base))
}

fn answer(rc: &RoundConfig, device: u64) -> Update {
    let slice = rc.global.as_ref().expect("slice");
    let mut adapter = slice.adapter.to_f32();
    for layer in &mut adapter.layers {
        if let Buffer::F32(b) = &mut layer.b.data {
            for (i, x) in b.iter_mut().enumerate() {
                *x += 1e-3 * ((i as u64 + device) % 7) as f32;
            }
        }
    }
    Update {
        round: rc.round,
        adapter,
        kept: slice.kept.clone(),
        stats: UpdateStats {
            loss_pre: 3.0,
            loss_post: 2.5,
            sparsity: 0.0,
            param_count: 134_515_008,
            compute_ms: 60_000,
            bytes_down: 0,
            bytes_up: 0,
            peak_mem_bytes: 1 << 30,
            samples: 160,
            steps: 40,
        },
    }
}

fn round(devices: u64, method: AggregationMethod, label: &str, print: bool) {
    let dims = ModelDims::SMOLLM2_135M;
    let mut config = CoordinatorConfig {
        rounds: 2,
        devices_per_round: devices as usize,
        over_selection: 0.0,
        max_rank: 16,
        strategy: StrategyConfig::FixedPrune(FixedPruneConfig {
            prune_ratio: 0.0,
            rank: 16,
        }),
        ..CoordinatorConfig::default()
    };
    config.arms.ranks = vec![4, 8, 16];
    config.aggregation.method = method;
    let (mut coord, s_new, _) = measure(|| Coordinator::new(config, dims).unwrap());
    let now = Timestamp(0);
    for d in 1..devices {
        coord.handle(
            now,
            Event::Connected {
                device: DeviceId(d),
            },
        );
        coord.handle(now, join(d));
    }
    coord.handle(
        now,
        Event::Connected {
            device: DeviceId(devices),
        },
    );
    // The last join starts the round: selection, arms and every device's slice.
    let (cmds, s_start, heap_start) = measure(|| coord.handle(now, join(devices)));
    let configs: Vec<(u64, RoundConfig)> = cmds
        .into_iter()
        .filter_map(|c| match c {
            Command::Send {
                device,
                msg: Message::RoundConfig(rc),
            } => Some((device.0, rc)),
            _ => None,
        })
        .collect();
    assert_eq!(configs.len(), devices as usize);
    let slice_bytes: usize = configs
        .iter()
        .map(|(_, rc)| rc.global.as_ref().map_or(0, |g| g.adapter.byte_len()))
        .sum();
    let updates: Vec<(u64, Update)> = configs.iter().map(|(d, rc)| (*d, answer(rc, *d))).collect();
    drop(configs);
    let update_bytes: usize = updates.iter().map(|(_, u)| u.adapter.byte_len()).sum();
    let n = updates.len();
    let mut updates = updates.into_iter();
    // All but the last update: validation and streaming aggregation.
    let (_, s_adds, heap_adds) = measure(|| {
        for (d, u) in updates.by_ref().take(n - 1) {
            let cmds = coord.handle(
                now,
                Event::Message {
                    device: DeviceId(d),
                    msg: Message::Update(u),
                    bytes: 1 << 20,
                },
            );
            assert!(matches!(
                cmds.first(),
                Some(Command::Send {
                    msg: Message::Ack(_),
                    ..
                })
            ));
        }
    });
    // The last update closes the round: finish, rewards, bandits.
    let (d, u) = updates.next().expect("last update");
    let (cmds, s_close, heap_close) = measure(|| {
        coord.handle(
            now,
            Event::Message {
                device: DeviceId(d),
                msg: Message::Update(u),
                bytes: 1 << 20,
            },
        )
    });
    assert!(cmds
        .iter()
        .any(|c| matches!(c, Command::RoundClosed(s) if s.aggregated)));
    let dir = std::env::temp_dir().join(format!("fedspine-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("state.ckpt");
    let (bytes, s_ckpt, _) = measure(|| {
        aggregator::checkpoint::write_atomic(
            &path,
            aggregator::coordinator::STATE_SCHEMA,
            &coord.state(),
        )
        .unwrap()
    });
    let _ = std::fs::remove_dir_all(&dir);
    if !print {
        return;
    }
    println!(
        "| {label} | {devices} | {s_new:.2} | {s_start:.2} ({:.0} MiB out, peak +{:.0} MiB) | {:.3} per update ({:.0} MiB in, peak +{:.0} MiB) | {s_close:.2} (peak +{:.0} MiB) | {s_ckpt:.2} ({:.1} MiB) |",
        mib(slice_bytes),
        mib(heap_start),
        s_adds / (n - 1).max(1) as f64,
        mib(update_bytes),
        mib(heap_adds),
        mib(heap_close),
        mib(bytes as usize),
    );
}

fn join(d: u64) -> Event {
    Event::Message {
        device: DeviceId(d),
        msg: Message::Join(Join {
            protocol_version: PROTOCOL_VERSION,
            device_id: DeviceId(d),
            capabilities: Capabilities {
                ram_bytes: 8 << 30,
                backend: "bench".into(),
                bench_score: None,
                device_class: None,
            },
        }),
        bytes: 64,
    }
}

fn main() {
    let mut devices = 80u64;
    let argv: Vec<String> = std::env::args().collect();
    if let Some(i) = argv.iter().position(|a| a == "--devices") {
        devices = argv
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .unwrap_or(devices);
    }
    println!("## One coordinator round, SmolLM2-135M dims, rank 16, unpruned devices\n");
    println!("| method | devices | new (s) | round start (s) | update handling (s) | close (s) | checkpoint (s) |");
    println!("|---|---|---|---|---|---|---|");
    // A first, unreported round warms the allocator: the first touch of 1.5 GiB of fresh
    // pages otherwise lands on whichever row runs first.
    round(devices, AggregationMethod::HetLora, "warm-up", false);
    round(devices, AggregationMethod::HetLora, "hetlora", true);
    round(
        devices,
        AggregationMethod::Exact,
        "exact (randomized SVD)",
        true,
    );
    round(devices, AggregationMethod::Mean, "mean (fedlora)", true);
}
