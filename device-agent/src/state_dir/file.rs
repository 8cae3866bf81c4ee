//! The device state file's container: a versioned header with the base model's fingerprint
//! and a SHA-256 checksum, a bincode body, and the crash-safe write (exclusive 0600 temporary
//! file, fsync, rename, fsync of the directory).
//!
//! # Layout
//! ```text
//! magic               b"FSDEVST\n"   8 bytes
//! format version      u32 LE         (of this container, [`FORMAT_VERSION`])
//! schema version      u32 LE         (of the body type, [`super::SCHEMA_VERSION`])
//! body length         u64 LE
//! model fingerprint   32 bytes       (the base model the state belongs to)
//! SHA-256             32 bytes       (of the 56 header bytes before it, then the body)
//! body                               bincode (serde, standard config)
//! ```
//! The checksum covers the header fields too, so a flipped fingerprint or length byte is a
//! checksum error, not a wrong-model claim. Reading refuses anything that is not exactly such
//! a file, naming the file and what is wrong; nothing here deletes or replaces a file it could
//! not read.
//!
//! The write is the `durable` crate's (shared with the aggregator's checkpoints): the
//! temporary file of `dir/NAME` is `dir/.NAME.tmp.<pid>.<n>`, created exclusively (a planted
//! link is never written through) and owner-only, so a crash leaves either the old or the new
//! file in place, never a torn one; the temporary files it may leave are removed by
//! [`remove_stale_temps`] when the agent opens its state directory.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::{Fingerprint, StateError};

/// First bytes of every device state file.
pub const MAGIC: [u8; 8] = *b"FSDEVST\n";
/// Version of the container layout.
pub const FORMAT_VERSION: u32 = 1;
/// Bytes of the header fields the checksum follows.
const FIELDS_BYTES: usize = 8 + 4 + 4 + 8 + 32;
/// Bytes before the body.
pub const HEADER_BYTES: usize = FIELDS_BYTES + 32;
/// Largest body accepted when reading (1 GiB: far above any adapter of a device model, which
/// is tens of megabytes at rank 16 with an unacknowledged update beside it). It also bounds
/// what a length inside the body may make the decoder allocate before it finds the body too
/// short.
pub const MAX_BODY_BYTES: u64 = 1 << 30;
/// Bytes hashed at a time while the checksum is verified.
const CHUNK_BYTES: usize = 1 << 20;

/// An I/O error at `op` on `path`.
pub(super) fn io_err<'a>(
    path: &'a Path,
    op: &'static str,
) -> impl FnOnce(std::io::Error) -> StateError + 'a {
    move |source| StateError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

impl From<durable::IoError> for StateError {
    fn from(e: durable::IoError) -> Self {
        StateError::Io {
            path: e.path,
            op: e.op,
            source: e.source,
        }
    }
}

/// Removes the temporary files a killed writer of `path` left behind (`.NAME.tmp.*` and
/// `.NAME.tmp-*`; files and symbolic links only, a link itself and never its target).
/// Returns what it removed.
pub fn remove_stale_temps(path: &Path) -> Result<Vec<PathBuf>, StateError> {
    Ok(durable::remove_stale_temps(path)?)
}

/// The header fields before the checksum.
fn fields(schema: u32, body_len: u64, model: &Fingerprint) -> [u8; FIELDS_BYTES] {
    let mut h = [0u8; FIELDS_BYTES];
    h[..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&schema.to_le_bytes());
    h[16..24].copy_from_slice(&body_len.to_le_bytes());
    h[24..56].copy_from_slice(&model.0);
    h
}

fn checksum(fields: &[u8], body: &[u8]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(fields);
    hasher.update(body);
    hasher.finalize().into()
}

/// Serialises `value` and atomically replaces `path` with it. Returns the file size. On an
/// error the temporary file is removed and `path` holds what it held before.
pub fn write_atomic<T: Serialize>(
    path: &Path,
    schema: u32,
    model: &Fingerprint,
    value: &T,
) -> Result<u64, StateError> {
    let body = bincode::serde::encode_to_vec(value, bincode::config::standard()).map_err(|e| {
        StateError::Encode {
            path: path.to_path_buf(),
            detail: e.to_string(),
        }
    })?;
    let head = fields(schema, body.len() as u64, model);
    let sum = checksum(&head, &body);
    Ok(durable::replace(path, &[&head, &sum, &body], |_| {})?)
}

