use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::QuicClientConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::ClientError;

/// How to reach and authenticate to a server.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// `host:port`; the host is also the name the server certificate must carry, unless
    /// `server_name` says otherwise.
    pub server: String,
    pub server_name: Option<String>,
    /// The certificate authorities that may sign the server's certificate. There is no way to
    /// skip verification.
    pub ca: Vec<CertificateDer<'static>>,
    /// The device's bearer token; empty when the device is identified by `client_identity`.
    pub token: String,
    /// A client certificate (mutual TLS) that identifies the device instead of a token.
    pub client_identity: Option<ClientIdentity>,
    /// Describes the client in the server's logs.
    pub client_name: String,
    /// How long one connection attempt, and a request waiting for a connection, may take.
    pub connect_timeout: Duration,
    /// A connection silent for this long is dead (keep-alives are sent at a third of it).
    pub idle_timeout: Duration,
    /// First delay before reconnecting; it doubles per failed attempt, with full jitter.
    pub reconnect_initial: Duration,
    /// Longest delay between reconnect attempts.
    pub reconnect_max: Duration,
    /// Where to keep cursors and unacknowledged sends across restarts of the app (JSON). One
    /// per device: each device resumes on its own cursors.
    pub state_file: Option<std::path::PathBuf>,
    /// Report what subscriptions receive as delivered (the second tick other members see).
    pub report_delivered: bool,
    /// How long the client goes on without progress before it gives up: every reconnect
    /// attempt failing, or the server answering only `UNAVAILABLE`. Then every waiting call
    /// fails with `ClientError::GaveUp` and the client is closed; unacknowledged sends stay in
    /// the state file. `None` (the default): it keeps trying for as long as it lives.
    pub give_up_after: Option<Duration>,
}

impl ClientConfig {
    pub fn new(
        server: impl Into<String>,
        ca: Vec<CertificateDer<'static>>,
        token: impl Into<String>,
    ) -> Self {
        ClientConfig {
            server: server.into(),
            server_name: None,
            ca,
            token: token.into(),
            client_identity: None,
            client_name: concat!("quip-client/", env!("CARGO_PKG_VERSION")).into(),
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            reconnect_initial: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            state_file: None,
            report_delivered: true,
            give_up_after: None,
        }
    }

    /// Like `new`, reading the CA certificates from a PEM file.
    pub fn from_ca_file(
        server: impl Into<String>,
        ca_file: impl AsRef<Path>,
        token: impl Into<String>,
    ) -> Result<Self, ClientError> {
        let path = ca_file.as_ref();
        let ca = CertificateDer::pem_file_iter(path)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| {
                ClientError::Config(format!("CA file {}: {}", path.display(), describe_pem(&e)))
            })?;
        if ca.is_empty() {
            return Err(ClientError::Config(format!(
                "CA file {} holds no certificate",
                path.display()
            )));
        }
        Ok(Self::new(server, ca, token))
    }

    /// Identifies the device with the client certificate and key in these PEM files (made by
    /// `quipd certs client`); the token is then sent empty.
    pub fn with_client_certificate(
        mut self,
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<Self, ClientError> {
        let (cert, key) = (cert.as_ref(), key.as_ref());
        let chain = CertificateDer::pem_file_iter(cert)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| {
                ClientError::Config(format!(
                    "certificate {}: {}",
                    cert.display(),
                    describe_pem(&e)
                ))
            })?;
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
            ClientError::Config(format!("key {}: {}", key.display(), describe_pem(&e)))
        })?;
        self.client_identity = Some(ClientIdentity { chain, key });
        self.token = String::new();
        Ok(self)
    }

    /// The host part of `server`, without brackets.
    pub(crate) fn host(&self) -> &str {
        if let Some(name) = &self.server_name {
            return name;
        }
        let host = match self.server.rsplit_once(':') {
            Some((host, port)) if port.parse::<u16>().is_ok() => host,
            _ => &self.server,
        };
        host.trim_start_matches('[').trim_end_matches(']')
    }

    pub(crate) fn quic_config(&self) -> Result<quinn::ClientConfig, ClientError> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in &self.ca {
            roots
                .add(cert.clone())
                .map_err(|e| ClientError::Config(format!("CA certificate unusable: {e}")))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| ClientError::Config(e.to_string()))?
            .with_root_certificates(roots);
        let mut tls = match &self.client_identity {
            Some(identity) => tls
                .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())
                .map_err(|e| ClientError::Config(format!("client certificate unusable: {e}")))?,
            None => tls.with_no_client_auth(),
        };
        tls.alpn_protocols = vec![quip_protocol::ALPN.to_vec()];
        let crypto = QuicClientConfig::try_from(tls)
            .map_err(|e| ClientError::Config(format!("TLS config unusable for QUIC: {e}")))?;
        let mut transport = quinn::TransportConfig::default();
        // The server opens one stream per subscribed conversation.
        transport.max_concurrent_uni_streams(4096u32.into());
        transport.max_concurrent_bidi_streams(0u32.into());
        transport.keep_alive_interval(Some(self.idle_timeout / 3));
        transport.max_idle_timeout(Some(
            self.idle_timeout
                .try_into()
                .map_err(|_| ClientError::Config("idle timeout out of range".into()))?,
        ));
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(Arc::new(transport));
        Ok(config)
    }
}

/// A PEM error in words (the parser's own message shows a missing end marker as a list of
/// bytes).
fn describe_pem(error: &rustls_pki_types::pem::Error) -> String {
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

/// A client certificate chain and its private key.
pub struct ClientIdentity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Clone for ClientIdentity {
    fn clone(&self) -> Self {
        ClientIdentity {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl std::fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("chain", &self.chain.len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_ca_file_is_told_in_words() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIU\n").unwrap();
        let err = ClientConfig::from_ca_file("127.0.0.1:4433", &path, "t").unwrap_err();
        let err = err.to_string();
        assert!(
            err.contains("-----END CERTIFICATE-----") && err.contains("cut short"),
            "{err}"
        );
        assert!(!err.contains("[67, 69"), "{err}");
    }

    #[test]
    fn host_is_taken_from_the_server_address() {
        let host = |s: &str| ClientConfig::new(s, vec![], "t").host().to_owned();
        assert_eq!(host("127.0.0.1:4433"), "127.0.0.1");
        assert_eq!(host("[::1]:4433"), "::1");
        assert_eq!(host("chat.example.com:4433"), "chat.example.com");
    }
}
