//! TLS for the HTTP listeners: a listener's certificate chain, key and optional client CA read
//! from PEM files into a rustls server configuration, and kept reloadable: a reload (SIGHUP)
//! swaps in a configuration read afresh for new handshakes, while open connections keep the
//! one they were made with; a reload that fails keeps the old configuration.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use prometheus::IntCounterVec;
use rustls::RootCertStore;
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

/// The PEM files one listener serves TLS from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TlsFiles {
    pub(crate) cert: PathBuf,
    pub(crate) key: PathBuf,
    /// When set, clients must present a certificate signed by one of these CAs.
    pub(crate) client_ca: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum TlsError {
    #[error("{path}: {detail}")]
    File { path: PathBuf, detail: String },
    #[error("{path}: no certificate in the file")]
    NoCertificate { path: PathBuf },
    #[error("TLS configuration of {listener}: {detail}")]
    Rustls {
        listener: &'static str,
        detail: String,
    },
}

fn file_error(path: &Path, detail: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        detail: detail.to_string(),
    }
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certificates: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_error(path, e))?;
    if certificates.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certificates)
}

/// The one crypto provider the bridge uses (the one its T8 client's rustls already builds).
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Reads `files` into a server configuration that speaks HTTP/1.1 only (ALPN `http/1.1`).
pub(crate) fn server_config(
    listener: &'static str,
    files: &TlsFiles,
) -> Result<Arc<ServerConfig>, TlsError> {
    let rustls_error = |e: rustls::Error| TlsError::Rustls {
        listener,
        detail: e.to_string(),
    };
    let chain = certificates(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| file_error(&files.key, e))?;
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(rustls_error)?;
    let builder = match &files.client_ca {
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for certificate in certificates(path)? {
                roots
                    .add(certificate)
                    .map_err(|e| file_error(path, format!("not a CA certificate: {e}")))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| file_error(path, e))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key).map_err(rustls_error)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// One listener's TLS configuration, swapped whole on reload.
pub(crate) struct ReloadableTls {
    listener: &'static str,
    files: TlsFiles,
    current: RwLock<Arc<ServerConfig>>,
    reloads: IntCounterVec,
}

impl ReloadableTls {
    /// Reads the files once; an error here refuses to start.
    pub(crate) fn load(
        listener: &'static str,
        files: TlsFiles,
        reloads: IntCounterVec,
    ) -> Result<Self, TlsError> {
        let current = RwLock::new(server_config(listener, &files)?);
        Ok(Self {
            listener,
            files,
            current,
            reloads,
        })
    }

    /// The acceptor for the next handshake.
    pub(crate) fn acceptor(&self) -> TlsAcceptor {
        let config = match self.current.read() {
            Ok(config) => config.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        TlsAcceptor::from(config)
    }

    /// Reads the files again. On success new handshakes use them; on failure the old
    /// configuration stays, and the failure is logged and counted.
    pub(crate) fn reload(&self) -> Result<(), TlsError> {
        match server_config(self.listener, &self.files) {
            Ok(config) => {
                match self.current.write() {
                    Ok(mut current) => *current = config,
                    Err(poisoned) => *poisoned.into_inner() = config,
                }
                self.reloads
                    .with_label_values(&[self.listener, "reloaded"])
                    .inc();
                tracing::info!(listener = self.listener, "TLS certificates reloaded");
                Ok(())
            }
            Err(error) => {
                self.reloads
                    .with_label_values(&[self.listener, "failed"])
                    .inc();
                tracing::warn!(listener = self.listener, %error, "TLS reload failed; the previous certificates stay in use");
                Err(error)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reloads() -> IntCounterVec {
        IntCounterVec::new(prometheus::Opts::new("r", "r"), &["listener", "outcome"]).unwrap()
    }

    #[test]
    fn missing_and_empty_files_are_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let files = TlsFiles {
            cert: dir.path().join("missing.pem"),
            key: empty.clone(),
            client_ca: None,
        };
        let error = ReloadableTls::load("callback", files, reloads())
            .err()
            .unwrap();
        assert!(error.to_string().contains("missing.pem"), "{error}");
        let files = TlsFiles {
            cert: empty.clone(),
            key: empty,
            client_ca: None,
        };
        let error = server_config("callback", &files).err().unwrap();
        assert!(matches!(error, TlsError::NoCertificate { .. }), "{error}");
    }

    #[test]
    fn a_failed_reload_keeps_the_configuration_and_a_good_one_swaps_it() {
        let ca = nidd_testbed::pki::TestCa::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (first, second) = (dir.path().join("first"), dir.path().join("second"));
        std::fs::create_dir(&first).unwrap();
        std::fs::create_dir(&second).unwrap();
        let (cert, key) = ca.issue_server(&first, &["127.0.0.1"]).unwrap();
        let (_, other_key) = ca.issue_server(&second, &["127.0.0.1"]).unwrap();
        let counted = reloads();
        let files = TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: Some(ca.write_ca(dir.path())),
        };
        let tls = ReloadableTls::load("callback", files, counted.clone()).unwrap();
        let before = tls.acceptor().config().clone();

        // A key that does not belong to the certificate: refused, the old configuration stays.
        let good_key = std::fs::read(&key).unwrap();
        std::fs::copy(&other_key, &key).unwrap();
        let error = tls.reload().unwrap_err();
        assert!(error.to_string().contains("callback"), "{error}");
        assert!(Arc::ptr_eq(&before, tls.acceptor().config()));
        assert_eq!(counted.with_label_values(&["callback", "failed"]).get(), 1);

        std::fs::write(&key, good_key).unwrap();
        tls.reload().unwrap();
        assert!(!Arc::ptr_eq(&before, tls.acceptor().config()));
        assert_eq!(
            counted.with_label_values(&["callback", "reloaded"]).get(),
            1
        );
        assert_eq!(
            tls.acceptor().config().alpn_protocols,
            vec![b"http/1.1".to_vec()],
            "HTTP/1.1 only"
        );
    }
}
