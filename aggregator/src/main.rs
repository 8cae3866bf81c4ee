//! The `aggregator` command line: manage the private CA (`ca init`, `ca issue-device`,
//! `ca issue-server`, `ca export-device`, `ca export-server`, `ca revoke`) and run the
//! federated server (`serve`).

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use aggregator::{pki, server};
use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use protocol::DeviceId;

#[derive(Parser)]
#[command(
    name = "aggregator",
    version,
    about = "FedSpine aggregator: private CA and the federated prune-and-tune server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Certificate authority for mutual TLS.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Run rounds with the devices that connect, until the configured rounds are done.
    Serve(ServeArgs),
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create a new CA (refuses to replace an existing one).
    Init {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue device certificates (`device-<id>.pem` and its key).
    IssueDevice {
        #[arg(long)]
        dir: PathBuf,
        /// Device id; repeat for several devices.
        #[arg(long = "id", required = true)]
        ids: Vec<u64>,
    },
    /// Issue the aggregator's certificate for the names devices dial.
    IssueServer {
        #[arg(long)]
        dir: PathBuf,
        /// DNS name or IP address; repeat for several.
        #[arg(long = "name", required = true)]
        names: Vec<String>,
    },
    /// Write a device's bundle (ca.pem, device-<id>.pem and its key; never the CA key) into a
    /// directory of its own, the one `device-agent join --pki` loads from.
    ExportDevice {
        /// The CA directory.
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        id: u64,
        #[arg(long)]
        out: PathBuf,
    },
    /// Write the server's bundle (ca.pem, server.pem and its key; never the CA key) into the
    /// directory `serve --pki` loads from.
    ExportServer {
        /// The CA directory.
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Append to the revocation list (revoked.txt) a running server re-reads: a device (every
    /// certificate naming it; with its certificate's fingerprint if --dir holds it) and/or
    /// single certificates by fingerprint.
    Revoke {
        /// The server's PKI directory (where revoked.txt lives).
        #[arg(long)]
        dir: PathBuf,
        /// Device id to refuse whatever certificate it presents.
        #[arg(long)]
        id: Option<u64>,
        /// Certificate file to refuse (by SHA-256 fingerprint); repeat for several.
        #[arg(long = "cert")]
        certs: Vec<PathBuf>,
    },
}

#[derive(Args)]
struct ServeArgs {
    /// Run configuration (TOML): coordinator settings and the `model`.
    #[arg(long)]
    config: PathBuf,
    /// PKI directory with ca.pem, server.pem and server.key.pem (and optionally revoked.txt;
    /// the CA key does not belong here: see `ca export-server`).
    #[arg(long)]
    pki: PathBuf,
    /// UDP address to listen on.
    #[arg(long, default_value = "0.0.0.0:4433")]
    listen: SocketAddr,
    /// Directory of the checkpoint written at every round end.
    #[arg(long)]
    state: PathBuf,
    /// Continue the run saved in --state (refuses a corrupt or incompatible checkpoint).
    #[arg(long)]
    resume: bool,
    /// Per-round metrics, one JSON object per line (appended).
    #[arg(long)]
    metrics: Option<PathBuf>,
    /// Serve Prometheus metrics over plain HTTP (`GET /metrics`) on this address, e.g.
    /// 127.0.0.1:9464 (off unless given; bind it to a private interface).
    #[arg(long)]
    prometheus_listen: Option<SocketAddr>,
    /// Largest number of simultaneous connections.
    #[arg(long, default_value_t = 1024)]
    max_connections: usize,
    /// Largest number of simultaneous connections from one IP address (an IPv6 /64 counts as
    /// one address).
    #[arg(long, default_value_t = 64)]
    max_connections_per_ip: usize,
    /// Largest number of connections from one IP address still in their handshake.
    #[arg(long, default_value_t = 16)]
    max_handshakes_per_ip: usize,
    /// Skip QUIC address validation (Retry): saves a round trip per connection, but spoofed
    /// or stalled Initial packets then hold connection slots.
    #[arg(long)]
    no_address_validation: bool,
    /// Milliseconds a connection has to finish its handshake and open its stream.
    #[arg(long, default_value_t = 10_000)]
    handshake_timeout_ms: u64,
    /// Milliseconds a frame has to arrive whole once its first byte arrived.
    #[arg(long, default_value_t = 60_000)]
    frame_timeout_ms: u64,
    /// Milliseconds one frame write to a device may take (a device that does not read).
    #[arg(long, default_value_t = 30_000)]
    write_timeout_ms: u64,
    /// Sustained messages per second one connection may send.
    #[arg(long, default_value_t = 20.0)]
    messages_per_second: f64,
    /// Messages one connection may send in a burst above that rate.
    #[arg(long, default_value_t = 64)]
    message_burst: u32,
    /// Messages of all connections waiting for the coordinator thread at most.
    #[arg(long, default_value_t = 1024)]
    inbound_messages: usize,
    /// MiB of frames of all connections waiting for the coordinator thread at most (a larger
    /// frame waits alone); with --inbound-messages this bounds what floods can hold.
    #[arg(long, default_value_t = 1024)]
    inbound_mib: usize,
    /// MiB queued to one device before a further frame to it is refused.
    #[arg(long, default_value_t = 64)]
    outbound_queue_mib: usize,
    /// Seconds to wait for devices to leave after the last round.
    #[arg(long, default_value_t = 5)]
    finish_grace_s: u64,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,quinn=warn,rustls=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match Cli::parse().command {
        Command::Ca(ca) => run_ca(ca),
        Command::Serve(args) => run_serve(args),
    }
}

fn run_ca(cmd: CaCommand) -> Result<()> {
    match cmd {
        CaCommand::Init { dir } => {
            let paths = pki::init_ca(&dir).context("creating the CA")?;
            println!("CA certificate {}", paths.cert.display());
        }
        CaCommand::IssueDevice { dir, ids } => {
            for id in ids {
                let paths = pki::issue_device(&dir, DeviceId(id))
                    .with_context(|| format!("issuing the certificate of device {id}"))?;
                println!("device {id}: {}", paths.cert.display());
            }
        }
        CaCommand::IssueServer { dir, names } => {
            let paths =
                pki::issue_server(&dir, &names).context("issuing the server certificate")?;
            println!("server certificate {}", paths.cert.display());
        }
        CaCommand::ExportDevice { dir, id, out } => {
            let written = pki::export_device(&dir, DeviceId(id), &out)
                .with_context(|| format!("exporting the bundle of device {id}"))?;
            for path in written {
                println!("{}", path.display());
            }
        }
        CaCommand::ExportServer { dir, out } => {
            let written = pki::export_server(&dir, &out).context("exporting the server bundle")?;
            for path in written {
                println!("{}", path.display());
            }
        }
        CaCommand::Revoke { dir, id, certs } => {
            let lines = pki::revoke(&dir, id.map(DeviceId), &certs).context("revoking")?;
            for line in lines {
                println!("{line}");
            }
        }
    }
    Ok(())
}

fn run_serve(args: ServeArgs) -> Result<()> {
    transport::install_crypto_provider();
    // The flags first: a bad one is named before any file is read.
    let limits = limits_of(&args)?;
    if let Some(ca_key) = server::exposed_ca_key(&args.pki) {
        eprintln!(
            "warning: the CA key {} sits in the server's PKI directory; keep it offline and serve from `aggregator ca export-server --dir <ca> --out <pki>`",
            ca_key.display()
        );
    }
    let (config, dims) = server::load_serve_config(&args.config)?;
    let mut opts = server::ServeOptions::new(args.listen, args.pki.clone(), args.state.clone());
    opts.metrics = args.metrics.clone();
    opts.prometheus = args.prometheus_listen;
    opts.limits = limits;
    opts.finish_grace = Duration::from_secs(args.finish_grace_s);
    let rounds = config.rounds;
    let coordinator = server::prepare(config, dims, &opts, args.resume)?;
    if args.resume {
        let state = coordinator.state();
        tracing::info!(
            round = state.round.0,
            bandit_digest = %state.bandit_digest(),
            path = %opts.checkpoint_path().display(),
            "resumed"
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let outcome = runtime.block_on(server::serve(
        coordinator,
        &opts,
        args.resume,
        |addr| {
            // Scripts and tests read the bound address from the first line of stdout.
            println!("listening on {addr}");
        },
        shutdown_signal(),
    ))?;
    if outcome.finished {
        println!("finished: {} of {rounds} rounds", outcome.round.0);
    } else {
        println!(
            "stopped after round {} of {rounds}; continue with --resume",
            outcome.round.0
        );
    }
    Ok(())
}

/// Resolves on Ctrl-C (or SIGTERM on Unix).
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Largest `--inbound-mib`: the byte budget is counted in `u32` permits of one byte.
const MAX_INBOUND_MIB: usize = (u32::MAX as usize) >> 20;

/// Largest `--inbound-messages` (tokio's semaphores hold at most this many permits).
const MAX_INBOUND_MESSAGES: usize = tokio::sync::Semaphore::MAX_PERMITS;

/// The connection limits of `serve`'s flags; a count, rate, budget or timeout of 0 is refused
/// by name, and so is a budget over what the server can count.
fn limits_of(args: &ServeArgs) -> Result<server::NetLimits> {
    if !(args.messages_per_second.is_finite() && args.messages_per_second > 0.0) {
        anyhow::bail!(
            "--messages-per-second must be a positive number, got {}",
            args.messages_per_second
        );
    }
    for (flag, value) in [
        ("--max-connections", args.max_connections as u64),
        (
            "--max-connections-per-ip",
            args.max_connections_per_ip as u64,
        ),
        ("--max-handshakes-per-ip", args.max_handshakes_per_ip as u64),
        ("--handshake-timeout-ms", args.handshake_timeout_ms),
        ("--frame-timeout-ms", args.frame_timeout_ms),
        ("--write-timeout-ms", args.write_timeout_ms),
        ("--message-burst", args.message_burst as u64),
        ("--inbound-messages", args.inbound_messages as u64),
        ("--inbound-mib", args.inbound_mib as u64),
        ("--outbound-queue-mib", args.outbound_queue_mib as u64),
    ] {
        if value == 0 {
            anyhow::bail!("{flag} must be at least 1");
        }
    }
    if args.inbound_messages > MAX_INBOUND_MESSAGES {
        anyhow::bail!("--inbound-messages must be at most {MAX_INBOUND_MESSAGES}");
    }
    if args.inbound_mib > MAX_INBOUND_MIB {
        anyhow::bail!("--inbound-mib must be at most {MAX_INBOUND_MIB} (just under 4 GiB)");
    }
    let Some(outbound_queue_bytes) = args.outbound_queue_mib.checked_mul(1 << 20) else {
        anyhow::bail!("--outbound-queue-mib must fit in this machine's memory");
    };
    Ok(server::NetLimits {
        max_connections: args.max_connections,
        max_connections_per_ip: args.max_connections_per_ip,
        max_handshakes_per_ip: args.max_handshakes_per_ip,
        validate_addresses: !args.no_address_validation,
        handshake_timeout: Duration::from_millis(args.handshake_timeout_ms),
        frame_read_timeout: Duration::from_millis(args.frame_timeout_ms),
        write_timeout: Duration::from_millis(args.write_timeout_ms),
        messages_per_second: args.messages_per_second,
        message_burst: args.message_burst,
        inbound_total: args.inbound_messages,
        inbound_bytes_total: args.inbound_mib << 20,
        outbound_queue_bytes,
        ..server::NetLimits::default()
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn limits(flags: &[&str]) -> Result<server::NetLimits> {
        let mut argv = vec![
            "aggregator",
            "serve",
            "--config",
            "c.toml",
            "--pki",
            "p",
            "--state",
            "s",
        ];
        argv.extend_from_slice(flags);
        match Cli::try_parse_from(argv)?.command {
            Command::Serve(args) => limits_of(&args),
            Command::Ca(_) => unreachable!("parsed as serve"),
        }
    }

    #[test]
    fn the_defaults_are_the_servers_defaults() {
        assert_eq!(limits(&[]).unwrap(), server::NetLimits::default());
    }

    #[test]
    fn each_budget_flag_sets_its_own_field() {
        let l = limits(&[
            "--inbound-messages",
            "64",
            "--inbound-mib",
            "256",
            "--outbound-queue-mib",
            "16",
            "--message-burst",
            "9",
        ])
        .unwrap();
        assert_eq!(
            (
                l.inbound_total,
                l.inbound_bytes_total,
                l.outbound_queue_bytes,
                l.message_burst
            ),
            (64, 256 << 20, 16 << 20, 9)
        );
        assert_eq!(l.inbound_per_connection, 4, "no flag: the default");
    }

    #[test]
    fn zeros_and_budgets_past_what_the_server_counts_are_refused_by_name() {
        for flag in [
            "--max-connections",
            "--message-burst",
            "--frame-timeout-ms",
            "--inbound-messages",
            "--inbound-mib",
            "--outbound-queue-mib",
        ] {
            let e = limits(&[flag, "0"]).unwrap_err().to_string();
            assert!(e.contains(&format!("{flag} must be at least 1")), "{e}");
        }
        let e = limits(&["--inbound-mib", "4096"]).unwrap_err().to_string();
        assert!(e.contains("--inbound-mib must be at most 4095"), "{e}");
        assert!(limits(&["--inbound-mib", "4095"]).is_ok());
        let too_many = (MAX_INBOUND_MESSAGES + 1).to_string();
        let e = limits(&["--inbound-messages", &too_many])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--inbound-messages must be at most"), "{e}");
        let e = limits(&["--messages-per-second", "0"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--messages-per-second"), "{e}");
    }
}
