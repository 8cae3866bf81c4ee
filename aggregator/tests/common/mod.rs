//! Helpers shared by the coordinator tests: the tiny model's dimensions, a device's Join, and
//! an honest device's answer to a round configuration.

#![allow(dead_code)] // each test binary uses its own subset

pub mod scenario;

use aggregator::coordinator::{Command, Coordinator, Event};
use protocol::{
    Buffer, Capabilities, DeviceId, Join, Message, ModelDims, RoundConfig, Timestamp, Update,
    UpdateStats, PROTOCOL_VERSION,
};

/// Two blocks, d_model 8, 2 query heads on 1 KV head of width 4, FFN 12.
pub fn dims() -> ModelDims {
    ModelDims {
        n_blocks: 2,
        d_model: 8,
        n_heads: 2,
        n_kv_heads: 1,
        head_dim: 4,
        ffn: 12,
    }
}

pub fn join_msg(id: u64) -> Message {
    Message::Join(Join {
        protocol_version: PROTOCOL_VERSION,
        device_id: DeviceId(id),
        capabilities: Capabilities {
            ram_bytes: 4 << 30,
            backend: "flex".into(),
            bench_score: None,
            device_class: None,
        },
    })
}

/// What a device sends back for `rc`: its slice with B shifted (so the delta is non-zero), the
/// kept maps it was sliced for, 16 samples, and the given post-round loss and compute time.
pub fn shifted_answer(device: u64, rc: &RoundConfig, loss_post: f32, compute_ms: u64) -> Update {
    let slice = rc
        .global
        .as_ref()
        .expect("every round config carries a slice");
    let mut adapter = slice.adapter.to_f32();
    for (l, layer) in adapter.layers.iter_mut().enumerate() {
        if let Buffer::F32(b) = &mut layer.b.data {
            for (i, x) in b.iter_mut().enumerate() {
                *x += 0.01 * ((i + l + device as usize) % 5) as f32;
            }
        }
    }
    Update {
        round: rc.round,
        adapter,
        kept: slice.kept.clone(),
        stats: UpdateStats {
            loss_pre: 3.0,
            loss_post,
            sparsity: 0.0,
            param_count: 1000,
            compute_ms,
            bytes_down: 1000,
            bytes_up: 2000,
            peak_mem_bytes: 1 << 20,
            samples: 16,
            steps: rc.local_steps,
        },
    }
}

/// Connects and joins each `(device, join)`, then runs the coordinator until it has nothing
/// left to do, every device answering each round configuration at once with `answer`'s update
/// (10 ms later); returns every round configuration sent, in order.
pub fn run_answering(
    coord: &mut Coordinator,
    joins: Vec<(u64, Message)>,
    mut answer: impl FnMut(u64, &RoundConfig) -> Update,
) -> Vec<RoundConfig> {
    let mut now = Timestamp(0);
    let mut pending: Vec<(u64, Message)> = Vec::new();
    let mut sent = Vec::new();
    let mut collect = |cmds: Vec<Command>, pending: &mut Vec<(u64, Message)>| {
        for c in cmds {
            if let Command::Send {
                device,
                msg: Message::RoundConfig(rc),
            } = c
            {
                pending.push((device.0, Message::Update(answer(device.0, &rc))));
                sent.push(rc);
            }
        }
    };
    for (d, join) in joins {
        let device = DeviceId(d);
        let mut cmds = coord.handle(now, Event::Connected { device });
        cmds.extend(coord.handle(
            now,
            Event::Message {
                device,
                msg: join,
                bytes: 64,
            },
        ));
        collect(cmds, &mut pending);
    }
    for _ in 0..1_000 {
        if pending.is_empty() {
            match coord.poll_timeout() {
                Some(t) => {
                    now = now.max(t);
                    let cmds = coord.handle_timeout(now);
                    collect(cmds, &mut pending);
                    continue;
                }
                None => break,
            }
        }
        now = now.plus_ms(10);
        for (d, msg) in std::mem::take(&mut pending) {
            let cmds = coord.handle(
                now,
                Event::Message {
                    device: DeviceId(d),
                    msg,
                    bytes: 2_000,
                },
            );
            collect(cmds, &mut pending);
        }
    }
    sent
}
