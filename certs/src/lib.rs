//! Development and small-deployment PKI for quip.
//!
//! `quipd serve` calls [`load_or_create`] on its certificate directory: the first start makes a
//! certificate authority and a server certificate signed by it, later starts reuse them.
//! `quipd certs init` calls [`create_pki`] to make the same files for a real host name, with
//! bounded validity. Clients trust the CA certificate (`ca.pem`) and verify the server against
//! it; nothing here or in the clients skips verification.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// File names inside the certificate directory.
pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca.key";
pub const SERVER_CERT_FILE: &str = "server.pem";
pub const SERVER_KEY_FILE: &str = "server.key";

/// The names a development server certificate is valid for.
pub const DEV_SERVER_NAMES: &[&str] = &["localhost", "127.0.0.1", "::1"];

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: not a valid PEM file: {}", describe_pem_error(.error))]
    Pem {
        path: PathBuf,
        error: rustls_pki_types::pem::Error,
    },
    #[error("making certificates: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{dir}: holds only part of a PKI (missing {missing}); remove the directory's certificate files or restore the missing ones")]
    Incomplete { dir: PathBuf, missing: String },
    #[error(
        "{0} already exists; certificates are never overwritten (move the old ones away first)"
    )]
    Exists(PathBuf),
    #[error("invalid certificate settings: {0}")]
    Invalid(String),
}

/// A server's certificate chain and private key, ready for rustls.
#[derive(Debug)]
pub struct ServerIdentity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl ServerIdentity {
    /// Loads a certificate chain and key from PEM files.
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<Self, CertError> {
        let chain = CertificateDer::pem_file_iter(cert)
            .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
            .map_err(|source| pem_error(cert, source))?;
        let key = PrivateKeyDer::from_pem_file(key).map_err(|source| pem_error(key, source))?;
        Ok(ServerIdentity { chain, key })
    }
}

/// What [`load_or_create`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provenance {
    Created,
    Loaded,
}

/// Loads the server certificate from `dir`, making a CA and server certificate first if `dir`
/// holds none. The CA's key need not be there (it is better kept offline once the server
/// certificate is made).
pub fn load_or_create(dir: &Path) -> Result<(ServerIdentity, Provenance), CertError> {
    let files = [CA_CERT_FILE, CA_KEY_FILE, SERVER_CERT_FILE, SERVER_KEY_FILE];
    let present = |name: &&str| dir.join(name).exists();
    let missing: Vec<&str> = files.iter().copied().filter(|n| !present(n)).collect();
    let needed = [SERVER_CERT_FILE, SERVER_KEY_FILE];
    let provenance = match missing.len() {
        _ if needed.iter().all(present) => Provenance::Loaded,
        n if n == files.len() => {
            create_dev_pki(dir, DEV_SERVER_NAMES)?;
            Provenance::Created
        }
        _ => {
            return Err(CertError::Incomplete {
                dir: dir.to_owned(),
                missing: missing.join(", "),
            })
        }
    };
    let identity =
        ServerIdentity::from_pem_files(&dir.join(SERVER_CERT_FILE), &dir.join(SERVER_KEY_FILE))?;
    Ok((identity, provenance))
}

/// Makes a CA and a server certificate for `server_names` (DNS names or IP addresses) in `dir`.
/// Private keys are written with mode 0600.
pub fn create_dev_pki(dir: &Path, server_names: &[&str]) -> Result<(), CertError> {
    let names: Vec<String> = server_names.iter().map(|s| s.to_string()).collect();
    create(dir, "quip development CA", &names, None)
}

/// What `quipd certs init` makes.
#[derive(Debug, Clone)]
pub struct PkiSettings {
    /// The server's main name: its certificate's common name and first subject alternative name.
    pub hostname: String,
    /// More names (DNS names or IP addresses) the server is reached by.
    pub extra_names: Vec<String>,
    pub ca_validity: time::Duration,
    pub server_validity: time::Duration,
}

impl PkiSettings {
    /// A CA valid ten years and a server certificate valid 825 days, the longest that
    /// clients following the CA/Browser Forum's older rules accept.
    pub fn new(hostname: impl Into<String>) -> Self {
        PkiSettings {
            hostname: hostname.into(),
            extra_names: Vec::new(),
            ca_validity: time::Duration::days(3650),
            server_validity: time::Duration::days(825),
        }
    }

