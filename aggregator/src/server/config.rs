//! How the server runs: the serve config file (coordinator settings and the model), the
//! [`ServeOptions`] of one run, and the [`NetLimits`] that bound what peers may cost it.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use protocol::ModelDims;
use serde::{Deserialize, Serialize};

use super::{ServerError, CHECKPOINT_FILE};
use crate::coordinator::CoordinatorConfig;

/// The model a run is for: a preset name or explicit dimensions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ModelSpec {
    /// `smollm2-135m`.
    Preset(String),
    Dims(ModelDims),
}

impl ModelSpec {
    /// The dimensions this spec names.
    pub fn dims(&self) -> Result<ModelDims, String> {
        match self {
            ModelSpec::Preset(name) if name == "smollm2-135m" => Ok(ModelDims::SMOLLM2_135M),
            ModelSpec::Preset(other) => Err(format!(
                "unknown model preset '{other}' (known: smollm2-135m; or give n_blocks, d_model, n_heads, n_kv_heads, head_dim, ffn)"
            )),
            ModelSpec::Dims(d) => Ok(*d),
        }
    }
}

/// Reads a serve config: the coordinator settings ([`CoordinatorConfig`]) plus an optional
/// `model` entry (a preset name such as `model = "smollm2-135m"`, the default, or a `[model]`
/// table with the six dimensions).
pub fn load_serve_config(path: &Path) -> Result<(CoordinatorConfig, ModelDims), ServerError> {
    let config_err = |detail: String| ServerError::Config {
        path: path.to_path_buf(),
        detail,
    };
    let text = std::fs::read_to_string(path).map_err(|source| ServerError::Io {
        path: path.to_path_buf(),
        op: "read",
        source,
    })?;
    let mut table: toml::Table = toml::from_str(&text).map_err(|e| config_err(e.to_string()))?;
    let dims = match table.remove("model") {
        None => ModelDims::SMOLLM2_135M,
        Some(value) => value
            .try_into::<ModelSpec>()
            .map_err(|e| config_err(format!("model: {e}")))?
            .dims()
            .map_err(config_err)?,
    };
    let config: CoordinatorConfig = table.try_into().map_err(|e| config_err(e.to_string()))?;
    config.validate().map_err(|e| config_err(e.to_string()))?;
    Ok((config, dims))
}

/// What one peer (or one address) may cost the server. Every queue the server keeps is bounded
/// by these; the defaults suit a public server with up to a thousand devices.
#[derive(Clone, Debug, PartialEq)]
pub struct NetLimits {
    /// Largest number of live connections (handshaking or established).
    pub max_connections: usize,
    /// Live connections from one IP address (handshaking or established); an IPv6 /64 counts
    /// as one address.
    pub max_connections_per_ip: usize,
    /// Connections from one IP address (an IPv6 /64) still in their handshake.
    pub max_handshakes_per_ip: usize,
    /// Answer a connection attempt from an address not yet validated with a QUIC Retry (a
    /// stateless round trip that proves the sender receives at its address), so spoofed or
    /// stalled Initial packets hold no connection slot.
    pub validate_addresses: bool,
    /// A connection must finish its TLS handshake and open its stream within this time.
    pub handshake_timeout: Duration,
    /// From a frame's first byte, the whole frame must arrive within this time.
    pub frame_read_timeout: Duration,
    /// One frame write to a device must finish within this time (a device that does not read
    /// blocks writes once its flow-control window is full).
    pub write_timeout: Duration,
    /// Frames queued to one device at most.
    pub outbound_queue_frames: usize,
    /// Bytes queued to one device before a further frame is refused: the queue holds at most
    /// this plus one frame.
    pub outbound_queue_bytes: usize,
    /// Messages of one connection waiting for the coordinator thread at most (read-ahead).
    pub inbound_per_connection: usize,
    /// Messages of all connections waiting for the coordinator thread at most.
    pub inbound_total: usize,
    /// Frame bytes of all connections waiting for the coordinator thread at most (a frame
    /// larger than this waits alone).
    pub inbound_bytes_total: usize,
    /// Sustained messages per second one connection may send.
    pub messages_per_second: f64,
    /// Messages one connection may send in a burst above that rate; as many messages again
    /// over the rate (dropped, counted) close the connection.
    pub message_burst: u32,
    /// A second connection of a device is refused while the first one received a frame within
    /// this time; an older connection silent for longer is closed and replaced. `None`: three
    /// heartbeat intervals of the run.
    pub duplicate_idle: Option<Duration>,
}

impl Default for NetLimits {
    fn default() -> NetLimits {
        NetLimits {
            max_connections: 1024,
            max_connections_per_ip: 64,
            max_handshakes_per_ip: 16,
            validate_addresses: true,
            handshake_timeout: Duration::from_secs(10),
            frame_read_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(30),
            outbound_queue_frames: 32,
            outbound_queue_bytes: 64 << 20,
            inbound_per_connection: 4,
            inbound_total: 1024,
            inbound_bytes_total: 1 << 30,
            messages_per_second: 20.0,
            message_burst: 64,
            duplicate_idle: None,
        }
    }
}

/// How the server runs.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub listen: SocketAddr,
    /// PKI directory (`ca.pem`, `server.pem`, `server.key.pem`).
    pub pki_dir: PathBuf,
    /// Where the checkpoint lives.
    pub state_dir: PathBuf,
    /// Per-round JSONL metrics (appended).
    pub metrics: Option<PathBuf>,
    /// Largest frame body read from a device.
    pub max_frame_bytes: usize,
    /// Print a progress line per round to stderr (default: when stderr is a terminal).
    pub progress: bool,
    /// After the last round, how long to wait for devices to leave.
    pub finish_grace: Duration,
    /// Bounds on what peers may cost the server.
    pub limits: NetLimits,
    /// Serve Prometheus metrics (`GET /metrics`, plain HTTP) on this address; off by default.
    pub prometheus: Option<SocketAddr>,
}

impl ServeOptions {
    /// Defaults for everything but the addresses and directories.
    pub fn new(listen: SocketAddr, pki_dir: PathBuf, state_dir: PathBuf) -> ServeOptions {
        ServeOptions {
            listen,
            pki_dir,
            state_dir,
            metrics: None,
            max_frame_bytes: protocol::DEFAULT_MAX_FRAME_BYTES,
            progress: std::io::stderr().is_terminal(),
            finish_grace: Duration::from_secs(5),
            limits: NetLimits::default(),
            prometheus: None,
        }
    }

    /// The checkpoint file.
    pub fn checkpoint_path(&self) -> PathBuf {
        self.state_dir.join(CHECKPOINT_FILE)
    }
}
