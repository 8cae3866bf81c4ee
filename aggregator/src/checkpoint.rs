//! Atomic, self-checking checkpoints of server state.
//!
//! # File layout
//! ```text
//! magic  b"FSCKPT\r\n"        8 bytes
//! format version  u32 LE      (of this container, [`FORMAT_VERSION`])
//! schema version  u32 LE      (of the state type, chosen by the caller)
//! body length     u64 LE
//! SHA-256 of body             32 bytes
//! body                        bincode (serde, standard config) of the state
//! ```
//! Writing goes to a temporary file in the same directory, which is fsynced, renamed over the
//! target and followed by an fsync of the directory, so a crash leaves either the old or the
//! new checkpoint, never a torn one. Reading refuses (with an error naming the file) anything
//! that is not exactly such a file: wrong magic, other format or schema version, truncated,
//! extended, checksum mismatch, undecodable body. Nothing here ever deletes or replaces a file
//! it could not read.
//!
//! # Temporary files
//! The crash-safe write itself (an exclusive, owner-only temporary file `dir/.NAME.tmp.<pid>.<n>`
//! that is never a followed link, fsync, rename, directory fsync; the temporary file removed on
//! any error, the previous checkpoint left as it was) is the `durable` crate's, shared with the
//! device agent's state file. An I/O error (disk full, file too large) is returned naming the
//! file and the step. A crash can leave a temporary file behind; [`remove_stale_temps`] removes
//! those (the server calls it when it opens its state directory, before it reads the
//! checkpoint).
//!
//! # Failpoints (tests only)
//! [`failpoint`] pauses the process at a named point when the environment variable
//! [`FAILPOINT_ENV`] (`FEDSPINE_FAILPOINT`) names it, so that a test can SIGKILL the aggregator
//! there (`aggregator/tests/crash_points.rs`). The points: `after-temp-write` (the temporary
//! file is written and fsynced, not yet renamed), `after-rename` (the new checkpoint is in place
//! and its directory fsynced, the round not yet reported closed), both in [`write_atomic`], and
//! `mid-aggregation` (the server driver, after an update was folded into the open round's
//! aggregation and acknowledged). Unset, a failpoint is one environment lookup and nothing
//! else.

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::de::DeserializeOwned;
use serde::Serialize;
use sha2::{Digest, Sha256};

/// First bytes of every checkpoint.
pub const MAGIC: [u8; 8] = *b"FSCKPT\r\n";
/// Version of the container layout.
pub const FORMAT_VERSION: u32 = 1;
/// Bytes before the body.
pub const HEADER_BYTES: usize = 8 + 4 + 4 + 8 + 32;
/// Largest body accepted when reading (16 GiB).
pub const MAX_BODY_BYTES: u64 = 16 << 30;

/// The environment variable that arms a [`failpoint`]: `POINT` (its first hit) or `POINT:N`
/// (its N-th hit in this process).
pub const FAILPOINT_ENV: &str = "FEDSPINE_FAILPOINT";

/// Hits of the armed failpoint so far.
static FAILPOINT_HITS: AtomicU64 = AtomicU64::new(0);

/// Test-only fault injection: when [`FAILPOINT_ENV`] arms `point` and this is its chosen hit,
/// says so on stderr (`failpoint POINT reached (hit N); pausing until killed`) and blocks this
/// thread for good, so a test can kill the process exactly here. Inert when the variable is
/// unset or names another point; a malformed hit count is an error on stderr, not a pause.
pub fn failpoint(point: &str) {
    let Some(armed) = std::env::var_os(FAILPOINT_ENV) else {
        return;
    };
    let armed = armed.to_string_lossy();
    let (name, hit) = match armed.split_once(':') {
        Some((name, n)) => match n.parse::<u64>() {
            Ok(n) if n >= 1 => (name, n),
            _ => {
                eprintln!("{FAILPOINT_ENV}={armed}: the hit count must be a positive integer");
                return;
            }
        },
        None => (armed.as_ref(), 1),
    };
    if name != point {
        return;
    }
    let n = FAILPOINT_HITS.fetch_add(1, Ordering::SeqCst) + 1;
    if n == hit {
        eprintln!("failpoint {point} reached (hit {n}); pausing until killed");
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}

/// Why a checkpoint could not be written or read. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint {path}: {op} failed: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("checkpoint {path} is not a FedSpine checkpoint (bad magic)")]
    NotACheckpoint { path: PathBuf },
    #[error("checkpoint {path} has format version {found}; this build reads version {expected}")]
    FormatVersion {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error("checkpoint {path} holds state schema {found}; this build expects schema {expected}")]
    Schema {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error("checkpoint {path} is truncated: {expected} bytes expected, {actual} present")]
    Truncated {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("checkpoint {path} has {extra} unexpected bytes after its body")]
    TrailingBytes { path: PathBuf, extra: u64 },
    #[error("checkpoint {path} declares a {len}-byte body, over the {max}-byte limit")]
    TooLarge { path: PathBuf, len: u64, max: u64 },
    #[error("checkpoint {path} is corrupt: body checksum mismatch")]
    Checksum { path: PathBuf },
    #[error("checkpoint {path}: cannot decode state: {detail}")]
    Decode { path: PathBuf, detail: String },
    #[error("checkpoint {path}: cannot encode state: {detail}")]
    Encode { path: PathBuf, detail: String },
}

fn io_err<'a>(
    path: &'a Path,
    op: &'static str,
) -> impl FnOnce(std::io::Error) -> CheckpointError + 'a {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

