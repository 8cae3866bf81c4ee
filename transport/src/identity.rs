//! Device identities in certificates: the PKI directory's file names, loading PEM certificates
//! and keys, the device DNS name <-> [`DeviceId`] mapping, and reading the device id out of a
//! verified client certificate.
//!
//! A device certificate names its device in one DNS subject alternative name
//! `device-<id>.fedspine`. Files in a PKI directory (issued by the aggregator's `pki` module):
//!
//! | file | content |
//! |---|---|
//! | `ca.pem`, `ca.key.pem` | the self-signed CA certificate and its key |
//! | `server.pem`, `server.key.pem` | the aggregator's certificate and key |
//! | `device-<id>.pem`, `device-<id>.key.pem` | one device's certificate and key |
//! | `revoked.txt` | refused devices and certificates ([`crate::revocation`]) |
//!
//! Private keys are read only from files that neither group nor others may access (mode
//! `& 0o077 == 0` on Unix): [`read_private_key`] refuses anything else, naming the file and the
//! fix (`chmod 600`).

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use protocol::DeviceId;
use quinn::Connection;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// CA certificate file name.
pub const CA_CERT_FILE: &str = "ca.pem";
/// CA key file name.
pub const CA_KEY_FILE: &str = "ca.key.pem";
/// Server certificate file name.
pub const SERVER_CERT_FILE: &str = "server.pem";
/// Server key file name.
pub const SERVER_KEY_FILE: &str = "server.key.pem";
/// DNS suffix of device names.
pub const DEVICE_DOMAIN: &str = "fedspine";

/// Why a certificate or key could not be loaded, or a certificate names no single device.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{path}: {op} failed: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {detail}")]
    Pem { path: PathBuf, detail: String },
    #[error("certificate is not parseable X.509: {0}")]
    Parse(String),
    #[error("certificate names no device (expected one DNS name device-<id>.{DEVICE_DOMAIN})")]
    NoDeviceName,
    #[error("certificate names several devices: {0:?}")]
    AmbiguousDeviceName(Vec<u64>),
    #[error("peer presented no certificate")]
    NoPeerCertificate,
    #[error("{path}: private key is accessible by group or others (mode {mode:o}); restrict it with `chmod 600 {path}`")]
    KeyPermissions { path: PathBuf, mode: u32 },
}

/// Paths of a certificate and its private key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A certificate chain and its private key, ready for a rustls config.
#[derive(Debug)]
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

/// The DNS name that identifies a device: `device-<id>.fedspine`.
pub fn device_dns_name(id: DeviceId) -> String {
    format!("device-{}.{DEVICE_DOMAIN}", id.0)
}

/// The device id in a name of the form `device-<id>.fedspine` (decimal digits only).
pub fn parse_device_dns_name(name: &str) -> Option<DeviceId> {
    let digits = name
        .strip_prefix("device-")?
        .strip_suffix(DEVICE_DOMAIN)?
        .strip_suffix('.')?;
    if digits.is_empty() || digits.len() > 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().map(DeviceId)
}

/// Where the CA certificate and key live in `dir`.
pub fn ca_paths(dir: &Path) -> CertPaths {
    CertPaths {
        cert: dir.join(CA_CERT_FILE),
        key: dir.join(CA_KEY_FILE),
    }
}

/// Where the server certificate and key live in `dir`.
pub fn server_paths(dir: &Path) -> CertPaths {
    CertPaths {
        cert: dir.join(SERVER_CERT_FILE),
        key: dir.join(SERVER_KEY_FILE),
    }
}

/// Where device `id`'s certificate and key live in `dir`.
pub fn device_paths(dir: &Path, id: DeviceId) -> CertPaths {
    CertPaths {
        cert: dir.join(format!("device-{}.pem", id.0)),
        key: dir.join(format!("device-{}.key.pem", id.0)),
    }
}

fn read_text(path: &Path) -> Result<String, IdentityError> {
    fs::read_to_string(path).map_err(|source| IdentityError::Io {
        path: path.to_path_buf(),
        op: "read",
        source,
    })
}

/// All certificates in a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let pem_err = |detail: String| IdentityError::Pem {
        path: path.to_path_buf(),
        detail,
    };
    let text = read_text(path)?;
    let certs = CertificateDer::pem_slice_iter(text.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(pem_err("no certificate in file".into()));
    }
    Ok(certs)
}

/// The text of a private key file, refused (before any byte is read) when group or others may
/// read or write it: the mode is checked on the opened file, so the file checked is the file
/// read.
pub fn read_private_key(path: &Path) -> Result<String, IdentityError> {
    let io_err = |op: &'static str| {
        move |source| IdentityError::Io {
            path: path.to_path_buf(),
            op,
            source,
        }
    };
    let mut file = fs::File::open(path).map_err(io_err("read"))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = file
            .metadata()
            .map_err(io_err("stat"))?
            .permissions()
            .mode()
            & 0o777;
        if mode & 0o077 != 0 {
            return Err(IdentityError::KeyPermissions {
                path: path.to_path_buf(),
                mode,
            });
        }
    }
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(io_err("read"))?;
    Ok(text)
}

