//! TLS for NBD (`NBD_OPT_STARTTLS`), shared by the server and the client
//! driver: credentials laid out as QEMU's `tls-creds-x509` object reads
//! them, turned into rustls configurations, and [`TlsStream`], a
//! non-blocking byte stream over a rustls connection and a socket for an
//! event loop.
//!
//! A `tls-creds-x509` directory holds `ca-cert.pem` (always required, as
//! QEMU requires it), `server-cert.pem` and `server-key.pem` for
//! `endpoint=server`, and optionally `client-cert.pem` and
//! `client-key.pem` for `endpoint=client`. `verify-peer` defaults to on,
//! as QEMU's: a server then requires a client certificate signed by the
//! CA, a client checks the server's chain (and its name, when it has
//! one: QEMU checks no name over a unix socket without `tls-hostname`).
//!
//! rustls with the `ring` provider: a well-kept TLS crate (DESIGN.md),
//! pure Rust but for ring's assembly, no C library to load. TLS 1.2 and
//! 1.3, as the NBD protocol's "MUST support TLS 1.2, SHOULD support later
//! versions".
//!
//! The event loop's trap, and why [`TlsStream`] has
//! [`TlsStream::has_buffered_input`]: a plain socket keeps unread bytes in
//! the kernel, so a level-triggered `EPOLLIN` fires again once the reader
//! wants more. Over TLS, bytes already taken off the socket (ciphertext
//! read ahead, or plaintext rustls decrypted) are invisible to epoll: a
//! reader that stopped early (a full buffer, a backlog limit) must ask the
//! stream, not the socket, whether there is more. Likewise on the way out:
//! rustls may hold encrypted bytes the socket did not take, so a writer
//! watches `EPOLLOUT` while [`TlsStream::wants_write`].

use std::fmt;
use std::io::{self, Read, Write};
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, ConnectionCommon, DigitallySignedStruct, RootCertStore, SideData,
    SignatureScheme,
};
/// The rustls types a caller needs, so it does not depend on rustls.
pub use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection};

/// The CA certificate, in every `tls-creds-x509` directory.
pub const CA_CERT: &str = "ca-cert.pem";
/// The server's certificate (chain), `endpoint=server`.
pub const SERVER_CERT: &str = "server-cert.pem";
/// The server's private key, `endpoint=server`.
pub const SERVER_KEY: &str = "server-key.pem";
/// The client's certificate (chain), `endpoint=client`, optional.
pub const CLIENT_CERT: &str = "client-cert.pem";
/// The client's private key, `endpoint=client`, optional with the cert.
pub const CLIENT_KEY: &str = "client-key.pem";

/// Why TLS credentials cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum NbdTlsError {
    /// A credentials file is missing or unreadable.
    #[error("Unable to access credentials {}", .0.display())]
    Access(PathBuf, #[source] io::Error),
    /// A credentials file is not PEM of the expected kind.
    #[error("Unable to parse credentials {}", .0.display())]
    Parse(PathBuf, #[source] pem::Error),
    /// A certificate file holds no certificate.
    #[error("No certificate in {}", .0.display())]
    NoCertificate(PathBuf),
    /// rustls refused what was read (a key that does not match its
    /// certificate, a CA certificate it cannot use).
    #[error("Unable to load credentials {}", .0.display())]
    Rejected(PathBuf, #[source] rustls::Error),
    /// The peer verifier could not be built from the CA certificate.
    #[error("Unable to verify peers with {}", .0.display())]
    Verifier(PathBuf, #[source] rustls::client::VerifierBuilderError),
    /// Credentials of the other endpoint were given.
    #[error("Expecting TLS credentials with a {0} endpoint")]
    WrongEndpoint(TlsEndpoint),
    /// A host name rustls cannot check a certificate against.
    #[error("Invalid TLS server name '{0}'")]
    ServerName(String),
    /// The protocol versions of the provider.
    #[error("Unable to set up TLS")]
    Config(#[source] rustls::Error),
}

/// Which side of a connection credentials are for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TlsEndpoint {
    /// The side that connects (QEMU's default).
    #[default]
    Client,
    /// The side that listens.
    Server,
}

impl fmt::Display for TlsEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsEndpoint::Client => "client",
            TlsEndpoint::Server => "server",
        })
    }
}

