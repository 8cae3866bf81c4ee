//! A private certificate authority for mutual TLS: create the CA, issue device and server
//! certificates as PEM files, load them back, and read a device id out of a certificate.
//!
//! A device certificate names its device in a DNS subject alternative name
//! `device-<id>.fedspine` (and in its common name `device-<id>`), carries the client-auth
//! extended key usage and is signed by the CA; the server certificate carries server-auth and
//! the names clients dial. Files in the PKI directory:
//!
//! | file | content |
//! |---|---|
//! | `ca.pem`, `ca.key.pem` | the self-signed CA certificate and its key |
//! | `server.pem`, `server.key.pem` | the aggregator's certificate and key |
//! | `device-<id>.pem`, `device-<id>.key.pem` | one device's certificate and key |
//!
//! Private keys are written with mode 0600 on Unix.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use protocol::DeviceId;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
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
/// Days a CA certificate is valid.
pub const CA_VALIDITY_DAYS: i64 = 3650;
/// Days a device or server certificate is valid.
pub const LEAF_VALIDITY_DAYS: i64 = 825;

/// Why a PKI operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {op} failed: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} already exists; refusing to replace a CA (it would orphan every issued certificate)")]
    CaExists { path: PathBuf },
    #[error("{path}: {detail}")]
    Pem { path: PathBuf, detail: String },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("certificate is not parseable X.509: {0}")]
    Parse(String),
    #[error("certificate names no device (expected one DNS name device-<id>.{DEVICE_DOMAIN})")]
    NoDeviceName,
    #[error("certificate names several devices: {0:?}")]
    AmbiguousDeviceName(Vec<u64>),
    #[error("server certificate needs at least one name")]
    NoServerNames,
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> PkiError + 'a {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

/// Paths of an issued certificate and its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuedCert {
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

/// Where device `id`'s certificate and key live in `dir`.
pub fn device_paths(dir: &Path, id: DeviceId) -> IssuedCert {
    IssuedCert {
        cert: dir.join(format!("device-{}.pem", id.0)),
        key: dir.join(format!("device-{}.key.pem", id.0)),
    }
}

/// Where the server certificate and key live in `dir`.
pub fn server_paths(dir: &Path) -> IssuedCert {
    IssuedCert {
        cert: dir.join(SERVER_CERT_FILE),
        key: dir.join(SERVER_KEY_FILE),
    }
}

fn write_file(path: &Path, contents: &str, private: bool) -> Result<(), PkiError> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut f = options.open(path).map_err(io_err(path, "create"))?;
    f.write_all(contents.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(io_err(path, "write"))
}

fn read_text(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(io_err(path, "read"))
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(days);
}

/// Creates a self-signed CA in `dir` (created if missing). Refuses if a CA is already there.
pub fn init_ca(dir: &Path) -> Result<IssuedCert, PkiError> {
    fs::create_dir_all(dir).map_err(io_err(dir, "create directory"))?;
    let paths = IssuedCert {
        cert: dir.join(CA_CERT_FILE),
        key: dir.join(CA_KEY_FILE),
    };
    for p in [&paths.cert, &paths.key] {
        if p.exists() {
            return Err(PkiError::CaExists { path: p.clone() });
        }
    }
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "FedSpine");
    dn.push(DnType::CommonName, "FedSpine private CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut params, CA_VALIDITY_DAYS);
    let cert = params.self_signed(&key)?;
    write_file(&paths.key, &key.serialize_pem(), true)?;
    write_file(&paths.cert, &cert.pem(), false)?;
    tracing::info!(dir = %dir.display(), "created certificate authority");
    Ok(paths)
}

fn load_issuer(dir: &Path) -> Result<Issuer<'static, KeyPair>, PkiError> {
    let key_path = dir.join(CA_KEY_FILE);
    let cert_path = dir.join(CA_CERT_FILE);
    let key = KeyPair::from_pem(&read_text(&key_path)?).map_err(|e| PkiError::Pem {
        path: key_path.clone(),
        detail: e.to_string(),
    })?;
    Issuer::from_ca_cert_pem(&read_text(&cert_path)?, key).map_err(|e| PkiError::Pem {
        path: cert_path,
        detail: e.to_string(),
    })
}

