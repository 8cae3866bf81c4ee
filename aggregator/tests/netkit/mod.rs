//! Helpers shared by the server attack tests: a PKI, serve options, the server on its own task,
//! a device connection from a chosen loopback address (optionally with a tiny receive window,
//! for a device that does not read), an honest scripted device, and the reason a connection
//! was closed with; `load.rs` runs many scripted devices at once.

#![allow(dead_code)] // each test binary uses its own subset

pub mod load;

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use aggregator::server::{self, ServeOptions, ServeOutcome, ServerError};
use aggregator::{pki, Coordinator, CoordinatorConfig};
use protocol::{ByeReason, DeviceId, Message, ModelDims, DEFAULT_MAX_FRAME_BYTES};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::common;

/// A CA, a server certificate for `localhost` and the devices' certificates in `dir`.
pub fn pki_dir(dir: &Path, devices: impl IntoIterator<Item = u64>) {
    pki::init_ca(dir).unwrap();
    pki::issue_server(dir, &["localhost".into()]).unwrap();
    for d in devices {
        pki::issue_device(dir, DeviceId(d)).unwrap();
    }
}

/// One round of `devices_per_round` devices, ranks up to 8, a 20 s deadline.
pub fn config(rounds: u64, devices_per_round: usize) -> CoordinatorConfig {
    let mut c = CoordinatorConfig {
        rounds,
        devices_per_round,
        over_selection: 0.0,
        round_deadline_ms: 20_000,
        max_rank: 8,
        seed: 3,
        ..CoordinatorConfig::default()
    };
    c.arms.ranks = vec![2, 4, 8];
    c.arms.ratio_max = 0.3;
    c
}

/// Large enough that a round configuration is a quarter megabyte at rank 8.
pub fn wide_dims() -> ModelDims {
    ModelDims {
        n_blocks: 2,
        d_model: 256,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 64,
        ffn: 512,
    }
}

/// Serve options on an ephemeral loopback port under `dir`.
pub fn options(dir: &Path) -> ServeOptions {
    let mut opts = ServeOptions::new(
        "127.0.0.1:0".parse().unwrap(),
        dir.join("pki"),
        dir.join("state"),
    );
    opts.progress = false;
    opts.finish_grace = Duration::from_secs(2);
    opts
}