/// A `tls-creds-x509` object: where its files are and how it is used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsCredsX509 {
    /// The directory of the PEM files.
    pub dir: PathBuf,
    /// The side the credentials are for.
    pub endpoint: TlsEndpoint,
    /// Check the peer's certificate (QEMU's default: on).
    pub verify_peer: bool,
}

impl TlsCredsX509 {
    /// Loads every file the endpoint needs, as QEMU does when the object
    /// is created: a bad directory fails here, naming the file.
    pub fn check(&self) -> Result<(), NbdTlsError> {
        match self.endpoint {
            TlsEndpoint::Server => self.server_config().map(drop),
            TlsEndpoint::Client => self.client_config(true).map(drop),
        }
    }

    /// The server configuration (`endpoint=server` only).
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, NbdTlsError> {
        if self.endpoint != TlsEndpoint::Server {
            return Err(NbdTlsError::WrongEndpoint(TlsEndpoint::Server));
        }
        server_config(&self.dir, self.verify_peer)
    }

    /// The client configuration (`endpoint=client` only); see
    /// [`client_config`] for `check_hostname`.
    pub fn client_config(&self, check_hostname: bool) -> Result<Arc<ClientConfig>, NbdTlsError> {
        if self.endpoint != TlsEndpoint::Client {
            return Err(NbdTlsError::WrongEndpoint(TlsEndpoint::Client));
        }
        client_config(&self.dir, self.verify_peer, check_hostname)
    }
}

