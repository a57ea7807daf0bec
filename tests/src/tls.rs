//! TLS certificates for the NBD tests, made with openssl at test time.

use std::path::Path;
use std::process::Command;

use anyhow::Result;

use crate::files::run;
use crate::{Backend, StorageDaemon};

/// A CA, a server certificate for localhost and 127.0.0.1 and a client
/// certificate, made with openssl in QEMU's `tls-creds-x509` layout;
/// `anon` gets the CA certificate alone (a client without a certificate).
pub fn make_certs(dir: &Path, anon: &Path) -> Result<()> {
    let openssl = |args: &[&str]| run(Command::new("openssl").args(args).current_dir(dir));
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509", "-days", "3650"][..],
            &ec,
            &[
                "-keyout",
                "ca-key.pem",
                "-out",
                "ca-cert.pem",
                "-subj",
                "/CN=blkvm test CA",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        ]
        .concat(),
    )?;
    for (who, ext) in [
        (
            "server",
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        ),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ] {
        let key = format!("{who}-key.pem");
        let subj = format!("/CN=blkvm test {who}");
        openssl(
            &[
                &["req"][..],
                &ec,
                &["-keyout", &key, "-out", "req.csr", "-subj", &subj],
            ]
            .concat(),
        )?;
        std::fs::write(
            dir.join("ext.cnf"),
            format!("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n{ext}"),
        )?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            "req.csr",
            "-CA",
            "ca-cert.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-days",
            "3650",
            "-extfile",
            "ext.cnf",
            "-out",
            &format!("{who}-cert.pem"),
        ])?;
    }
    std::fs::create_dir_all(anon)?;
    std::fs::copy(dir.join("ca-cert.pem"), anon.join("ca-cert.pem"))?;
    Ok(())
}

/// `blkvm storage-daemon` serving `img` (writable, export `disk`) on an
/// NBD server at `addr` (keyval `addr.*`) that requires TLS with the
/// server credentials in `pki`.
pub fn tls_daemon(img: &Path, pki: &Path, addr: &str) -> Result<StorageDaemon> {
    StorageDaemon::start_with_args(
        Backend::Blkvm,
        [
            "--object".to_string(),
            format!(
                "tls-creds-x509,id=tls0,dir={},endpoint=server",
                pki.display()
            ),
            "--blockdev".into(),
            format!("file,node-name=f0,filename={}", img.display()),
            "--nbd-server".into(),
            format!("{addr},tls-creds=tls0"),
            "--export".into(),
            "type=nbd,id=e0,node-name=f0,name=disk,writable=on".into(),
        ],
    )
}
