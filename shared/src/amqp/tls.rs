//! TLS to the broker with rustls: the client configuration an `amqps://` URL's parameters ask
//! for (trusted CAs, client certificate, server name, `verify_none`), built once at start so
//! that a missing or unreadable file is an error before any connection is tried; and the
//! handshake errors in words.

use std::{io::Read, path::Path, sync::Arc};

use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject},
};
use tcp_stream::RustlsConnector;

use super::brokers::TlsParams;

/// Largest certificate or key file read (a PEM bundle of every public CA is ~250 KB).
const MAX_PEM_BYTES: u64 = 4 * 1024 * 1024;

/// What one `amqps://` broker's TLS handshakes use.
#[derive(Clone)]
pub(crate) struct TlsClient {
    /// The rustls connector, from this broker's parameters.
    pub(crate) connector: Arc<RustlsConnector>,
    /// The name the certificate must carry (and the SNI, unless disabled).
    pub(crate) server_name: String,
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsClient")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl TlsClient {
    /// The client for `params`: reads the CA, certificate and key files now.
    ///
    /// # Errors
    /// A file that cannot be read or holds no usable certificate or key, or a system without
    /// any trusted root certificate; in words.
    pub(crate) fn new(params: &TlsParams) -> Result<Self, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup: {e}"))?;
        let builder = if params.verify_none {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
        } else {
            builder.with_root_certificates(roots(params.ca_file.as_deref())?)
        };
        let mut config = match (&params.cert_file, &params.key_file) {
            (Some(cert), Some(key)) => {
                let chain = certificates(cert)?;
                let key = private_key(key)?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| format!("client certificate {}: {e}", cert.display()))?
            }
            _ => builder.with_no_client_auth(),
        };
        config.enable_sni = !params.sni_disabled;
        ServerName::try_from(params.server_name.clone()).map_err(|_| {
            format!(
                "{:?} is not a valid server name for TLS",
                super::bounded(&params.server_name, 80)
            )
        })?;
        Ok(Self {
            connector: Arc::new(RustlsConnector::from(config)),
            server_name: params.server_name.clone(),
        })
    }
}

/// The trusted roots: only the certificates of `ca_file`, or the system's.
fn roots(ca_file: Option<&Path>) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            for cert in certificates(path)? {
                roots.add(cert).map_err(|e| {
                    format!(
                        "cacertfile {}: a certificate is not usable: {e}",
                        path.display()
                    )
                })?;
            }
        }
        None => {
            let found = system_roots();
            let (added, _ignored) = roots.add_parsable_certificates(found.iter().cloned());
            if added == 0 {
                return Err(
                    "no trusted root certificate found on this system (install ca-certificates, \
                     set SSL_CERT_FILE, or give the broker's CA with cacertfile=...)"
                        .to_owned(),
                );
            }
        }
    }
    Ok(roots)
}

/// The system's trusted roots, read once per process.
fn system_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: std::sync::OnceLock<Vec<CertificateDer<'static>>> = std::sync::OnceLock::new();
    ROOTS.get_or_init(|| rustls_native_certs::load_native_certs().certs)
}

/// Every certificate in a PEM file.
fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read_pem(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: not a PEM certificate file ({e})", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in this file", path.display()));
    }
    Ok(certs)
}

/// The first private key in a PEM file.
fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let pem = read_pem(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        format!(
            "{}: no usable private key (PEM: PKCS#8, PKCS#1 or SEC1): {e}",
            path.display()
        )
    })
}

/// A PEM file's bytes, at most [`MAX_PEM_BYTES`].
fn read_pem(path: &Path) -> Result<Vec<u8>, String> {
    // Not a FIFO or a device, whose read could block the start for ever.
    match std::fs::metadata(path) {
        Ok(meta) if !meta.is_file() => {
            return Err(format!("{} is not a regular file", path.display()));
        }
        Err(e) => return Err(format!("cannot open {}: {e}", path.display())),
        Ok(_) => {}
    }
    let file =
        std::fs::File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(MAX_PEM_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if bytes.len() as u64 > MAX_PEM_BYTES {
        return Err(format!(
            "{} is larger than {} MiB: not a certificate or key file",
            path.display(),
            MAX_PEM_BYTES / (1024 * 1024)
        ));
    }
    Ok(bytes)
}

/// A failed TLS handshake in words: what it means and what to change.
pub(crate) fn handshake_error(error: &std::io::Error, host: &str, port: u16) -> String {
    let text = super::bounded(&error.to_string(), 300).to_owned();
    let hint = if text.contains("InvalidContentType") || text.contains("corrupt message") {
        " (the server did not answer in TLS: is this a plaintext port? RabbitMQ's TLS port is \
         usually 5671)"
    } else if text.contains("UnknownIssuer") || text.contains("unknown issuer") {
        " (the server's certificate is not signed by a trusted CA: give the broker's CA with \
         cacertfile=...)"
    } else if text.contains("NotValidForName") || text.contains("not valid for name") {
        " (the server's certificate does not carry this host name: connect by a name it \
         carries, or set server_name_indication=<name>)"
    } else if text.contains("Expired") || text.contains("expired") {
        " (the server's certificate has expired, or this machine's clock is wrong)"
    } else if text.contains("CertificateRequired") || text.contains("certificate required") {
        " (the broker asks for a client certificate: set certfile=... and keyfile=...)"
    } else {
        ""
    };
    format!("TLS handshake with {host}:{port} failed: {text}{hint}")
}

/// `verify=verify_none`: accepts any certificate (signatures are still checked, so the
/// handshake is with the key the certificate names, whoever holds it).
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn missing_or_junk_files_are_errors_that_name_the_file() {
        let dir = std::env::temp_dir().join(format!("tls-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, b"not a certificate").unwrap();
        for params in [
            TlsParams {
                ca_file: Some(dir.join("missing.pem")),
                server_name: "h".into(),
                ..TlsParams::default()
            },
            TlsParams {
                ca_file: Some(junk.clone()),
                server_name: "h".into(),
                ..TlsParams::default()
            },
        ] {
            let error = TlsClient::new(&params).err().unwrap_or_default();
            assert!(error.contains(&dir.display().to_string()), "{error}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn verify_none_needs_no_roots() {
        let params = TlsParams {
            verify_none: true,
            server_name: "10.1.2.3".into(),
            ..TlsParams::default()
        };
        assert!(TlsClient::new(&params).is_ok());
    }

    #[test]
    fn handshake_errors_say_what_to_change() {
        let e = std::io::Error::other("invalid peer certificate: UnknownIssuer");
        assert!(handshake_error(&e, "h", 5671).contains("cacertfile"));
        let e = std::io::Error::other("received corrupt message of type InvalidContentType");
        assert!(handshake_error(&e, "h", 5672).contains("plaintext port"));
    }
}