/// rustls' `ring` provider. rustls 0.23.48 deprecates it for lacking
/// post-quantum key exchange (only aws-lc-rs has that); it stays the
/// choice here as it needs no C toolchain or CMake at build time, and
/// classical X25519/P-256 key exchange is what QEMU's GnuTLS and libnbd
/// offer NBD peers today anyway.
#[allow(deprecated)]
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_file(path: &Path) -> Result<Vec<u8>, NbdTlsError> {
    std::fs::read(path).map_err(|e| NbdTlsError::Access(path.to_path_buf(), e))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, NbdTlsError> {
    let data = read_file(path)?;
    let certs = CertificateDer::pem_slice_iter(&data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| NbdTlsError::Parse(path.to_path_buf(), e))?;
    if certs.is_empty() {
        return Err(NbdTlsError::NoCertificate(path.to_path_buf()));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, NbdTlsError> {
    let data = read_file(path)?;
    PrivateKeyDer::from_pem_slice(&data).map_err(|e| NbdTlsError::Parse(path.to_path_buf(), e))
}

fn roots(dir: &Path) -> Result<Arc<RootCertStore>, NbdTlsError> {
    let path = dir.join(CA_CERT);
    let mut roots = RootCertStore::empty();
    for cert in read_certs(&path)? {
        roots
            .add(cert)
            .map_err(|e| NbdTlsError::Rejected(path.clone(), e))?;
    }
    Ok(Arc::new(roots))
}

/// A server configuration from a `tls-creds-x509` directory: the server's
/// certificate and key; with `verify_peer`, a client certificate signed
/// by `ca-cert.pem` is required (QEMU's `GNUTLS_CERT_REQUIRE`).
pub fn server_config(dir: &Path, verify_peer: bool) -> Result<Arc<ServerConfig>, NbdTlsError> {
    let provider = provider();
    let roots = roots(dir)?;
    let certs = read_certs(&dir.join(SERVER_CERT))?;
    let key_path = dir.join(SERVER_KEY);
    let key = read_key(&key_path)?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(NbdTlsError::Config)?;
    let builder = if verify_peer {
        let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider)
            .build()
            .map_err(|e| NbdTlsError::Verifier(dir.join(CA_CERT), e))?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let config = builder
        .with_single_cert(certs, key)
        .map_err(|e| NbdTlsError::Rejected(key_path, e))?;
    Ok(Arc::new(config))
}

/// A client configuration from a `tls-creds-x509` directory. With
/// `verify_peer` the server's chain must lead to `ca-cert.pem`, and with
/// `check_hostname` its certificate must name the host the connection
/// gives (see [`server_name`]); QEMU's client checks no name over a unix
/// socket without `tls-hostname`. `client-cert.pem` and `client-key.pem`
/// are sent when present (both or neither).
pub fn client_config(
    dir: &Path,
    verify_peer: bool,
    check_hostname: bool,
) -> Result<Arc<ClientConfig>, NbdTlsError> {
    let provider = provider();
    let roots = roots(dir)?;
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(NbdTlsError::Config)?;
    let builder = if verify_peer {
        let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(|e| NbdTlsError::Verifier(dir.join(CA_CERT), e))?;
        if check_hostname {
            builder.with_webpki_verifier(webpki)
        } else {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(ChainOnly(webpki)))
        }
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
    };
    let (cert, key) = (dir.join(CLIENT_CERT), dir.join(CLIENT_KEY));
    let config = match (cert.exists(), key.exists()) {
        (false, false) => builder.with_no_client_auth(),
        _ => {
            let certs = read_certs(&cert)?;
            let k = read_key(&key)?;
            builder
                .with_client_auth_cert(certs, k)
                .map_err(|e| NbdTlsError::Rejected(key, e))?
        }
    };
    Ok(Arc::new(config))
}

/// The name a client connection checks the server's certificate against:
/// the host it connects to (a DNS name or an IP address), or with none (a
/// unix socket) a placeholder, for a configuration made with
/// `check_hostname: false`.
pub fn server_name(host: Option<&str>) -> Result<ServerName<'static>, NbdTlsError> {
    let host = host.unwrap_or("localhost");
    ServerName::try_from(host.to_string()).map_err(|_| NbdTlsError::ServerName(host.into()))
}

/// Verifies the server's chain and signatures, not its name.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // webpki checks the name last, after the chain: a name error
        // means the chain was good.
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            r => r,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `verify-peer=off`: any certificate, but the handshake's signatures
/// are still checked against it (the session is encrypted, not
/// authenticated).
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
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
        verify_tls12_signature(
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
        verify_tls13_signature(
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

/// Ciphertext read from the socket ahead of rustls, which asks for 4 KiB
/// per `read_tls`: one read system call per 64 KiB instead of sixteen.
struct ReadAhead {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

/// Bytes of ciphertext read from the socket at once.
const READ_AHEAD: usize = 64 << 10;

/// What `read_tls` reads: the read-ahead buffer, refilled from the
/// socket only when empty.
struct Feed<'a, S> {
    ahead: &'a mut ReadAhead,
    sock: &'a mut S,
}

impl<S: Read> Read for Feed<'_, S> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let a = &mut *self.ahead;
        if a.start == a.end {
            let n = self.sock.read(&mut a.buf)?;
            (a.start, a.end) = (0, n);
        }
        let n = out.len().min(a.end - a.start);
        out[..n].copy_from_slice(&a.buf[a.start..a.start + n]);
        a.start += n;
        Ok(n)
    }
}

/// A rustls connection (client or server) over a socket, as a byte stream
/// for an event loop: `Read` and `Write` return `WouldBlock` when the
/// socket does, never `Ok(0)` for a write, and `Ok(0)` from `read` only
/// at the end of the stream. Works over blocking sockets too.
///
/// A reader must not rely on the socket's readiness alone: see
/// [`TlsStream::has_buffered_input`]; a writer must keep `EPOLLOUT` while
/// [`TlsStream::wants_write`] and call [`TlsStream::flush_tls`] on it.
pub struct TlsStream<C, S> {
    conn: C,
    sock: S,
    ahead: ReadAhead,
}

impl<C, D, S> TlsStream<C, S>
where
    C: DerefMut + Deref<Target = ConnectionCommon<D>>,
    D: SideData,
    S: Read + Write,
{
    /// Wraps a connection (handshaking or done) and its socket. Whatever
    /// the connection already holds (records read during a blocking
    /// negotiation before) is served first.
    pub fn new(conn: C, sock: S) -> Self {
        TlsStream {
            conn,
            sock,
            ahead: ReadAhead {
                buf: vec![0u8; READ_AHEAD].into_boxed_slice(),
                start: 0,
                end: 0,
            },
        }
    }

    /// The socket.
    pub fn get_ref(&self) -> &S {
        &self.sock
    }

    /// The socket, mutably (reading or writing it directly breaks the
    /// stream).
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.sock
    }

    /// The TLS connection (peer certificates, protocol version).
    pub fn conn(&self) -> &C {
        &self.conn
    }

    /// Runs the TLS handshake: to completion on a blocking socket; on a
    /// non-blocking one until the socket would block (`WouldBlock`: call
    /// again when it is ready). A refused handshake is `InvalidData`.
    pub fn handshake(&mut self) -> io::Result<()> {
        loop {
            self.flush_tls()?;
            if !self.conn.is_handshaking() {
                return Ok(());
            }
            if self.read_tls()? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the connection during the TLS handshake",
                ));
            }
            self.process()?;
        }
    }

    /// Whether a read would return something (bytes, the end of the
    /// stream, an error) without the socket being readable: ciphertext
    /// read ahead, or plaintext rustls has decrypted. An event loop that
    /// stopped reading before `WouldBlock` must look here.
    pub fn has_buffered_input(&mut self) -> bool {
        if self.ahead.start < self.ahead.end {
            return true;
        }
        match self.conn.process_new_packets() {
            Ok(st) => st.plaintext_bytes_to_read() > 0 || st.peer_has_closed(),
            Err(_) => true,
        }
    }

    /// Whether rustls holds encrypted bytes the socket has not taken.
    pub fn wants_write(&self) -> bool {
        self.conn.wants_write()
    }

    /// Writes what rustls holds to the socket: `Ok` once all of it went,
    /// `WouldBlock` when the socket is full.
    pub fn flush_tls(&mut self) -> io::Result<()> {
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut self.sock) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Ends the session cleanly: a `close_notify`, written if the socket
    /// takes it now.
    pub fn close(&mut self) {
        self.conn.send_close_notify();
        let _ = self.flush_tls();
    }

    fn read_tls(&mut self) -> io::Result<usize> {
        loop {
            let mut feed = Feed {
                ahead: &mut self.ahead,
                sock: &mut self.sock,
            };
            match self.conn.read_tls(&mut feed) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => return r,
            }
        }
    }

    fn process(&mut self) -> io::Result<()> {
        if let Err(e) = self.conn.process_new_packets() {
            // rustls queued an alert for the peer: tell it why.
            let _ = self.flush_tls();
            return Err(io::Error::new(io::ErrorKind::InvalidData, e));
        }
        Ok(())
    }
}

