//! Credentials loading and [`TlsStream`] between a rustls client and
//! server over a non-blocking socket pair. Certificates are made with
//! `openssl` (resources/setup.sh installs it) in a temporary directory.

use std::os::unix::net::UnixStream;
use std::process::Command;

use super::*;

/// Runs one `openssl` command in `dir`.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is not installed (resources/setup.sh installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for localhost/127.0.0.1 and a client
/// certificate in QEMU's layout (server and client files in one dir).
pub(crate) fn make_certs(dir: &Path) {
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
    let mut ca = vec!["req", "-x509", "-nodes", "-days", "3650"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca-key.pem",
        "-out",
        CA_CERT,
        "-subj",
        "/CN=blkvm test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    openssl(dir, &ca);
    for (who, cert, key, ext) in [
        (
            "localhost",
            SERVER_CERT,
            SERVER_KEY,
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        ),
        (
            "blkvm client",
            CLIENT_CERT,
            CLIENT_KEY,
            "extendedKeyUsage=clientAuth\n",
        ),
    ] {
        let mut req = vec!["req", "-nodes"];
        req.extend(ec);
        let subj = format!("/CN={who}");
        req.extend(["-keyout", key, "-out", "req.csr", "-subj", &subj]);
        openssl(dir, &req);
        std::fs::write(
            dir.join("ext.cnf"),
            format!("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n{ext}"),
        )
        .unwrap();
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                "req.csr",
                "-CA",
                CA_CERT,
                "-CAkey",
                "ca-key.pem",
                "-CAcreateserial",
                "-days",
                "3650",
                "-extfile",
                "ext.cnf",
                "-out",
                cert,
            ],
        );
    }
}

type Server = TlsStream<ServerConnection, UnixStream>;
type Client = TlsStream<ClientConnection, UnixStream>;

fn pair(server: Arc<ServerConfig>, client: Arc<ClientConfig>, name: &str) -> (Server, Client) {
    let (a, b) = UnixStream::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    b.set_nonblocking(true).unwrap();
    let s = TlsStream::new(ServerConnection::new(server).unwrap(), a);
    let name = server_name(Some(name)).unwrap();
    let c = TlsStream::new(ClientConnection::new(client, name).unwrap(), b);
    (s, c)
}

fn pending(r: io::Result<()>) -> io::Result<bool> {
    match r {
        Ok(()) => Ok(false),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(true),
        Err(e) => Err(e),
    }
}

/// Both handshakes, taking turns on one thread.
fn handshake(s: &mut Server, c: &mut Client) -> io::Result<()> {
    for _ in 0..100 {
        let (ps, pc) = (pending(s.handshake())?, pending(c.handshake())?);
        if !ps && !pc {
            return Ok(());
        }
    }
    panic!("the handshakes did not finish");
}

/// Moves `data` from `w` to `r` in turns, as an event loop would.
fn transfer(
    w: &mut impl Write,
    w_flush: &mut dyn FnMut(&mut dyn Write) -> bool,
    r: &mut impl Read,
    data: &[u8],
) -> Vec<u8> {
    let (mut sent, mut got) = (0, Vec::new());
    let mut buf = vec![0u8; 10_000];
    while got.len() < data.len() {
        if sent < data.len() {
            match w.write(&data[sent..]) {
                Ok(n) => sent += n,
                Err(e) => assert_eq!(e.kind(), io::ErrorKind::WouldBlock),
            }
        }
        w_flush(w);
        match r.read(&mut buf) {
            Ok(0) => panic!("end of stream after {} bytes", got.len()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::WouldBlock),
        }
    }
    got
}

fn certs() -> (tempfile::TempDir, TlsCredsX509, TlsCredsX509) {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let server = TlsCredsX509 {
        dir: dir.path().into(),
        endpoint: TlsEndpoint::Server,
        verify_peer: true,
    };
    let client = TlsCredsX509 {
        endpoint: TlsEndpoint::Client,
        ..server.clone()
    };
    (dir, server, client)
}

#[test]
fn a_missing_file_is_named_in_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let e = server_config(dir.path(), true).unwrap_err();
    assert!(matches!(&e, NbdTlsError::Access(p, _) if p.ends_with(CA_CERT)));
    assert!(e.to_string().contains("ca-cert.pem"), "{e}");
    std::fs::write(dir.path().join(CA_CERT), "not PEM").unwrap();
    let e = server_config(dir.path(), true).unwrap_err();
    assert!(
        matches!(&e, NbdTlsError::NoCertificate(p) if p.ends_with(CA_CERT)),
        "{e}"
    );
}

#[test]
fn credentials_of_the_other_endpoint_are_refused() {
    let creds = TlsCredsX509 {
        dir: "/nonexistent".into(),
        endpoint: TlsEndpoint::Client,
        verify_peer: true,
    };
    let e = creds.server_config().unwrap_err();
    assert_eq!(
        e.to_string(),
        "Expecting TLS credentials with a server endpoint"
    );
}