fn issue_leaf(
    dir: &Path,
    common_name: &str,
    names: Vec<String>,
    usage: ExtendedKeyUsagePurpose,
    paths: &IssuedCert,
) -> Result<(), PkiError> {
    let issuer = load_issuer(dir)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(names)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "FedSpine");
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, LEAF_VALIDITY_DAYS);
    let cert = params.signed_by(&key, &issuer)?;
    write_file(&paths.key, &key.serialize_pem(), true)?;
    write_file(&paths.cert, &cert.pem(), false)?;
    Ok(())
}

/// Issues (or re-issues, with a fresh key) the certificate of device `id`, signed by the CA in
/// `dir`.
pub fn issue_device(dir: &Path, id: DeviceId) -> Result<IssuedCert, PkiError> {
    let paths = device_paths(dir, id);
    issue_leaf(
        dir,
        &format!("device-{}", id.0),
        vec![device_dns_name(id)],
        ExtendedKeyUsagePurpose::ClientAuth,
        &paths,
    )?;
    tracing::info!(device = %id, cert = %paths.cert.display(), "issued device certificate");
    Ok(paths)
}

/// Issues the aggregator's certificate for `names` (DNS names or IP addresses clients dial).
pub fn issue_server(dir: &Path, names: &[String]) -> Result<IssuedCert, PkiError> {
    if names.is_empty() {
        return Err(PkiError::NoServerNames);
    }
    let paths = server_paths(dir);
    issue_leaf(
        dir,
        "FedSpine aggregator",
        names.to_vec(),
        ExtendedKeyUsagePurpose::ServerAuth,
        &paths,
    )?;
    tracing::info!(names = ?names, "issued server certificate");
    Ok(paths)
}

/// All certificates in a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let pem_err = |detail: String| PkiError::Pem {
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

/// The private key in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, PkiError> {
    let text = read_text(path)?;
    PrivateKeyDer::from_pem_slice(text.as_bytes()).map_err(|e| PkiError::Pem {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })
}

/// Loads a certificate chain and key.
pub fn load_identity(paths: &IssuedCert) -> Result<Identity, PkiError> {
    Ok(Identity {
        chain: load_certs(&paths.cert)?,
        key: load_key(&paths.key)?,
    })
}

/// The CA certificate(s) of `dir`.
pub fn load_ca(dir: &Path) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    load_certs(&dir.join(CA_CERT_FILE))
}

/// The device a certificate identifies: its single `device-<id>.fedspine` DNS name. Call this
/// only on a certificate the TLS layer has verified against the CA.
pub fn device_id_from_cert(cert: &CertificateDer<'_>) -> Result<DeviceId, PkiError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| PkiError::Parse(e.to_string()))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| PkiError::Parse(e.to_string()))?;
    let mut ids: Vec<u64> = Vec::new();
    if let Some(san) = san {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                if let Some(id) = parse_device_dns_name(dns) {
                    ids.push(id.0);
                }
            }
        }
    }
    ids.sort_unstable();
    ids.dedup();
    match ids.as_slice() {
        [] => Err(PkiError::NoDeviceName),
        [one] => Ok(DeviceId(*one)),
        _ => Err(PkiError::AmbiguousDeviceName(ids)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn issued_device_certificate_names_its_device() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path()).unwrap();
        let issued = issue_device(dir.path(), DeviceId(7)).unwrap();
        let certs = load_certs(&issued.cert).unwrap();
        assert_eq!(device_id_from_cert(&certs[0]).unwrap(), DeviceId(7));
        load_key(&issued.key).unwrap();
        // The server certificate names no device.
        let server = issue_server(dir.path(), &["localhost".into()]).unwrap();
        let certs = load_certs(&server.cert).unwrap();
        assert!(matches!(
            device_id_from_cert(&certs[0]),
            Err(PkiError::NoDeviceName)
        ));
        // A second init does not replace the CA.
        let err = init_ca(dir.path()).unwrap_err();
        assert!(
            err.to_string().contains("refusing to replace a CA"),
            "{err}"
        );
    }

    #[cfg(unix)]
    #[test]
    fn private_keys_are_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let ca = init_ca(dir.path()).unwrap();
        let dev = issue_device(dir.path(), DeviceId(1)).unwrap();
        for key in [ca.key, dev.key] {
            let mode = fs::metadata(&key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
    }
}
