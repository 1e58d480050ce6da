//! Test certificates for TLS tests, made in the process with `rcgen`: nothing is committed,
//! nothing outside Rust is needed.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// Write a throw-away CA (`ca.pem`), a server certificate for `127.0.0.1` and `localhost`
/// signed by it (`server.pem`, `server.key`), and a client certificate for mutual TLS signed
/// by it too (`client.pem`, `client.key`, common name `helix-test-client`) into `dir`. Keys
/// are ECDSA P-256 in PKCS#8 PEM. The directory and the files are made readable by every
/// user, so a broker running as its own user (RabbitMQ) can load them.
///
/// # Panics
/// If `dir` cannot be written or a certificate cannot be made: a test that needs TLS cannot
/// go on without them.
pub fn test_certificates(dir: &Path) {
    std::fs::create_dir_all(dir).expect("certificate directory");
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod dir");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "helix-test-ca");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().expect("CA key"))
        .expect("CA certificate");
    write(dir, "ca.pem", &ca.pem());

    for (name, names, purposes, common_name) in [
        // A broker that talks to itself over its TLS listener (Kafka's inter-broker
        // listener) presents its own certificate as a client too.
        (
            "server",
            vec!["127.0.0.1".to_owned(), "localhost".to_owned()],
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            "localhost",
        ),
        (
            "client",
            Vec::new(),
            vec![ExtendedKeyUsagePurpose::ClientAuth],
            "helix-test-client",
        ),
    ] {
        let mut params = CertificateParams::new(names).expect("certificate parameters");
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = purposes;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &*ca).expect("certificate");
        write(dir, &format!("{name}.pem"), &cert.pem());
        write(dir, &format!("{name}.key"), &key.serialize_pem());
    }
}

fn write(dir: &Path, file: &str, content: &str) {
    let path = dir.join(file);
    std::fs::write(&path, content).expect("write certificate");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))
        .expect("chmod certificate");
}