    /// Every name the server certificate carries, the host name first, without repeats.
    pub fn names(&self) -> Vec<String> {
        let mut names = vec![self.hostname.clone()];
        for name in &self.extra_names {
            if !names.contains(name) {
                names.push(name.clone());
            }
        }
        names
    }
}

/// The files [`create_pki`] wrote, and until when the server certificate is valid.
#[derive(Debug, Clone)]
pub struct PkiFiles {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub server_names: Vec<String>,
    pub server_not_after: time::OffsetDateTime,
}

/// Makes a CA and a server certificate for a small deployment in `dir`. Refuses to overwrite
/// any existing file; private keys are written with mode 0600.
pub fn create_pki(dir: &Path, settings: &PkiSettings) -> Result<PkiFiles, CertError> {
    let hostname = settings.hostname.trim();
    if hostname.is_empty() || hostname.contains(char::is_whitespace) {
        return Err(CertError::Invalid(format!(
            "{hostname:?} is not a host name"
        )));
    }
    for file in [CA_CERT_FILE, CA_KEY_FILE, SERVER_CERT_FILE, SERVER_KEY_FILE] {
        if dir.join(file).exists() {
            return Err(CertError::Exists(dir.join(file)));
        }
    }
    let now = time::OffsetDateTime::now_utc();
    let validity = Validity {
        not_before: now - time::Duration::hours(1),
        ca_not_after: now + settings.ca_validity,
        server_not_after: now + settings.server_validity,
    };
    let names = settings.names();
    create(
        dir,
        &format!("quip CA for {hostname}"),
        &names,
        Some(&validity),
    )?;
    Ok(PkiFiles {
        ca_cert: dir.join(CA_CERT_FILE),
        ca_key: dir.join(CA_KEY_FILE),
        server_cert: dir.join(SERVER_CERT_FILE),
        server_key: dir.join(SERVER_KEY_FILE),
        server_names: names,
        server_not_after: validity.server_not_after,
    })
}

struct Validity {
    not_before: time::OffsetDateTime,
    ca_not_after: time::OffsetDateTime,
    server_not_after: time::OffsetDateTime,
}

/// Makes the four files. Without `validity`, rcgen's defaults (valid from 1975 to 4096: a
/// development PKI that never expires).
fn create(
    dir: &Path,
    ca_name: &str,
    server_names: &[String],
    validity: Option<&Validity>,
) -> Result<(), CertError> {
    fs::create_dir_all(dir).map_err(|source| io_error(dir, source))?;

    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::default();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.distinguished_name = name(ca_name);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    if let Some(validity) = validity {
        ca_params.not_before = validity.not_before;
        ca_params.not_after = validity.ca_not_after;
    }
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, &ca_key);

    let server_key = KeyPair::generate()?;
    let mut server_params = CertificateParams::new(server_names.to_vec())?;
    server_params.distinguished_name = name(server_names.first().map_or("quipd", String::as_str));
    server_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server_params.use_authority_key_identifier_extension = true;
    if let Some(validity) = validity {
        server_params.not_before = validity.not_before;
        server_params.not_after = validity.server_not_after;
    }
    let server_cert = server_params.signed_by(&server_key, &issuer)?;

    // Keys first, certificates last: a directory with all four files is always complete.
    write_file(&dir.join(CA_KEY_FILE), &ca_key.serialize_pem(), true)?;
    write_file(
        &dir.join(SERVER_KEY_FILE),
        &server_key.serialize_pem(),
        true,
    )?;
    write_file(&dir.join(SERVER_CERT_FILE), &server_cert.pem(), false)?;
    write_file(&dir.join(CA_CERT_FILE), &ca_cert.pem(), false)?;
    Ok(())
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

fn write_file(path: &Path, contents: &str, private: bool) -> Result<(), CertError> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut file = options.open(path).map_err(|e| io_error(path, e))?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| io_error(path, e))
}