impl<C, D, S> Read for TlsStream<C, S>
where
    C: DerefMut + Deref<Target = ConnectionCommon<D>>,
    D: SideData,
    S: Read + Write,
{
    /// Fills `buf` from decrypted records, reading the socket only when
    /// rustls holds no plaintext; returns short only when the socket has
    /// nothing more (or the stream ended).
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut n = 0;
        loop {
            match self.conn.reader().read(&mut buf[n..]) {
                // close_notify: the end of the stream.
                Ok(0) => return Ok(n),
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The socket ended without close_notify: the end too.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(n),
                // Reported at the next read.
                Err(_) if n > 0 => return Ok(n),
                Err(e) => return Err(e),
            }
            if n == buf.len() {
                return Ok(n);
            }
            // No plaintext left: more records from the socket.
            match self.read_tls() {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && n > 0 => return Ok(n),
                Err(e) => return Err(e),
            }
            if let Err(e) = self.process() {
                return if n > 0 { Ok(n) } else { Err(e) };
            }
        }
    }
}

impl<C, D, S> Write for TlsStream<C, S>
where
    C: DerefMut + Deref<Target = ConnectionCommon<D>>,
    D: SideData,
    S: Read + Write,
{
    /// Encrypts what rustls' buffer takes and pushes it to the socket;
    /// `WouldBlock` when neither has room.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        match self.flush_tls() {
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => return Err(e),
            _ => {}
        }
        let n = self.conn.writer().write(buf)?;
        match self.flush_tls() {
            // What rustls took is written: a later write or flush sees
            // the error.
            Err(e) if e.kind() != io::ErrorKind::WouldBlock && n == 0 => return Err(e),
            _ => {}
        }
        if n == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.flush_tls()
    }
}

#[cfg(test)]
pub(crate) mod tests;
