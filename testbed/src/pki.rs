//! Test certificates made at test time (rcgen): a CA that issues server certificates (for
//! the bridge's TLS listeners, or a mock SCEF over TLS) and client certificates (for mTLS),
//! each written as PEM files into the CA's directory.
//!
//! ```no_run
//! # fn main() -> Result<(), nidd_testbed::pki::PkiError> {
//! use nidd_testbed::pki::TestCa;
//! let ca = TestCa::new()?;
//! let server = ca.issue_server(&["127.0.0.1", "localhost"])?;
//! let client = ca.issue_client("scef")?;
//! // server.cert / server.key for the listener, ca.cert_path() as a client CA or trust root.
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SerialNumber,
};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("writing PEM files: {0}")]
    Io(#[from] std::io::Error),
}

/// A certificate issued by a [`TestCa`]: its PEM files, and its DER to compare with what a
/// peer presented.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    /// PEM certificate.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8).
    pub key: PathBuf,
    /// The certificate's DER bytes.
    pub der: Vec<u8>,
}

/// A throwaway certificate authority whose files live in a directory of its own (a temporary
/// one from [`new`](Self::new), removed when the CA is dropped, or one given to
/// [`in_dir`](Self::in_dir)).
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
    dir: PathBuf,
    cert_path: PathBuf,
    issued: AtomicU32,
    _temporary: Option<tempfile::TempDir>,
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive and of full length in DER.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    SerialNumber::from_slice(&bytes)
}

impl TestCa {
    /// A new CA in a fresh temporary directory.
    pub fn new() -> Result<Self, PkiError> {
        let temporary = tempfile::tempdir()?;
        let dir = temporary.path().to_path_buf();
        let mut ca = Self::in_dir(&dir)?;
        ca._temporary = Some(temporary);
        Ok(ca)
    }

    /// A new CA writing its files into `dir`.
    pub fn in_dir(dir: &Path) -> Result<Self, PkiError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, "nidd-bridge test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial());
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        std::fs::create_dir_all(dir)?;
        let cert_path = dir.join(format!("ca-{:08x}.pem", rand::random::<u32>()));
        std::fs::write(&cert_path, issuer.pem())?;
        Ok(Self {
            issuer,
            dir: dir.to_path_buf(),
            cert_path,
            issued: AtomicU32::new(0),
            _temporary: None,
        })
    }

    /// The CA certificate (PEM): a listener's `client_ca_file`, or a client's trust root.
    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// The CA certificate's DER bytes.
    pub fn der(&self) -> Vec<u8> {
        self.issuer.der().to_vec()
    }

    /// A server certificate for `names` (IP addresses become IP SANs, others DNS SANs).
    pub fn issue_server(&self, names: &[&str]) -> Result<IssuedCert, PkiError> {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let common_name = names.first().cloned().unwrap_or_else(|| "server".into());
        let mut params = CertificateParams::new(names)?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue("server", params)
    }

    /// A client certificate (for mTLS) with common name `name`.
    pub fn issue_client(&self, name: &str) -> Result<IssuedCert, PkiError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue("client", params)
    }

    fn issue(&self, kind: &str, mut params: CertificateParams) -> Result<IssuedCert, PkiError> {
        params.serial_number = Some(random_serial());
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate()?;
        let certificate = params.signed_by(&key, &self.issuer)?;
        let n = self.issued.fetch_add(1, Ordering::Relaxed);
        // Unique even when several CAs share a directory.
        let stem = format!("{kind}-{n}-{:08x}", rand::random::<u32>());
        let cert = self.dir.join(format!("{stem}.pem"));
        let key_path = self.dir.join(format!("{stem}.key"));
        std::fs::write(&cert, certificate.pem())?;
        std::fs::write(&key_path, key.serialize_pem())?;
        Ok(IssuedCert {
            cert,
            key: key_path,
            der: certificate.der().to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_files_are_pem_and_distinct() {
        let ca = TestCa::new().unwrap();
        let server = ca.issue_server(&["127.0.0.1", "localhost"]).unwrap();
        let client = ca.issue_client("scef").unwrap();
        let other = TestCa::new().unwrap();
        assert_ne!(ca.der(), other.der());
        for path in [&server.cert, &client.cert, &ca.cert_path().to_path_buf()] {
            let text = std::fs::read_to_string(path).unwrap();
            assert!(text.starts_with("-----BEGIN CERTIFICATE-----"), "{text}");
        }
        let key = std::fs::read_to_string(&server.key).unwrap();
        assert!(key.contains("PRIVATE KEY"), "{key}");
        assert_ne!(server.cert, client.cert);
        assert_ne!(server.der, client.der);
    }
}
