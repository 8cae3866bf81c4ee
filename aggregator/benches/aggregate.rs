//! Benchmark: aggregation time and peak memory per method on SmolLM2-135M-sized updates, and
//! loopback QUIC (mTLS) throughput next to raw loopback TCP measured in the same run.
//!
//! `cargo bench -p aggregator --bench aggregate [-- --devices N --clients N --skip-aggregate
//! --skip-transport]`. Prints a Markdown report to stdout.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aggregator::aggregate::{
    Aggregation, AggregationConfig, AggregationMethod, Contribution, SvdMode,
};
use aggregator::pki;
use protocol::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use test_support::{peak_bytes, reset_peak, CountingAllocator};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

struct Args {
    devices: usize,
    clients: usize,
    aggregate: bool,
    transport: bool,
}

fn args() -> Args {
    let mut a = Args {
        devices: 80,
        clients: 80,
        aggregate: true,
        transport: true,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        match argv[i].as_str() {
            "--devices" => {
                i += 1;
                a.devices = argv
                    .get(i)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(a.devices);
            }
            "--clients" => {
                i += 1;
                a.clients = argv
                    .get(i)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(a.clients);
            }
            "--skip-aggregate" => a.aggregate = false,
            "--skip-transport" => a.transport = false,
            _ => {} // cargo bench passes `--bench`
        }
        i += 1;
    }
    a
}

/// Kept indices of device `k`: every other device prunes a quarter of the MLP channels and
/// one query head group (three heads sharing a KV head) of the inner blocks.
fn kept_for(dims: &ModelDims, k: usize, rng: &mut ChaCha8Rng) -> KeptIndices {
    let mut kept = KeptIndices::full(dims);
    if k % 2 == 1 {
        for b in 1..dims.n_blocks as usize - 1 {
            let block = &mut kept.blocks[b];
            let drop_group = rng.random_range(0..dims.n_kv_heads);
            block
                .query_heads
                .retain(|&q| dims.kv_head_of(q) != drop_group);
            block.kv_heads.retain(|&h| h != drop_group);
            block.mlp_channels.retain(|_| rng.random_range(0..4) != 0);
        }
    }
    kept
}

fn update_for(dims: &ModelDims, k: usize, rank: u32) -> Contribution {
    let mut rng = ChaCha8Rng::seed_from_u64(k as u64);
    let kept = kept_for(dims, k, &mut rng);
    let mut layers = Vec::with_capacity(dims.n_layers());
    for (block, bk) in kept.blocks.iter().enumerate() {
        for proj in Proj::ALL {
            let (out, inp) = kept_shape(dims, proj, bk);
            let mut fill =
                |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-0.05..0.05)).collect() };
            let a = fill(rank as usize * inp);
            let b = fill(out * rank as usize);
            layers.push(LayerAdapter {
                block: block as u32,
                proj,
                a: Tensor2::f32(rank, inp as u32, a),
                b: Tensor2::f32(out as u32, rank, b),
            });
        }
    }
    Contribution {
        device: DeviceId(k as u64),
        adapter: AdapterPayload {
            rank,
            alpha: 32.0,
            layers,
        },
        kept,
        samples: 100 + k as u64,
    }
}

fn bench_aggregation(devices: usize) {
    let dims = ModelDims::SMOLLM2_135M;
    let rank = 16;
    let t = Instant::now();
    let updates: Vec<Contribution> = (0..devices).map(|k| update_for(&dims, k, rank)).collect();
    let input_bytes: usize = updates.iter().map(|u| u.adapter.byte_len()).sum();
    println!(
        "\n## Aggregation: {devices} updates, rank {rank}, 7 projections x {} blocks\n",
        dims.n_blocks
    );
    println!(
        "Inputs: {:.1} MiB of f32 factors ({:.1} MiB per update on average; odd devices pruned \
         ~25% of MLP channels and one KV group of query heads in blocks 1..28), generated in \
         {:.1} s. Peak = largest heap growth above the inputs while adding and finishing.\n",
        mib(input_bytes),
        mib(input_bytes / devices.max(1)),
        t.elapsed().as_secs_f64()
    );
    println!("| method | add all (s) | finish (s) | total (s) | peak extra heap (MiB) | state after adds (MiB) |");
    println!("|---|---|---|---|---|---|");
    let runs = [
        ("hetlora", AggregationMethod::HetLora, SvdMode::Full),
        ("exact (full SVD)", AggregationMethod::Exact, SvdMode::Full),
        (
            "exact (randomized SVD, p=8, q=2)",
            AggregationMethod::Exact,
            SvdMode::Randomized,
        ),
        ("median", AggregationMethod::Median, SvdMode::Full),
        (
            "trimmed mean (10%)",
            AggregationMethod::TrimmedMean,
            SvdMode::Full,
        ),
    ];
    for (label, method, svd) in runs {
        let batch = updates.clone();
        let base = reset_peak();
        let t0 = Instant::now();
        let config = AggregationConfig {
            method,
            trim_fraction: 0.1,
            svd,
            svd_oversample: 8,
            svd_power_iters: 2,
            ..AggregationConfig::default()
        };
        let mut agg = Aggregation::new(dims, rank, config).expect("config");
        for u in batch {
            agg.add(u).expect("valid update");
        }
        let t_add = t0.elapsed();
        let state = agg.state_bytes();
        let t1 = Instant::now();
        let global = agg.finish(None).expect("finish");
        let t_finish = t1.elapsed();
        let peak = peak_bytes().saturating_sub(base);
        // The batch is cloned before `base`: buffering methods take ownership of updates that
        // already exist, so the peak counts only what aggregation itself allocates.
        println!(
            "| {label} | {:.2} | {:.2} | {:.2} | {:.1} | {:.1} |",
            t_add.as_secs_f64(),
            t_finish.as_secs_f64(),
            (t_add + t_finish).as_secs_f64(),
            mib(peak),
            mib(state)
        );
        drop(global);
    }
}