/// A coordinator for `dims` and the server running it on its own task until `shutdown`.
pub async fn spawn_server(
    config: CoordinatorConfig,
    dims: ModelDims,
    opts: &ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> (JoinHandle<Result<ServeOutcome, ServerError>>, SocketAddr) {
    let coord: Coordinator = server::prepare(config, dims, opts, false).unwrap();
    let (addr_tx, addr_rx) = oneshot::channel();
    let server_opts = opts.clone();
    let server = tokio::spawn(async move {
        server::serve(
            coord,
            &server_opts,
            false,
            |a| addr_tx.send(a).unwrap(),
            shutdown,
        )
        .await
    });
    (server, addr_rx.await.unwrap())
}

/// A server for device 1 alone (certificates in `pki`, one round of three devices, so it
/// waits), stopped by the sender returned, and device 1 connected from 127.0.0.1 and welcomed.
pub async fn one_joined_device(
    pki: &Path,
    opts: &ServeOptions,
) -> (
    JoinHandle<Result<ServeOutcome, ServerError>>,
    oneshot::Sender<()>,
    Peer,
) {
    pki_dir(pki, [1]);
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (server, addr) = spawn_server(config(1, 3), common::dims(), opts, async {
        let _ = stop_rx.await;
    })
    .await;
    let mut peer = connect(pki, 1, addr, "127.0.0.1", None).await.unwrap();
    assert!(matches!(peer.join(1).await, Ok(Message::Welcome(_))));
    (server, stop_tx, peer)
}

/// Waits for the server task (at most 60 s).
pub async fn outcome(server: JoinHandle<Result<ServeOutcome, ServerError>>) -> ServeOutcome {
    tokio::time::timeout(Duration::from_secs(60), server)
        .await
        .expect("the server did not stop within 60 s")
        .unwrap()
        .unwrap()
}

/// A device's connection (its endpoint kept alive with it).
pub struct Peer {
    pub endpoint: quinn::Endpoint,
    pub conn: transport::AggregatorConnection,
}

/// Connects as device `id` from `bind_ip` (any 127.x.y.z on Linux). `window` shrinks the
/// device's receive windows to that many bytes: a device that does not read then blocks the
/// server's writes as soon as that much is in flight.
pub async fn connect(
    pki: &Path,
    id: u64,
    addr: SocketAddr,
    bind_ip: &str,
    window: Option<u32>,
) -> Result<Peer, String> {
    let mut config = transport::load_client_config(pki, DeviceId(id)).unwrap();
    if let Some(bytes) = window {
        let mut t = transport::transport_config();
        t.stream_receive_window(quinn::VarInt::from_u32(bytes))
            .receive_window(quinn::VarInt::from_u32(bytes));
        config.transport_config(Arc::new(t));
    }
    let bind: SocketAddr = format!("{bind_ip}:0").parse().unwrap();
    let endpoint = transport::client_endpoint(bind, config).unwrap();
    let conn = transport::connect(&endpoint, addr, "localhost", DEFAULT_MAX_FRAME_BYTES)
        .await
        .map_err(|e| e.to_string())?;
    Ok(Peer { endpoint, conn })
}

impl Peer {
    /// Sends a Join and returns the first answer (or the close reason).
    pub async fn join(&mut self, id: u64) -> Result<Message, String> {
        self.conn
            .stream
            .send(&common::join_msg(id))
            .await
            .map_err(|e| e.to_string())?;
        match tokio::time::timeout(Duration::from_secs(10), self.conn.stream.recv()).await {
            Ok(Ok(Some(msg))) => Ok(msg),
            Ok(Ok(None)) => Err("stream finished".into()),
            Ok(Err(_)) => Err(self.closed().await),
            Err(_) => Err("no answer within 10 s".into()),
        }
    }

    /// The reason the server closed the connection with (waits at most 10 s).
    pub async fn closed(&self) -> String {
        close_reason(&self.conn.connection).await
    }
}

/// The reason a connection was closed with (waits at most 10 s).
pub async fn close_reason(connection: &quinn::Connection) -> String {
    match tokio::time::timeout(Duration::from_secs(10), connection.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(c)) => {
            String::from_utf8_lossy(&c.reason).into_owned()
        }
        Ok(other) => other.to_string(),
        Err(_) => "still open".into(),
    }
}

/// An honest scripted device from 127.0.0.1: joins, answers every round configuration with its
/// slice shifted a little, and returns the goodbye reason and the rounds it answered.
pub async fn honest(pki: &Path, id: u64, addr: SocketAddr) -> (Option<ByeReason>, Vec<u64>) {
    let mut peer = connect(pki, id, addr, "127.0.0.1", None).await.unwrap();
    peer.conn.stream.send(&common::join_msg(id)).await.unwrap();
    let mut answered = Vec::new();
    loop {
        match peer.conn.stream.recv().await {
            Ok(Some(Message::RoundConfig(rc))) => {
                let update = common::shifted_answer(id, &rc, 2.0, 5);
                answered.push(rc.round.0);
                peer.conn
                    .stream
                    .send(&Message::Update(update))
                    .await
                    .unwrap();
            }
            Ok(Some(Message::Bye(bye))) => return (Some(bye.reason), answered),
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => return (None, answered),
        }
    }
}

/// Honest devices `ids`, each on its own task.
pub fn spawn_honest(
    pki: &Path,
    addr: SocketAddr,
    ids: impl IntoIterator<Item = u64>,
) -> Vec<JoinHandle<(Option<ByeReason>, Vec<u64>)>> {
    ids.into_iter()
        .map(|id| {
            let pki = pki.to_path_buf();
            tokio::spawn(async move { honest(&pki, id, addr).await })
        })
        .collect()
}

/// Waits for honest devices and checks each finished the run having answered `rounds`.
pub async fn expect_finished(
    devices: Vec<JoinHandle<(Option<ByeReason>, Vec<u64>)>>,
    rounds: &[u64],
) {
    for d in devices {
        let (bye, answered) = tokio::time::timeout(Duration::from_secs(60), d)
            .await
            .expect("an honest device did not finish within 60 s")
            .unwrap();
        assert_eq!(bye, Some(ByeReason::Finished));
        assert_eq!(answered, rounds);
    }
}
