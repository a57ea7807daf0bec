//! TLS certificates for the NBD tests, made with openssl at test time.

use std::path::Path;
use std::process::Command;

use anyhow::{ensure, Context, Result};

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

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
