//! A load run's devices: N scripted devices with their own certificates, spread over a few
//! loopback addresses (one UDP socket per address, every device its own mutual-TLS
//! connection), all connecting at once. Each joins, answers every round configuration with its
//! slice shifted a little, and leaves at the goodbye. Times are measured per device: the
//! connection (QUIC with Retry and TLS) and Join-to-Welcome.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use protocol::{ByeReason, DeviceId, Message, DEFAULT_MAX_FRAME_BYTES};

use crate::common;

/// What the devices of a load run saw.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Milliseconds from starting to connect to an open connection, per device.
    pub connect_ms: Vec<f64>,
    /// Milliseconds from sending the Join to reading the Welcome, per device.
    pub join_ms: Vec<f64>,
    /// Rounds each device answered.
    pub answered: Vec<Vec<u64>>,
    /// Devices that ended without `Bye(Finished)`, with what happened.
    pub failures: Vec<String>,
}

/// The `q`-quantile (0..=1) of `values` (nearest rank); 0 when empty.
pub fn quantile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

struct DeviceRun {
    connect_ms: f64,
    join_ms: f64,
    answered: Vec<u64>,
}

/// Runs devices `ids` against the server at `addr`, `per_address` of them on each loopback
/// address 127.0.1.x (x from 1). Their certificates must be in `pki`.
pub async fn run_devices(
    pki: &Path,
    addr: SocketAddr,
    ids: std::ops::RangeInclusive<u64>,
    per_address: usize,
) -> LoadReport {
    let ids: Vec<u64> = ids.collect();
    let mut tasks = Vec::with_capacity(ids.len());
    for (group, chunk) in ids.chunks(per_address.max(1)).enumerate() {
        let bind: SocketAddr = format!("127.0.1.{}:0", group + 1).parse().unwrap();
        let first = transport::load_client_config(pki, DeviceId(chunk[0])).unwrap();
        let endpoint = transport::client_endpoint(bind, first).unwrap();
        for &id in chunk {
            let config = transport::load_client_config(pki, DeviceId(id)).unwrap();
            let endpoint = endpoint.clone();
            tasks.push(tokio::spawn(async move {
                let run = device(&endpoint, config, id, addr).await;
                (id, run)
            }));
        }
    }
    let mut report = LoadReport::default();
    for task in tasks {
        match task.await {
            Ok((_, Ok(run))) => {
                report.connect_ms.push(run.connect_ms);
                report.join_ms.push(run.join_ms);
                report.answered.push(run.answered);
            }
            Ok((id, Err(e))) => report.failures.push(format!("device {id}: {e}")),
            Err(e) => report.failures.push(format!("a device task failed: {e}")),
        }
    }
    report
}

async fn device(
    endpoint: &quinn::Endpoint,
    config: quinn::ClientConfig,
    id: u64,
    addr: SocketAddr,
) -> Result<DeviceRun, String> {
    let started = Instant::now();
    let mut conn =
        transport::connect_with(endpoint, config, addr, "localhost", DEFAULT_MAX_FRAME_BYTES)
            .await
            .map_err(|e| format!("connect: {e}"))?;
    let connect_ms = started.elapsed().as_secs_f64() * 1e3;
    let joined = Instant::now();
    conn.stream
        .send(&common::join_msg(id))
        .await
        .map_err(|e| format!("join: {e}"))?;
    let mut join_ms = None;
    let mut answered = Vec::new();
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(120), conn.stream.recv())
            .await
            .map_err(|_| "nothing from the server for 120 s".to_string())?
            .map_err(|e| format!("recv: {e}"))?
            .ok_or("the server finished the stream")?;
        match msg {
            Message::Welcome(_) => {
                join_ms.get_or_insert(joined.elapsed().as_secs_f64() * 1e3);
            }
            Message::RoundConfig(rc) => {
                let update = common::shifted_answer(id, &rc, 2.0, 5);
                answered.push(rc.round.0);
                conn.stream
                    .send(&Message::Update(update))
                    .await
                    .map_err(|e| format!("update: {e}"))?;
            }
            Message::Bye(bye) if bye.reason == ByeReason::Finished => break,
            Message::Bye(bye) => return Err(format!("goodbye: {:?}", bye.reason)),
            Message::Reject(r) => return Err(format!("rejected: {}", r.reason)),
            _ => {}
        }
    }
    conn.connection.close(quinn::VarInt::from_u32(0), b"done");
    Ok(DeviceRun {
        connect_ms,
        join_ms: join_ms.ok_or("no Welcome")?,
        answered,
    })
}
