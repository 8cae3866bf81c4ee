//! A private certificate authority for mutual TLS: create the CA and issue device and server
//! certificates as PEM files in a PKI directory.
//!
//! A device certificate names its device in a DNS subject alternative name
//! `device-<id>.fedspine` ([`transport::device_dns_name`]) and in its common name
//! `device-<id>`, carries the client-auth extended key usage and is signed by the CA; the
//! server certificate carries server-auth and the names clients dial. The file names of the PKI
//! directory, loading the files back, and reading the device id out of a certificate are the
//! `transport` crate's ([`transport::identity`]).
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
use transport::identity::{self, CertPaths};

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
pub fn init_ca(dir: &Path) -> Result<CertPaths, PkiError> {
    fs::create_dir_all(dir).map_err(io_err(dir, "create directory"))?;
    let paths = identity::ca_paths(dir);
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
    let paths = identity::ca_paths(dir);
    let key = KeyPair::from_pem(&read_text(&paths.key)?).map_err(|e| PkiError::Pem {
        path: paths.key.clone(),
        detail: e.to_string(),
    })?;
    Issuer::from_ca_cert_pem(&read_text(&paths.cert)?, key).map_err(|e| PkiError::Pem {
        path: paths.cert,
        detail: e.to_string(),
    })
}

fn issue_leaf(
    dir: &Path,
    common_name: &str,
    names: Vec<String>,
    usage: ExtendedKeyUsagePurpose,
    paths: &CertPaths,
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
pub fn issue_device(dir: &Path, id: DeviceId) -> Result<CertPaths, PkiError> {
    let paths = identity::device_paths(dir, id);
    issue_leaf(
        dir,
        &format!("device-{}", id.0),
        vec![identity::device_dns_name(id)],
        ExtendedKeyUsagePurpose::ClientAuth,
        &paths,
    )?;
    tracing::info!(device = %id, cert = %paths.cert.display(), "issued device certificate");
    Ok(paths)
}

/// Issues the aggregator's certificate for `names` (DNS names or IP addresses clients dial).
pub fn issue_server(dir: &Path, names: &[String]) -> Result<CertPaths, PkiError> {
    if names.is_empty() {
        return Err(PkiError::NoServerNames);
    }
    let paths = identity::server_paths(dir);
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

#[cfg(test)]
mod tests {
    use super::*;
    use transport::identity::{device_id_from_cert, load_certs, load_key, IdentityError};

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
            Err(IdentityError::NoDeviceName)
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