impl From<durable::IoError> for CheckpointError {
    fn from(e: durable::IoError) -> Self {
        CheckpointError::Io {
            path: e.path,
            op: e.op,
            source: e.source,
        }
    }
}

/// Removes the temporary files a crashed writer of `path` left behind (`.NAME.tmp.*`, and the
/// `.NAME.tmp-<pid>` of earlier builds) and returns them ([`durable::remove_stale_temps`]:
/// files and links only, a link itself and never its target). Call it only while no other
/// process writes `path`.
pub fn remove_stale_temps(path: &Path) -> Result<Vec<PathBuf>, CheckpointError> {
    Ok(durable::remove_stale_temps(path)?)
}

/// Serialises `state` and atomically replaces `path` with it (exclusive temporary file, fsync,
/// rename, fsync of the directory). Returns the file size in bytes. On an error the temporary
/// file is removed and `path` still holds what it held before (only when the last step, the
/// directory fsync, fails is the new file already in place, but perhaps not yet durable).
pub fn write_atomic<T: Serialize>(
    path: &Path,
    schema: u32,
    state: &T,
) -> Result<u64, CheckpointError> {
    let body = bincode::serde::encode_to_vec(state, bincode::config::standard()).map_err(|e| {
        CheckpointError::Encode {
            path: path.to_path_buf(),
            detail: e.to_string(),
        }
    })?;
    let digest = Sha256::digest(&body);
    let mut header = Vec::with_capacity(HEADER_BYTES);
    header.extend_from_slice(&MAGIC);
    header.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    header.extend_from_slice(&schema.to_le_bytes());
    header.extend_from_slice(&(body.len() as u64).to_le_bytes());
    header.extend_from_slice(&digest);

    let size = durable::replace(path, &[&header, &body], |step| {
        failpoint(match step {
            durable::Step::TempWritten => "after-temp-write",
            durable::Step::Renamed => "after-rename",
        })
    })?;
    tracing::debug!(path = %path.display(), bytes = size, "checkpoint written");
    Ok(size)
}

/// Reads and verifies the checkpoint at `path`, expecting state schema `schema`.
pub fn read<T: DeserializeOwned>(path: &Path, schema: u32) -> Result<T, CheckpointError> {
    let mut file = File::open(path).map_err(io_err(path, "open"))?;
    let actual_len = file.metadata().map_err(io_err(path, "stat"))?.len();
    let mut header = [0u8; HEADER_BYTES];
    if actual_len < HEADER_BYTES as u64 {
        // Distinguish "not ours at all" from "ours but cut short".
        let mut head = Vec::new();
        file.read_to_end(&mut head).map_err(io_err(path, "read"))?;
        let n = head.len().min(MAGIC.len());
        if head[..n] != MAGIC[..n] {
            return Err(CheckpointError::NotACheckpoint {
                path: path.to_path_buf(),
            });
        }
        return Err(CheckpointError::Truncated {
            path: path.to_path_buf(),
            expected: HEADER_BYTES as u64,
            actual: actual_len,
        });
    }
    file.read_exact(&mut header)
        .map_err(io_err(path, "read header"))?;
    if header[..8] != MAGIC {
        return Err(CheckpointError::NotACheckpoint {
            path: path.to_path_buf(),
        });
    }
    let word = |at: usize| {
        u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
    };
    let format = word(8);
    if format != FORMAT_VERSION {
        return Err(CheckpointError::FormatVersion {
            path: path.to_path_buf(),
            found: format,
            expected: FORMAT_VERSION,
        });
    }
    let found_schema = word(12);
    if found_schema != schema {
        return Err(CheckpointError::Schema {
            path: path.to_path_buf(),
            found: found_schema,
            expected: schema,
        });
    }
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(&header[16..24]);
    let body_len = u64::from_le_bytes(len_bytes);
    if body_len > MAX_BODY_BYTES {
        return Err(CheckpointError::TooLarge {
            path: path.to_path_buf(),
            len: body_len,
            max: MAX_BODY_BYTES,
        });
    }
    let expected_len = HEADER_BYTES as u64 + body_len;
    if actual_len < expected_len {
        return Err(CheckpointError::Truncated {
            path: path.to_path_buf(),
            expected: expected_len,
            actual: actual_len,
        });
    }
    if actual_len > expected_len {
        return Err(CheckpointError::TrailingBytes {
            path: path.to_path_buf(),
            extra: actual_len - expected_len,
        });
    }
    let mut body = vec![0u8; body_len as usize];
    file.read_exact(&mut body)
        .map_err(io_err(path, "read body"))?;
    if Sha256::digest(&body)[..] != header[24..56] {
        return Err(CheckpointError::Checksum {
            path: path.to_path_buf(),
        });
    }
    // What the decoder may claim in all (a string's bytes are allocated before they are read):
    // no more than the largest body, so a length a crafted body claims cannot abort the
    // process on an allocation of 2^61 bytes.
    let config = bincode::config::standard().with_limit::<{ MAX_BODY_BYTES as usize }>();
    let (state, used): (T, usize) =
        bincode::serde::decode_from_slice(&body, config).map_err(|e| CheckpointError::Decode {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
    if used != body.len() {
        return Err(CheckpointError::Decode {
            path: path.to_path_buf(),
            detail: format!("{} bytes left after the state", body.len() - used),
        });
    }
    Ok(state)
}

/// Like [`read`], but `Ok(None)` when no file exists at `path`.
pub fn read_if_exists<T: DeserializeOwned>(
    path: &Path,
    schema: u32,
) -> Result<Option<T>, CheckpointError> {
    match fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path, "stat")(e)),
        Ok(_) => read(path, schema).map(Some),
    }
}
