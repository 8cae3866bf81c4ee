//! The revocation (deny) list: devices and certificates the aggregator refuses after the mutual
//! TLS handshake, read from `revoked.txt` in the PKI directory and re-read when it changes,
//! without a restart.
//!
//! One entry per line; `#` starts a comment; blank lines are ignored:
//!
//! | line | refuses |
//! |---|---|
//! | `5`, `device-5` or `device-5.fedspine` | every certificate naming device 5 |
//! | `sha256:<64 hex digits>` (colons allowed) | the one certificate with that SHA-256 fingerprint of its DER |
//!
//! A device line refuses the device whatever certificate it presents; a fingerprint line only
//! that certificate, so a device whose old certificate leaked can be re-issued a new one: keep
//! the fingerprint line, remove the device line. A missing file is an empty list.
//!
//! [`Revocations`] holds the list of one file. [`Revocations::check`] looks at the file's
//! stamp (modification time, length, inode) on every call, a single `stat`, and re-reads it
//! when the stamp changed. A file that no longer parses keeps the last good list in force
//! (logged as an error at every change); at start-up ([`Revocations::open`]) it is an error.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use protocol::DeviceId;
use rustls::pki_types::CertificateDer;
use sha2::{Digest, Sha256};

use crate::identity::parse_device_dns_name;

/// File name of the revocation list inside a PKI directory.
pub const REVOKED_FILE: &str = "revoked.txt";

/// SHA-256 of a certificate's DER encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of `cert`.
    pub fn of(cert: &CertificateDer<'_>) -> Fingerprint {
        Fingerprint(Sha256::digest(cert.as_ref()).into())
    }

    /// Parses `sha256:<64 hex digits>`, colons between digits allowed, any case.
    pub fn parse(text: &str) -> Option<Fingerprint> {
        let hex: Vec<u8> = text
            .strip_prefix("sha256:")?
            .bytes()
            .filter(|&b| b != b':')
            .collect();
        if hex.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
            let digits = std::str::from_utf8(pair).ok()?;
            *byte = u8::from_str_radix(digits, 16).ok()?;
        }
        Some(Fingerprint(out))
    }
}

impl fmt::Display for Fingerprint {
    /// `sha256:` and 64 lower-case hex digits, the form [`Fingerprint::parse`] reads.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("sha256:")?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Why a revocation list could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RevocationError {
    #[error("{path}: {op} failed: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: '{text}' is neither a device (5, device-5) nor a certificate fingerprint (sha256:<64 hex digits>)")]
    BadLine {
        path: PathBuf,
        line: usize,
        text: String,
    },
}

/// Why a connection was refused: the entry that matched.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Revoked {
    #[error("{0} is revoked")]
    Device(DeviceId),
    #[error("certificate {fingerprint} of {device} is revoked")]
    Certificate {
        device: DeviceId,
        fingerprint: Fingerprint,
    },
}

/// The entries of one revocation list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RevocationList {
    pub devices: BTreeSet<DeviceId>,
    pub certificates: BTreeSet<Fingerprint>,
}

/// A device entry: `5`, `device-5` or `device-5.fedspine`.
fn parse_device(entry: &str) -> Option<DeviceId> {
    if let Some(id) = parse_device_dns_name(entry) {
        return Some(id);
    }
    let digits = entry.strip_prefix("device-").unwrap_or(entry);
    if digits.is_empty() || digits.len() > 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().map(DeviceId)
}

impl RevocationList {
    /// Parses the text of `path` (named in errors, with the line number).
    pub fn parse(path: &Path, text: &str) -> Result<RevocationList, RevocationError> {
        let mut list = RevocationList::default();
        for (i, raw) in text.lines().enumerate() {
            let entry = raw.split('#').next().unwrap_or("").trim();
            if entry.is_empty() {
                continue;
            }
            if let Some(fp) = Fingerprint::parse(&entry.to_ascii_lowercase()) {
                list.certificates.insert(fp);
            } else if let Some(id) = parse_device(entry) {
                list.devices.insert(id);
            } else {
                return Err(RevocationError::BadLine {
                    path: path.to_path_buf(),
                    line: i + 1,
                    text: entry.to_string(),
                });
            }
        }
        Ok(list)
    }