/// Reads and verifies the file at `path` (magic, versions, length, checksum, body), returning
/// the model fingerprint it was written for and its body. The fingerprint is the caller's to
/// compare.
pub fn read<T: DeserializeOwned>(path: &Path, schema: u32) -> Result<(Fingerprint, T), StateError> {
    let p = || path.to_path_buf();
    // Not opened unless a regular file (through links): a FIFO would block the open, a device
    // such as /dev/zero reports no length and never ends.
    let kind = |m: &std::fs::Metadata| crate::local_file::irregular_kind(&m.file_type());
    let before = std::fs::metadata(path).map_err(io_err(path, "stat"))?;
    if let Some(kind) = kind(&before) {
        return Err(StateError::NotAFile { path: p(), kind });
    }
    let mut file = File::open(path).map_err(io_err(path, "open"))?;
    let meta = file.metadata().map_err(io_err(path, "stat"))?;
    if let Some(kind) = kind(&meta) {
        return Err(StateError::NotAFile { path: p(), kind });
    }
    let actual = meta.len();
    if actual < HEADER_BYTES as u64 {
        let mut head = Vec::new();
        file.read_to_end(&mut head).map_err(io_err(path, "read"))?;
        let n = head.len().min(MAGIC.len());
        if head[..n] != MAGIC[..n] {
            return Err(StateError::NotAStateFile { path: p() });
        }
        return Err(StateError::Truncated {
            path: p(),
            expected: HEADER_BYTES as u64,
            actual,
        });
    }
    let mut header = [0u8; HEADER_BYTES];
    file.read_exact(&mut header)
        .map_err(io_err(path, "read header"))?;
    if header[..8] != MAGIC {
        return Err(StateError::NotAStateFile { path: p() });
    }
    let word = |at: usize| {
        u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
    };
    if word(8) != FORMAT_VERSION {
        return Err(StateError::FormatVersion {
            path: p(),
            found: word(8),
            expected: FORMAT_VERSION,
        });
    }
    if word(12) != schema {
        return Err(StateError::Schema {
            path: p(),
            found: word(12),
            expected: schema,
        });
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&header[16..24]);
    let body_len = u64::from_le_bytes(len);
    if body_len > MAX_BODY_BYTES {
        return Err(StateError::TooLarge {
            path: p(),
            len: body_len,
            max: MAX_BODY_BYTES,
        });
    }
    let expected = HEADER_BYTES as u64 + body_len;
    if actual < expected {
        return Err(StateError::Truncated {
            path: p(),
            expected,
            actual,
        });
    }
    if actual > expected {
        return Err(StateError::TrailingBytes {
            path: p(),
            extra: actual - expected,
        });
    }
    // One pass, a chunk at a time: the body grows only by what the file holds (nothing is
    // allocated for a length the header merely claims) and is hashed as it is read.
    let mut h = Sha256::new();
    h.update(&header[..FIELDS_BYTES]);
    let mut body = Vec::new();
    let mut left = body_len as usize;
    while left > 0 {
        let at = body.len();
        let n = left.min(CHUNK_BYTES);
        body.resize(at + n, 0);
        file.read_exact(&mut body[at..])
            .map_err(io_err(path, "read body"))?;
        h.update(&body[at..]);
        left -= n;
    }
    if h.finalize()[..] != header[FIELDS_BYTES..] {
        return Err(StateError::Checksum { path: p() });
    }
    let mut fingerprint = [0u8; 32];
    fingerprint.copy_from_slice(&header[24..56]);
    // No length inside the body may claim more than the largest body (a string's bytes are
    // allocated before they are read, so this bounds that allocation).
    let config = bincode::config::standard().with_limit::<{ MAX_BODY_BYTES as usize }>();
    let (value, used): (T, usize) =
        bincode::serde::decode_from_slice(&body, config).map_err(|e| StateError::Decode {
            path: p(),
            detail: e.to_string(),
        })?;
    if used != body.len() {
        return Err(StateError::Decode {
            path: p(),
            detail: format!("{} bytes left after the state", body.len() - used),
        });
    }
    Ok((Fingerprint(fingerprint), value))
}
