//! Test certificates for TLS tests, made with the `openssl` command line tool.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

fn openssl(dir: &Path, args: &[&str]) {
    let status = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("openssl on PATH: {e}"));
    assert!(status.success(), "openssl {args:?} failed");
}

/// Write a throw-away CA (`ca.pem`, `ca.key`) and a server certificate for `127.0.0.1` and
/// `localhost` signed by it (`server.pem`, `server.key`) into `dir`, valid for two days.
/// The directory and the files are made readable by every user, so a broker running as its
/// own user (RabbitMQ) can load them.
///
/// # Panics
/// If `openssl` is missing or fails, or `dir` cannot be written: a test that needs TLS
/// cannot go on without them.
pub fn test_certificates(dir: &Path) {
    std::fs::create_dir_all(dir).expect("certificate directory");
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod dir");
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=helix-test-ca",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
    );
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n",
    )
    .expect("san.ext");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            "server.pem",
        ],
    );
    for file in ["ca.pem", "server.pem", "server.key"] {
        std::fs::set_permissions(dir.join(file), std::fs::Permissions::from_mode(0o644))
            .expect("chmod certificate");
    }
}