fn io_error(path: &Path, error: std::io::Error) -> CertError {
    CertError::Io {
        path: path.to_owned(),
        error,
    }
}

fn pem_error(path: &Path, error: rustls_pki_types::pem::Error) -> CertError {
    CertError::Pem {
        path: path.to_owned(),
        error,
    }
}

/// A PEM error in words (the parser's own message shows a missing end marker as a list of
/// bytes).
pub fn describe_pem_error(error: &rustls_pki_types::pem::Error) -> String {
    use rustls_pki_types::pem::Error;
    match error {
        Error::MissingSectionEnd { end_marker } => format!(
            "it ends without a `-----END {}-----` line: the file is cut short",
            String::from_utf8_lossy(end_marker).trim()
        ),
        Error::IllegalSectionStart { line } => format!(
            "the line `{}` is not a valid BEGIN line",
            String::from_utf8_lossy(line).trim()
        ),
        Error::Base64Decode(e) => format!("the text between BEGIN and END is not base64 ({e})"),
        Error::Io(e) => e.to_string(),
        Error::NoItemsFound => "it holds no PEM item of the kind needed".into(),
        other => other.to_string(),
    }
}

/// A client certificate for one device, issued by [`issue_client_certificate`].
#[derive(Debug, Clone)]
pub struct ClientCertificate {
    /// The certificate, PEM; the daemon registers its DER bytes as the device's credential.
    pub cert_pem: String,
    pub der: Vec<u8>,
    /// Its private key, PEM (PKCS#8). Written with mode 0600, never sent anywhere.
    pub key_pem: String,
    pub not_after: time::OffsetDateTime,
}