struct Pki {
    _dir: tempfile::TempDir,
    server: quinn::ServerConfig,
    clients: Vec<quinn::ClientConfig>,
}

fn make_pki(clients: usize) -> Pki {
    let dir = tempfile::tempdir().expect("tempdir");
    pki::init_ca(dir.path()).expect("ca");
    pki::issue_server(dir.path(), &["localhost".into()]).expect("server cert");
    let clients = (0..clients)
        .map(|k| {
            pki::issue_device(dir.path(), DeviceId(k as u64)).expect("device cert");
            transport::load_client_config(dir.path(), DeviceId(k as u64)).expect("client config")
        })
        .collect();
    Pki {
        server: transport::load_server_config(dir.path()).expect("server config"),
        clients,
        _dir: dir,
    }
}

fn ack() -> Vec<u8> {
    encode_frame(&Message::Ack(Ack { round: RoundId(1) })).expect("encode")
}

/// QUIC: `clients` devices each send `frame` and wait for the server's Ack (the server
/// decodes every update). Returns the wall time of the whole exchange.
async fn quic_round(pki: &Pki, frame: Arc<Vec<u8>>, clients: usize) -> (Duration, u64, u64) {
    let server = transport::server_endpoint("127.0.0.1:0".parse().unwrap(), pki.server.clone())
        .expect("server endpoint");
    let addr = server.local_addr().expect("addr");
    let server_task = tokio::spawn(async move {
        let mut handlers = Vec::new();
        for _ in 0..clients {
            let incoming = server.accept().await.expect("incoming");
            handlers.push(tokio::spawn(async move {
                let mut dev = transport::accept_device(incoming, DEFAULT_MAX_FRAME_BYTES)
                    .await
                    .expect("accept");
                let m = dev.stream.recv().await.expect("recv").expect("message");
                assert!(matches!(m, Message::Update(_)));
                dev.stream
                    .send(&Message::Ack(Ack { round: RoundId(1) }))
                    .await
                    .expect("ack");
                dev.stream.finish().ok();
                // Keep the connection until the client has read the Ack.
                dev.connection.closed().await;
            }));
        }
        for h in handlers {
            h.await.expect("handler");
        }
    });
    let start = Instant::now();
    let mut tasks = Vec::new();
    for config in pki.clients.iter().take(clients) {
        let frame = frame.clone();
        let config = config.clone();
        tasks.push(tokio::spawn(async move {
            let ep = transport::client_endpoint("127.0.0.1:0".parse().unwrap(), config)
                .expect("client endpoint");
            let mut conn = transport::connect(&ep, addr, "localhost", DEFAULT_MAX_FRAME_BYTES)
                .await
                .expect("connect");
            conn.stream.send_raw(&frame).await.expect("send");
            let reply = conn.stream.recv().await.expect("recv");
            assert!(matches!(reply, Some(Message::Ack(_))));
            let stats = conn.connection.stats();
            conn.connection.close(0u32.into(), b"done");
            ep.wait_idle().await;
            (stats.udp_tx.datagrams, stats.path.lost_packets)
        }));
    }
    let (mut sent, mut lost) = (0, 0);
    for t in tasks {
        let (s, l) = t.await.expect("client");
        sent += s;
        lost += l;
    }
    let elapsed = start.elapsed();
    server_task.await.expect("server");
    (elapsed, sent, lost)
}

