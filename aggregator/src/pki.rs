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
//! Private keys are written with mode 0600 on Unix (also when an existing file is replaced),
//! and read back only from owner-only files ([`transport::read_private_key`]).
//!
//! The CA key never needs to leave the CA directory: [`export_device`] and [`export_server`]
//! copy a bundle (`ca.pem`, the certificate and its key) into a directory of its own for a
//! device or the server, and [`revoke`] appends to the revocation list the server re-reads
//! ([`transport::revocation`]).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use protocol::DeviceId;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use transport::identity::{self, CertPaths, IdentityError};
use transport::{Fingerprint, RevocationError, RevocationList, REVOKED_FILE};

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
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Revocation(#[from] RevocationError),
    #[error("{path} is the CA directory; export a bundle into a directory of its own (the point is to leave the CA key behind)")]
    ExportIntoCa { path: PathBuf },
    #[error("{path} holds a CA key; export a bundle into a directory without one")]
    ExportBesideCaKey { path: PathBuf },
    #[error("{path} names device {found:?}, not device {expected}")]
    WrongDevice {
        path: PathBuf,
        expected: u64,
        found: Option<u64>,
    },
    #[error("nothing to revoke: give a device id or a certificate")]
    NothingToRevoke,
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
    // The mode above applies only to a new file; a replaced key file is restricted as well.
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(io_err(path, "restrict permissions of"))?;
    }
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
    let key =
        KeyPair::from_pem(&identity::read_private_key(&paths.key)?).map_err(|e| PkiError::Pem {
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

/// Copies `files` (certificate paths in the CA directory `dir`; keys are read as private keys
/// and written 0600) into `out`, created with mode 0700. Refuses `out` = `dir` and an `out`
/// that holds a CA key. Returns the files written.
fn export_bundle(
    dir: &Path,
    out: &Path,
    files: &[(&Path, bool)],
) -> Result<Vec<PathBuf>, PkiError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder
        .create(out)
        .map_err(io_err(out, "create directory"))?;
    let same = match (fs::canonicalize(dir), fs::canonicalize(out)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same {
        return Err(PkiError::ExportIntoCa {
            path: out.to_path_buf(),
        });
    }
    let ca_key = identity::ca_paths(out).key;
    if ca_key.exists() {
        return Err(PkiError::ExportBesideCaKey { path: ca_key });
    }
    // Read everything before writing anything: a missing file leaves no half bundle.
    let mut contents = Vec::new();
    for &(src, private) in files {
        let text = if private {
            identity::read_private_key(src)?
        } else {
            read_text(src)?
        };
        let name = src.file_name().ok_or_else(|| PkiError::Pem {
            path: src.to_path_buf(),
            detail: "not a file name".into(),
        })?;
        contents.push((out.join(name), text, private));
    }
    let mut written = Vec::new();
    for (path, text, private) in contents {
        write_file(&path, &text, private)?;
        written.push(path);
    }
    Ok(written)
}

/// Writes device `id`'s bundle (`ca.pem`, `device-<id>.pem`, `device-<id>.key.pem`, never the
/// CA key) from the CA directory `dir` into `out`, the directory the device loads from.
pub fn export_device(dir: &Path, id: DeviceId, out: &Path) -> Result<Vec<PathBuf>, PkiError> {
    let paths = identity::device_paths(dir, id);
    let cert = identity::load_certs(&paths.cert)?;
    let found = cert
        .first()
        .and_then(|c| identity::device_id_from_cert(c).ok());
    if found != Some(id) {
        return Err(PkiError::WrongDevice {
            path: paths.cert,
            expected: id.0,
            found: found.map(|d| d.0),
        });
    }
    let ca = identity::ca_paths(dir).cert;
    let written = export_bundle(
        dir,
        out,
        &[(&ca, false), (&paths.cert, false), (&paths.key, true)],
    )?;
    tracing::info!(device = %id, out = %out.display(), "exported device bundle");
    Ok(written)
}

/// Writes the server's bundle (`ca.pem`, `server.pem`, `server.key.pem`, never the CA key)
/// from the CA directory `dir` into `out`, the directory `aggregator serve --pki` loads from.
pub fn export_server(dir: &Path, out: &Path) -> Result<Vec<PathBuf>, PkiError> {
    let paths = identity::server_paths(dir);
    let ca = identity::ca_paths(dir).cert;
    let written = export_bundle(
        dir,
        out,
        &[(&ca, false), (&paths.cert, false), (&paths.key, true)],
    )?;
    tracing::info!(out = %out.display(), "exported server bundle");
    Ok(written)
}

/// Appends to `dir`'s revocation list ([`REVOKED_FILE`], created if missing): device `id` (every
/// certificate naming it) and, if `dir` holds its certificate, that certificate's fingerprint
/// too; and the fingerprint of each certificate file in `certs`. A running server refuses them
/// from its next handshake on. Returns the lines appended.
pub fn revoke(
    dir: &Path,
    id: Option<DeviceId>,
    certs: &[PathBuf],
) -> Result<Vec<String>, PkiError> {
    let path = dir.join(REVOKED_FILE);
    // Appending to a file that does not parse would hide the new lines behind the old error.
    let existing = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(source) => {
            return Err(PkiError::Io {
                path,
                op: "read",
                source,
            })
        }
    };
    RevocationList::parse(&path, &existing)?;
    let today = time::OffsetDateTime::now_utc().date();
    let when = format!(
        "{}-{:02}-{:02}",
        today.year(),
        u8::from(today.month()),
        today.day()
    );
    let mut lines = Vec::new();
    let mut fingerprint_line = |cert_path: &Path| -> Result<(), PkiError> {
        let cert = identity::load_certs(cert_path)?;
        let Some(leaf) = cert.first() else {
            return Ok(());
        };
        let named = match identity::device_id_from_cert(leaf) {
            Ok(d) => format!("device {}", d.0),
            Err(_) => "no device".to_string(),
        };
        lines.push(format!(
            "{}  # certificate {} ({named}), revoked {when}",
            Fingerprint::of(leaf),
            cert_path.display()
        ));
        Ok(())
    };
    if let Some(id) = id {
        let own = identity::device_paths(dir, id).cert;
        if own.exists() {
            fingerprint_line(&own)?;
        }
    }
    for cert in certs {
        fingerprint_line(cert)?;
    }
    if let Some(id) = id {
        lines.push(format!(
            "device-{}  # every certificate of device {}, revoked {when}; remove this line to admit a re-issued one",
            id.0, id.0
        ));
    }
    if lines.is_empty() {
        return Err(PkiError::NothingToRevoke);
    }
    fs::create_dir_all(dir).map_err(io_err(dir, "create directory"))?;
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(io_err(&path, "open"))?;
    let mut text = String::new();
    if !existing.is_empty() && !existing.ends_with('\n') {
        text.push('\n');
    }
    text.extend(lines.iter().map(|l| format!("{l}\n")));
    f.write_all(text.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(io_err(&path, "append to"))?;
    RevocationList::load(&path)?;
    Ok(lines)
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

    #[cfg(unix)]
    #[test]
    fn a_reissued_key_is_owner_only_and_a_readable_ca_key_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let ca = init_ca(dir.path()).unwrap();
        let dev = issue_device(dir.path(), DeviceId(2)).unwrap();
        fs::set_permissions(&dev.key, fs::Permissions::from_mode(0o644)).unwrap();
        issue_device(dir.path(), DeviceId(2)).unwrap();
        let mode = fs::metadata(&dev.key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        fs::set_permissions(&ca.key, fs::Permissions::from_mode(0o604)).unwrap();
        let err = issue_device(dir.path(), DeviceId(3)).unwrap_err();
        assert!(
            err.to_string().ends_with(&format!(
                "(mode 604); restrict it with `chmod 600 {}`",
                ca.key.display()
            )),
            "{err}"
        );
    }

    #[test]
    fn an_exported_device_bundle_holds_no_ca_key_and_loads() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        init_ca(&ca_dir).unwrap();
        issue_device(&ca_dir, DeviceId(5)).unwrap();
        let out = dir.path().join("device-5");
        let written = export_device(&ca_dir, DeviceId(5), &out).unwrap();
        let mut names: Vec<String> = fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["ca.pem", "device-5.key.pem", "device-5.pem"]);
        assert_eq!(written.len(), 3);
        transport::load_client_config(&out, DeviceId(5)).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&out.join("device-5.key.pem")), 0o600);
            assert_eq!(mode(&out) & 0o077, 0);
        }
        // Not into the CA directory, not beside another CA key, not a device never issued.
        let err = export_device(&ca_dir, DeviceId(5), &ca_dir).unwrap_err();
        assert!(matches!(err, PkiError::ExportIntoCa { .. }), "{err}");
        let other = dir.path().join("other");
        init_ca(&other).unwrap();
        let err = export_device(&ca_dir, DeviceId(5), &other).unwrap_err();
        assert!(matches!(err, PkiError::ExportBesideCaKey { .. }), "{err}");
        let err = export_device(&ca_dir, DeviceId(6), &dir.path().join("d6")).unwrap_err();
        assert!(
            err.to_string().contains("device-6.pem: read failed"),
            "{err}"
        );
        // The server's bundle likewise.
        issue_server(&ca_dir, &["localhost".into()]).unwrap();
        let pki = dir.path().join("pki");
        export_server(&ca_dir, &pki).unwrap();
        assert!(!pki.join(identity::CA_KEY_FILE).exists());
        transport::load_server_config(&pki).unwrap();
    }

    #[test]
    fn revoke_appends_device_and_fingerprint_lines_the_list_reads() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path()).unwrap();
        let dev = issue_device(dir.path(), DeviceId(5)).unwrap();
        let other = issue_device(dir.path(), DeviceId(6)).unwrap();
        assert!(matches!(
            revoke(dir.path(), None, &[]),
            Err(PkiError::NothingToRevoke)
        ));
        // A hand-edited file without a final newline is continued on a new line.
        fs::write(dir.path().join(REVOKED_FILE), "# revoked devices").unwrap();
        let lines = revoke(
            dir.path(),
            Some(DeviceId(5)),
            std::slice::from_ref(&other.cert),
        )
        .unwrap();
        assert_eq!(lines.len(), 3);
        let list = RevocationList::load(&dir.path().join(REVOKED_FILE)).unwrap();
        let fp = |p: &Path| Fingerprint::of(&identity::load_certs(p).unwrap()[0]);
        assert_eq!(list.devices, [DeviceId(5)].into_iter().collect());
        assert_eq!(
            list.certificates,
            [fp(&dev.cert), fp(&other.cert)].into_iter().collect()
        );
        // Re-issuing device 5 and removing its device line admits the new certificate only.
        let old = fp(&dev.cert);
        issue_device(dir.path(), DeviceId(5)).unwrap();
        let text = fs::read_to_string(dir.path().join(REVOKED_FILE)).unwrap();
        let kept: String = text
            .lines()
            .filter(|l| !l.starts_with("device-5"))
            .map(|l| format!("{l}\n"))
            .collect();
        fs::write(dir.path().join(REVOKED_FILE), kept).unwrap();
        let list = RevocationList::load(&dir.path().join(REVOKED_FILE)).unwrap();
        assert_eq!(list.check(DeviceId(5), fp(&dev.cert)), Ok(()));
        assert_eq!(
            list.check(DeviceId(5), old),
            Err(transport::Revoked::Certificate {
                device: DeviceId(5),
                fingerprint: old
            })
        );
    }
}