#[test]
fn a_server_without_its_key_names_the_key_file() {
    let (dir, server, _) = certs();
    std::fs::remove_file(dir.path().join(SERVER_KEY)).unwrap();
    let e = server.check().unwrap_err();
    assert!(
        matches!(&e, NbdTlsError::Access(p, _) if p.ends_with(SERVER_KEY)),
        "{e}"
    );
}

#[test]
fn client_and_server_exchange_data_over_non_blocking_sockets() {
    let (_dir, server, client) = certs();
    let (mut s, mut c) = pair(
        server.server_config().unwrap(),
        client.client_config(true).unwrap(),
        "localhost",
    );
    handshake(&mut s, &mut c).unwrap();
    // More than the socket buffer and rustls' buffers hold at once.
    let data: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i * 7 + i / 4099) as u8)
        .collect();
    let mut flush = |w: &mut dyn Write| w.flush().is_ok();
    assert!(transfer(&mut c, &mut flush, &mut s, &data) == data);
    assert!(transfer(&mut s, &mut flush, &mut c, &data[..200_000]) == data[..200_000]);
    // A clean close is the end of the stream for the peer.
    c.close();
    let mut b = [0u8; 16];
    assert_eq!(s.read(&mut b).unwrap(), 0);
}

#[test]
fn plaintext_held_by_rustls_is_seen_without_the_socket() {
    let (_dir, server, client) = certs();
    let (mut s, mut c) = pair(
        server.server_config().unwrap(),
        client.client_config(true).unwrap(),
        "localhost",
    );
    handshake(&mut s, &mut c).unwrap();
    assert!(!s.has_buffered_input());
    c.write_all(&[0x5a; 12_000]).unwrap();
    c.flush_tls().unwrap();
    // A reader that stops early: 100 bytes, though all 12,000 left the
    // socket in the one read ahead.
    let mut b = vec![0u8; 100];
    assert_eq!(s.read(&mut b).unwrap(), 100);
    let mut peek = [0u8; 1];
    // SAFETY: recv(2) with MSG_PEEK writes at most one byte into `peek`,
    // which lives across the call; the fd is the stream's open socket.
    let peeked = unsafe {
        libc::recv(
            std::os::fd::AsRawFd::as_raw_fd(s.get_ref()),
            peek.as_mut_ptr().cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    assert_eq!(peeked, -1, "the socket still holds data");
    assert!(s.has_buffered_input(), "buffered plaintext went unseen");
    let mut rest = vec![0u8; 20_000];
    assert_eq!(s.read(&mut rest).unwrap(), 11_900);
    assert!(!s.has_buffered_input());
    assert_eq!(
        s.read(&mut rest).unwrap_err().kind(),
        io::ErrorKind::WouldBlock
    );
}

#[test]
fn a_server_that_verifies_peers_refuses_a_client_without_a_certificate() {
    let (dir, server, client) = certs();
    let anon = tempfile::tempdir().unwrap();
    std::fs::copy(dir.path().join(CA_CERT), anon.path().join(CA_CERT)).unwrap();
    let anon_client = TlsCredsX509 {
        dir: anon.path().into(),
        ..client.clone()
    };
    let (mut s, mut c) = pair(
        server.server_config().unwrap(),
        anon_client.client_config(true).unwrap(),
        "localhost",
    );
    assert!(handshake(&mut s, &mut c).is_err());
    // Without verify-peer the same client is served.
    let lax = TlsCredsX509 {
        verify_peer: false,
        ..server
    };
    let (mut s, mut c) = pair(
        lax.server_config().unwrap(),
        anon_client.client_config(true).unwrap(),
        "localhost",
    );
    handshake(&mut s, &mut c).unwrap();
}

#[test]
fn the_server_name_is_checked_only_when_asked() {
    let (_dir, server, client) = certs();
    let (mut s, mut c) = pair(
        server.server_config().unwrap(),
        client.client_config(true).unwrap(),
        "elsewhere.example",
    );
    let e = handshake(&mut s, &mut c).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    let (mut s, mut c) = pair(
        server.server_config().unwrap(),
        client.client_config(false).unwrap(),
        "elsewhere.example",
    );
    handshake(&mut s, &mut c).unwrap();
}

#[test]
fn garbage_instead_of_a_client_hello_fails_the_handshake() {
    let (_dir, server, _) = certs();
    let (a, mut b) = UnixStream::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    let mut s = TlsStream::new(
        ServerConnection::new(server.server_config().unwrap()).unwrap(),
        a,
    );
    b.write_all(b"IHAVEOPT garbage, not TLS\r\n").unwrap();
    let e = s.handshake().unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidData);
}