/// Raw TCP: the same frames, same read-check-decode-ack exchange, no TLS.
async fn tcp_round(frame: Arc<Vec<u8>>, clients: usize) -> Duration {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr: SocketAddr = listener.local_addr().expect("addr");
    let server_task = tokio::spawn(async move {
        let mut handlers = Vec::new();
        for _ in 0..clients {
            let (mut sock, _) = listener.accept().await.expect("accept");
            handlers.push(tokio::spawn(async move {
                let mut header = [0u8; FRAME_HEADER_BYTES];
                sock.read_exact(&mut header).await.expect("header");
                let len = frame_body_len(header, DEFAULT_MAX_FRAME_BYTES).expect("len");
                let mut body = vec![0u8; len];
                sock.read_exact(&mut body).await.expect("body");
                let m = decode_body(&body).expect("decode");
                assert!(matches!(m, Message::Update(_)));
                sock.write_all(&ack()).await.expect("ack");
            }));
        }
        for h in handlers {
            h.await.expect("handler");
        }
    });
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let frame = frame.clone();
        tasks.push(tokio::spawn(async move {
            let mut sock = tokio::net::TcpStream::connect(addr).await.expect("connect");
            sock.write_all(&frame).await.expect("send");
            let mut reply = vec![0u8; ack().len()];
            sock.read_exact(&mut reply).await.expect("reply");
        }));
    }
    for t in tasks {
        t.await.expect("client");
    }
    let elapsed = start.elapsed();
    server_task.await.expect("server");
    elapsed
}

fn bench_transport(clients: usize) {
    transport::install_crypto_provider();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dims = ModelDims::SMOLLM2_135M;
    // Device 0 is unpruned: a full rank-16 update.
    let update = update_for(&dims, 0, 16);
    let frame = Arc::new(
        encode_frame(&Message::Update(Update {
            round: RoundId(1),
            adapter: update.adapter,
            kept: update.kept,
            stats: UpdateStats {
                loss_pre: 3.0,
                loss_post: 2.9,
                sparsity: 0.0,
                param_count: 0,
                compute_ms: 0,
                bytes_down: 0,
                bytes_up: 0,
                peak_mem_bytes: 0,
                samples: 100,
                steps: 10,
            },
        }))
        .expect("encode"),
    );
    let t = Instant::now();
    let pki = make_pki(clients.max(1));
    println!(
        "\n## Loopback transfer: {:.2} MB update frame (rank 16, f32), {} client certificates issued in {:.1} s\n",
        frame.len() as f64 / 1e6,
        clients.max(1),
        t.elapsed().as_secs_f64()
    );
    println!("Each exchange: connect (QUIC: TLS 1.3 handshake with client certificate), send the frame, server checks the length prefix, reads, decodes, replies Ack. Best of 3 for one client; one run for {clients} concurrent clients.\n");
    println!("| transport | clients | wall (s) | goodput (MB/s) | datagrams sent by clients | client packets declared lost |");
    println!("|---|---|---|---|---|---|");
    let mb = frame.len() as f64 / 1e6;
    let quic1 = (0..3)
        .map(|_| runtime.block_on(quic_round(&pki, frame.clone(), 1)))
        .min_by_key(|r| r.0)
        .expect("three runs");
    let tcp1 = (0..3)
        .map(|_| runtime.block_on(tcp_round(frame.clone(), 1)))
        .min()
        .expect("three runs");
    let quic_n = runtime.block_on(quic_round(&pki, frame.clone(), clients));
    let tcp_n = runtime.block_on(tcp_round(frame.clone(), clients));
    for (n, (d, datagrams, lost), tcp) in [(1, quic1, tcp1), (clients, quic_n, tcp_n)] {
        let total = mb * n as f64;
        println!(
            "| QUIC + mTLS | {n} | {:.3} | {:.0} | {datagrams} | {lost} |",
            d.as_secs_f64(),
            total / d.as_secs_f64()
        );
        println!(
            "| raw TCP | {n} | {:.3} | {:.0} | | |",
            tcp.as_secs_f64(),
            total / tcp.as_secs_f64()
        );
    }
}

fn main() {
    let a = args();
    println!("# aggregator benchmark");
    println!(
        "\nMachine: {} logical CPUs. Command: `cargo bench -p aggregator --bench aggregate`.",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    if a.aggregate {
        bench_aggregation(a.devices);
    }
    if a.transport {
        bench_transport(a.clients);
    }
}