/// The private key in a PEM file ([`read_private_key`]: owner-only files only).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, IdentityError> {
    let text = read_private_key(path)?;
    PrivateKeyDer::from_pem_slice(text.as_bytes()).map_err(|e| IdentityError::Pem {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })
}

/// Loads a certificate chain and key.
pub fn load_identity(paths: &CertPaths) -> Result<Identity, IdentityError> {
    Ok(Identity {
        chain: load_certs(&paths.cert)?,
        key: load_key(&paths.key)?,
    })
}

/// The CA certificate(s) of `dir`.
pub fn load_ca(dir: &Path) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    load_certs(&ca_paths(dir).cert)
}

/// The device a certificate identifies: its single `device-<id>.fedspine` DNS name. Call this
/// only on a certificate the TLS layer has verified against the CA.
pub fn device_id_from_cert(cert: &CertificateDer<'_>) -> Result<DeviceId, IdentityError> {
    let parsed =
        webpki::EndEntityCert::try_from(cert).map_err(|e| IdentityError::Parse(e.to_string()))?;
    let mut ids: Vec<u64> = parsed
        .valid_dns_names()
        .filter_map(parse_device_dns_name)
        .map(|id| id.0)
        .collect();
    ids.sort_unstable();
    ids.dedup();
    match ids.as_slice() {
        [] => Err(IdentityError::NoDeviceName),
        [one] => Ok(DeviceId(*one)),
        _ => Err(IdentityError::AmbiguousDeviceName(ids)),
    }
}

/// The leaf of a connection's verified peer certificate chain.
pub fn peer_certificate(connection: &Connection) -> Result<CertificateDer<'static>, IdentityError> {
    let identity = connection
        .peer_identity()
        .ok_or(IdentityError::NoPeerCertificate)?;
    let certs = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| IdentityError::NoPeerCertificate)?;
    certs
        .first()
        .cloned()
        .ok_or(IdentityError::NoPeerCertificate)
}

/// The device a connection's verified client certificate names.
pub fn peer_device_id(connection: &Connection) -> Result<DeviceId, IdentityError> {
    device_id_from_cert(&peer_certificate(connection)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate with these DNS names (no CA needed: the mapping does not
    /// verify).
    fn cert_naming(names: &[&str]) -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn device_names_parse_strictly() {
        assert_eq!(device_dns_name(DeviceId(42)), "device-42.fedspine");
        assert_eq!(
            parse_device_dns_name("device-42.fedspine"),
            Some(DeviceId(42))
        );
        for bad in [
            "device-.fedspine",
            "device-+4.fedspine",
            "device-4x.fedspine",
            "device-4.fedspine.evil",
            "device-4fedspine",
            "xdevice-4.fedspine",
            "device-99999999999999999999.fedspine",
        ] {
            assert_eq!(parse_device_dns_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_certificate_maps_to_its_single_device_name() {
        let one = cert_naming(&["device-7.fedspine"]);
        assert_eq!(device_id_from_cert(&one).unwrap(), DeviceId(7));
        // Other names beside the device name do not matter; a repeated name is one device.
        let extra = cert_naming(&["localhost", "device-7.fedspine", "device-7.fedspine"]);
        assert_eq!(device_id_from_cert(&extra).unwrap(), DeviceId(7));
        let none = cert_naming(&["localhost", "127.0.0.1"]);
        assert!(matches!(
            device_id_from_cert(&none),
            Err(IdentityError::NoDeviceName)
        ));
        let two = cert_naming(&["device-9.fedspine", "device-7.fedspine"]);
        match device_id_from_cert(&two) {
            Err(IdentityError::AmbiguousDeviceName(ids)) => assert_eq!(ids, vec![7, 9]),
            other => panic!("expected an ambiguous name, got {other:?}"),
        }
        let garbage = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01]);
        assert!(matches!(
            device_id_from_cert(&garbage),
            Err(IdentityError::Parse(_))
        ));
    }

    #[test]
    fn pki_files_load_or_name_the_problem() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let paths = device_paths(dir, DeviceId(3));
        assert_eq!(paths.cert, dir.join("device-3.pem"));
        assert_eq!(paths.key, dir.join("device-3.key.pem"));
        let err = load_identity(&paths).unwrap_err();
        assert!(matches!(err, IdentityError::Io { op: "read", .. }), "{err}");
        fs::write(&paths.cert, "not a certificate\n").unwrap();
        let err = load_certs(&paths.cert).unwrap_err();
        assert!(err.to_string().contains("no certificate in file"), "{err}");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![device_dns_name(DeviceId(3))])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        fs::write(&paths.cert, cert.pem()).unwrap();
        fs::write(&paths.key, key.serialize_pem()).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&paths.key, fs::Permissions::from_mode(0o644)).unwrap();
            let err = load_identity(&paths).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!(
                    "{0}: private key is accessible by group or others (mode 644); restrict it \
                     with `chmod 600 {0}`",
                    paths.key.display()
                )
            );
            fs::set_permissions(&paths.key, fs::Permissions::from_mode(0o600)).unwrap();
        }
        let identity = load_identity(&paths).unwrap();
        assert_eq!(
            device_id_from_cert(&identity.chain[0]).unwrap(),
            DeviceId(3)
        );
    }
}