/// Makes a client certificate for `user`'s device `device`, signed by the CA whose certificate
/// and key are in `ca_cert` and `ca_key` (PEM files). The subject's common name is
/// `user/device`, the extended key usage `clientAuth`. The daemon does not trust the name: a
/// certificate identifies a device only once it is registered (`quipd certs client` does both).
pub fn issue_client_certificate(
    ca_cert: &Path,
    ca_key: &Path,
    user: &str,
    device: &str,
    validity: time::Duration,
) -> Result<ClientCertificate, CertError> {
    let ca_pem = fs::read_to_string(ca_cert).map_err(|e| io_error(ca_cert, e))?;
    let key_pem = fs::read_to_string(ca_key).map_err(|e| io_error(ca_key, e))?;
    let ca_key = KeyPair::from_pem(&key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;
    let now = time::OffsetDateTime::now_utc();
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = name(&format!("{user}/{device}"));
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + validity;
    let cert = params.signed_by(&key, &issuer)?;
    Ok(ClientCertificate {
        cert_pem: cert.pem(),
        der: cert.der().to_vec(),
        key_pem: key.serialize_pem(),
        not_after: params.not_after,
    })
}

/// Writes a client certificate and its key to `dir` as `NAME.pem` and `NAME.key` (mode 0600);
/// refuses to overwrite either.
pub fn write_client_certificate(
    dir: &Path,
    name: &str,
    cert: &ClientCertificate,
) -> Result<(PathBuf, PathBuf), CertError> {
    fs::create_dir_all(dir).map_err(|source| io_error(dir, source))?;
    let (cert_path, key_path) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    for path in [&cert_path, &key_path] {
        if path.exists() {
            return Err(CertError::Exists(path.clone()));
        }
    }
    write_file(&key_path, &cert.key_pem, true)?;
    write_file(&cert_path, &cert.cert_pem, false)?;
    Ok((cert_path, key_path))
}

/// A client's certificate chain and key from PEM files, for mutual TLS.
pub fn load_client_identity(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), CertError> {
    let identity = ServerIdentity::from_pem_files(cert, key)?;
    Ok((identity.chain, identity.key))
}

/// Reads the CA certificates a client should trust from a PEM file.
pub fn load_ca_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|source| pem_error(path, source))?;
    if certs.is_empty() {
        return Err(pem_error(path, rustls_pki_types::pem::Error::NoItemsFound));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_once_then_reuses() {
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs");
        let (first, provenance) = load_or_create(&certs).unwrap();
        assert_eq!(provenance, Provenance::Created);
        let (second, provenance) = load_or_create(&certs).unwrap();
        assert_eq!(provenance, Provenance::Loaded);
        assert_eq!(first.chain, second.chain);
        assert_eq!(load_ca_certs(&certs.join(CA_CERT_FILE)).unwrap().len(), 1);
    }

    #[cfg(unix)]
    #[test]
    fn private_keys_are_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        create_dev_pki(dir.path(), DEV_SERVER_NAMES).unwrap();
        for key in [CA_KEY_FILE, SERVER_KEY_FILE] {
            let mode = fs::metadata(dir.path().join(key))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{key}");
        }
    }

    #[test]
    fn a_deployment_pki_names_every_host_and_expires() {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = PkiSettings::new("chat.example.com");
        settings.extra_names = vec!["10.1.2.3".into(), "chat.example.com".into()];
        let files = create_pki(dir.path(), &settings).unwrap();
        assert_eq!(files.server_names, ["chat.example.com", "10.1.2.3"]);
        let days = (files.server_not_after - time::OffsetDateTime::now_utc()).whole_days();
        assert!((824..=825).contains(&days), "{days}");
        let identity =
            ServerIdentity::from_pem_files(&files.server_cert, &files.server_key).unwrap();
        assert_eq!(identity.chain.len(), 1);
        // The CA key may go offline: the server still loads.
        fs::remove_file(&files.ca_key).unwrap();
        assert_eq!(load_or_create(dir.path()).unwrap().1, Provenance::Loaded);
        // Never overwritten.
        let err = create_pki(dir.path(), &settings).unwrap_err();
        assert!(matches!(err, CertError::Exists(_)), "{err}");
        assert!(create_pki(dir.path(), &PkiSettings::new("bad name")).is_err());
    }

    #[test]
    fn client_certificates_are_signed_by_the_ca_for_client_auth() {
        let dir = tempfile::tempdir().unwrap();
        create_dev_pki(dir.path(), DEV_SERVER_NAMES).unwrap();
        let cert = issue_client_certificate(
            &dir.path().join(CA_CERT_FILE),
            &dir.path().join(CA_KEY_FILE),
            "alice",
            "phone",
            time::Duration::days(30),
        )
        .unwrap();
        let out = dir.path().join("devices");
        let (cert_path, key_path) = write_client_certificate(&out, "alice-phone", &cert).unwrap();
        let (chain, _key) = load_client_identity(&cert_path, &key_path).unwrap();
        assert_eq!(chain[0].as_ref(), cert.der.as_slice());
        assert!(write_client_certificate(&out, "alice-phone", &cert).is_err());
        let days = (cert.not_after - time::OffsetDateTime::now_utc()).whole_days();
        assert!((29..=30).contains(&days), "{days}");
    }

    #[test]
    fn partial_directory_is_refused_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        create_dev_pki(dir.path(), DEV_SERVER_NAMES).unwrap();
        fs::remove_file(dir.path().join(SERVER_KEY_FILE)).unwrap();
        let err = load_or_create(dir.path()).unwrap_err();
        assert!(err.to_string().contains(SERVER_KEY_FILE), "{err}");
    }

    #[test]
    fn a_cut_or_missing_pem_file_is_told_in_words_once() {
        let dir = tempfile::tempdir().unwrap();
        create_dev_pki(dir.path(), DEV_SERVER_NAMES).unwrap();
        let ca = std::fs::read_to_string(dir.path().join(CA_CERT_FILE)).unwrap();
        let cut = dir.path().join("cut.pem");
        std::fs::write(&cut, &ca[..ca.len() / 2]).unwrap();
        let err = load_ca_certs(&cut).unwrap_err().to_string();
        assert!(
            err.contains("`-----END CERTIFICATE-----`") && err.contains("cut short"),
            "{err}"
        );
        assert!(!err.contains("[45, 45"), "{err}");
        // The OS error is in the message, not again as its source (which `{:#}` would add).
        let missing = load_ca_certs(&dir.path().join("none.pem")).unwrap_err();
        assert!(missing.to_string().contains("os error 2"), "{missing}");
        assert!(std::error::Error::source(&missing).is_none());
    }
}
