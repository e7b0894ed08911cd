//! The byte stream under every Redis connection of a node: plain TCP for
//! `redis://`, TLS (rustls) for `rediss://`, one closed set so that the
//! pub/sub links, the publish connection, the command connections and the
//! Sentinel connections read and write the same way whatever the URL.
//!
//! TLS is rustls with the `ring` provider, configured once per URL from
//! `WSGATE_REDIS_CA_FILE` (required: the node trusts only what the operator
//! names) and optionally `WSGATE_REDIS_CERT_FILE` + `WSGATE_REDIS_KEY_FILE`
//! (a client certificate, for `tls-auth-clients yes`). A file that is missing
//! or holds no usable PEM makes the node refuse to start; a certificate
//! that does not verify fails each connect with an error naming the CA
//! file (see docs/redis.md).

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

/// One connection's byte stream.
pub(crate) enum Stream {
    /// `redis://`.
    Tcp(TcpStream),
    /// `rediss://` (boxed: the TLS state is large, the enum stays small).
    Tls(Box<TlsStream<TcpStream>>),
}

/// The reading half of a [`Stream`].
pub(crate) type ReadHalf = tokio::io::ReadHalf<Stream>;
/// The writing half of a [`Stream`]. Writers flush after each write: TLS
/// may keep an encrypted record buffered otherwise.
pub(crate) type WriteHalf = tokio::io::WriteHalf<Stream>;

impl Stream {
    /// Opens TCP to `host:port` (no Nagle: commands are small and latency
    /// matters), then TLS over it when `tls` is set, verifying the server's
    /// certificate for `host`.
    pub(crate) async fn connect(
        host: &str,
        port: u16,
        tls: Option<&Tls>,
    ) -> Result<Stream, String> {
        let tcp = TcpStream::connect((host, port))
            .await
            .map_err(|e| format!("{host}:{port}: {e}"))?;
        tcp.set_nodelay(true).map_err(|e| e.to_string())?;
        let Some(tls) = tls else {
            return Ok(Stream::Tcp(tcp));
        };
        let name = ServerName::try_from(host.to_owned())
            .map_err(|e| format!("{host} is not a valid TLS server name: {e}"))?;
        match TlsConnector::from(tls.config.clone())
            .connect(name, tcp)
            .await
        {
            Ok(stream) => Ok(Stream::Tls(Box::new(stream))),
            Err(e) => Err(format!(
                "TLS handshake with {host}:{port} failed: {e} (does {} hold the CA that signed \
                 this server's certificate, and does the certificate name {host}?)",
                tls.ca_file.display()
            )),
        }
    }

    /// Splits into halves the connection's reader and writer own.
    pub(crate) fn split(self) -> (ReadHalf, WriteHalf) {
        tokio::io::split(self)
    }
}

/// A `rediss://` URL's TLS settings, loaded once.
#[derive(Clone)]
pub(crate) struct Tls {
    config: Arc<ClientConfig>,
    /// `WSGATE_REDIS_CA_FILE`, named in handshake errors.
    ca_file: PathBuf,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("ca_file", &self.ca_file)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// Loads the CA bundle and, when both are given, the client certificate
    /// chain and key. Every failure names the variable and the file.
    pub(crate) fn load(
        ca_file: Option<&Path>,
        cert_file: Option<&Path>,
        key_file: Option<&Path>,
    ) -> Result<Tls, String> {
        let ca_file = ca_file.ok_or(
            "rediss:// needs WSGATE_REDIS_CA_FILE: the PEM file of the CA that signed Redis's \
             certificate (a system bundle such as /etc/ssl/certs/ca-certificates.crt for a public CA)",
        )?;
        let mut roots = RootCertStore::empty();
        for cert in certs(ca_file, "WSGATE_REDIS_CA_FILE")? {
            roots
                .add(cert)
                .map_err(|e| format!("WSGATE_REDIS_CA_FILE {}: {e}", ca_file.display()))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots);
        let config = match (cert_file, key_file) {
            (None, None) => builder.with_no_client_auth(),
            (Some(cert), Some(key)) => {
                let chain = certs(cert, "WSGATE_REDIS_CERT_FILE")?;
                let key = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| format!("WSGATE_REDIS_KEY_FILE {}: {e}", key.display()))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| format!("WSGATE_REDIS_CERT_FILE/WSGATE_REDIS_KEY_FILE: {e}"))?
            }
            _ => {
                return Err(
                    "WSGATE_REDIS_CERT_FILE and WSGATE_REDIS_KEY_FILE go together".to_owned(),
                )
            }
        };
        Ok(Tls {
            config: Arc::new(config),
            ca_file: ca_file.to_owned(),
        })
    }
}

/// Every certificate in the PEM file `path` (at least one), for `var`.
fn certs(path: &Path, var: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{var} {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{var} {}: no certificate in it", path.display()));
    }
    Ok(certs)
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