    /// Reads `path`; a missing file is an empty list.
    pub fn load(path: &Path) -> Result<RevocationList, RevocationError> {
        match std::fs::read_to_string(path) {
            Ok(text) => RevocationList::parse(path, &text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(RevocationList::default()),
            Err(source) => Err(RevocationError::Io {
                path: path.to_path_buf(),
                op: "read",
                source,
            }),
        }
    }

    /// Whether `device` presenting the certificate `fingerprint` is refused.
    pub fn check(&self, device: DeviceId, fingerprint: Fingerprint) -> Result<(), Revoked> {
        if self.devices.contains(&device) {
            return Err(Revoked::Device(device));
        }
        if self.certificates.contains(&fingerprint) {
            return Err(Revoked::Certificate {
                device,
                fingerprint,
            });
        }
        Ok(())
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.devices.len() + self.certificates.len()
    }

    /// Whether the list refuses nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What identifies one version of the file: `None` when it does not exist.
type Stamp = Option<(Option<SystemTime>, u64, u64)>;

fn stamp(path: &Path) -> Result<Stamp, std::io::Error> {
    match std::fs::metadata(path) {
        Ok(m) => {
            #[cfg(unix)]
            let inode = std::os::unix::fs::MetadataExt::ino(&m);
            #[cfg(not(unix))]
            let inode = 0;
            Ok(Some((m.modified().ok(), m.len(), inode)))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

struct Loaded {
    list: RevocationList,
    stamp: Stamp,
}

/// The revocation list of one file, re-read when the file changes.
pub struct Revocations {
    path: PathBuf,
    loaded: Mutex<Loaded>,
}

impl fmt::Debug for Revocations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Revocations")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Revocations {
    /// The list at `path` (a missing file is an empty list); a malformed file is an error.
    pub fn open(path: &Path) -> Result<Revocations, RevocationError> {
        let io_err = |source| RevocationError::Io {
            path: path.to_path_buf(),
            op: "stat",
            source,
        };
        let stamp = stamp(path).map_err(io_err)?;
        let list = RevocationList::load(path)?;
        if !list.is_empty() {
            tracing::info!(path = %path.display(), entries = list.len(), "revocation list loaded");
        }
        Ok(Revocations {
            path: path.to_path_buf(),
            loaded: Mutex::new(Loaded { list, stamp }),
        })
    }

    /// The list of `pki_dir`'s [`REVOKED_FILE`].
    pub fn open_in(pki_dir: &Path) -> Result<Revocations, RevocationError> {
        Revocations::open(&pki_dir.join(REVOKED_FILE))
    }

    /// The file this list is read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Re-reads the file if its stamp changed; returns whether the list in force changed. A
    /// file that cannot be read or parsed keeps the last good list (logged).
    pub fn refresh(&self) -> bool {
        let Ok(mut loaded) = self.loaded.lock() else {
            return false;
        };
        let now = match stamp(&self.path) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(path = %self.path.display(), error = %e, "cannot stat the revocation list; keeping the last one read");
                return false;
            }
        };
        if now == loaded.stamp {
            return false;
        }
        loaded.stamp = now;
        match RevocationList::load(&self.path) {
            Ok(list) => {
                let changed = list != loaded.list;
                if changed {
                    tracing::info!(path = %self.path.display(), entries = list.len(), "revocation list reloaded");
                }
                loaded.list = list;
                changed
            }
            Err(e) => {
                tracing::error!(error = %e, "revocation list not reloaded; keeping the last good one");
                false
            }
        }
    }

    /// Whether `device` presenting `fingerprint` is refused, by the file as it is now.
    pub fn check(&self, device: DeviceId, fingerprint: Fingerprint) -> Result<(), Revoked> {
        self.refresh();
        match self.loaded.lock() {
            Ok(loaded) => loaded.list.check(device, fingerprint),
            // A panic while holding the lock cannot leave a half-updated list (it is replaced
            // whole); read it anyway rather than fail open or closed.
            Err(poisoned) => poisoned.into_inner().list.check(device, fingerprint),
        }
    }

    /// A copy of the list in force.
    pub fn list(&self) -> RevocationList {
        match self.loaded.lock() {
            Ok(l) => l.list.clone(),
            Err(poisoned) => poisoned.into_inner().list.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_parse_into_devices_and_fingerprints() {
        let fp = format!("sha256:{}", "ab".repeat(32));
        let colons = format!("SHA256:{}", vec!["CD"; 32].join(":"));
        let text = format!("# revoked\n5\ndevice-6  # lost\n\ndevice-7.fedspine\n{fp}\n{colons}\n");
        let list = RevocationList::parse(Path::new("r.txt"), &text).unwrap();
        assert_eq!(
            list.devices,
            [DeviceId(5), DeviceId(6), DeviceId(7)]
                .into_iter()
                .collect()
        );
        assert_eq!(
            list.certificates,
            [Fingerprint([0xab; 32]), Fingerprint([0xcd; 32])]
                .into_iter()
                .collect()
        );
        assert_eq!(Fingerprint([0xab; 32]).to_string(), fp);
        assert_eq!(
            list.check(DeviceId(5), Fingerprint([0; 32])),
            Err(Revoked::Device(DeviceId(5)))
        );
        assert_eq!(
            list.check(DeviceId(8), Fingerprint([0xcd; 32])),
            Err(Revoked::Certificate {
                device: DeviceId(8),
                fingerprint: Fingerprint([0xcd; 32])
            })
        );
        assert_eq!(list.check(DeviceId(8), Fingerprint([0; 32])), Ok(()));
        for bad in ["device-x", "sha256:abc", "-5", "device-5.evil"] {
            let err =
                RevocationList::parse(Path::new("r.txt"), &format!("1\n{bad}\n")).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("r.txt:2: '{bad}' is neither a device (5, device-5) nor a certificate fingerprint (sha256:<64 hex digits>)")
            );
        }
    }

    #[test]
    fn the_list_follows_the_file_and_keeps_the_last_good_version() {
        let dir = tempfile::tempdir().unwrap();
        let revs = Revocations::open_in(dir.path()).unwrap();
        let fp = Fingerprint([1; 32]);
        assert_eq!(revs.check(DeviceId(5), fp), Ok(()));
        std::fs::write(revs.path(), "5\n").unwrap();
        assert_eq!(
            revs.check(DeviceId(5), fp),
            Err(Revoked::Device(DeviceId(5)))
        );
        // A broken edit keeps the list in force; fixing it applies the fix.
        std::fs::write(revs.path(), "5\nnonsense\n").unwrap();
        assert_eq!(
            revs.check(DeviceId(5), fp),
            Err(Revoked::Device(DeviceId(5)))
        );
        std::fs::write(revs.path(), "# none\n").unwrap();
        assert_eq!(revs.check(DeviceId(5), fp), Ok(()));
        std::fs::remove_file(revs.path()).unwrap();
        assert!(!revs.refresh());
        assert!(revs.list().is_empty());
        // A malformed file at start-up is an error naming it.
        std::fs::write(revs.path(), "five\n").unwrap();
        let err = Revocations::open(revs.path()).unwrap_err();
        assert!(err.to_string().contains("revoked.txt:1: 'five'"), "{err}");
    }
}
