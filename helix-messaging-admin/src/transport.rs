//! Serving the API on a listener of its own: HTTP/1.1 on hyper with a header-read timeout,
//! a cap on open connections, optional TLS (rustls), and a graceful shutdown. The request
//! timeout and the concurrency limit are layers of the router itself, so they hold when the
//! router is mounted in an application's own server too.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::{
    ADDR_VAR, ALLOW_PLAINTEXT_VAR, AdminConfig, AdminError, TLS_CERT_VAR, TLS_KEY_VAR, TlsFiles,
};
use crate::router::router;
use crate::services::Services;

/// How long requests under way get to finish once shutdown is asked for.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Refuse to serve plain HTTP beyond loopback unless [`AdminConfig::allow_plaintext`] says
/// so: the tokens would cross the network in the clear. [`serve`] and [`serve_listener`]
/// check it themselves; a program that binds its own listener calls it before binding, so
/// an unsafe address is never bound.
///
/// # Errors
/// [`AdminError::Config`] naming `MESSAGING_ADMIN_ADDR`, with a log line saying why.
pub fn check_exposure(config: &AdminConfig) -> Result<(), AdminError> {
    if config.addr.ip().is_loopback() || config.tls.is_some() {
        return Ok(());
    }
    if config.allow_plaintext {
        tracing::warn!(addr = %config.addr, "admin API: serving plain HTTP beyond loopback because {ALLOW_PLAINTEXT_VAR} is true; bearer tokens cross the network in the clear unless a proxy terminates TLS in front");
        return Ok(());
    }
    let reason = format!(
        "{} is not a loopback address and no TLS is configured: the bearer tokens would cross the network in the clear. Set {TLS_CERT_VAR} and {TLS_KEY_VAR}, or {ALLOW_PLAINTEXT_VAR}=true when a proxy terminates TLS in front",
        config.addr
    );
    tracing::error!(addr = %config.addr, "admin API refuses to start: {reason}");
    Err(AdminError::Config {
        var: ADDR_VAR,
        reason,
    })
}

/// A TLS acceptor from the PEM files, each error naming the variable of the file at fault.
fn tls_acceptor(files: &TlsFiles) -> Result<TlsAcceptor, AdminError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|certs| certs.collect::<Result<_, _>>())
        .map_err(|err| AdminError::Config {
            var: TLS_CERT_VAR,
            reason: format!(
                "cannot read certificates from {}: {err}",
                files.cert.display()
            ),
        })?;
    if certs.is_empty() {
        return Err(AdminError::Config {
            var: TLS_CERT_VAR,
            reason: format!("{} holds no PEM certificate", files.cert.display()),
        });
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|err| AdminError::Config {
        var: TLS_KEY_VAR,
        reason: format!(
            "cannot read a private key from {}: {err}",
            files.key.display()
        ),
    })?;
    // ring rather than aws-lc-rs: no cmake or assembler in the build. rustls deprecates it
    // for lacking post-quantum key exchange, which an operators' API on a private network
    // can do without.
    #[allow(deprecated)]
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|builder| builder.with_no_client_auth().with_single_cert(certs, key))
        .map_err(|err| AdminError::Config {
            var: TLS_KEY_VAR,
            reason: format!("the certificate and key do not make a TLS configuration: {err}"),
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Serve [`router`](crate::router::router) on `config.addr` until `shutdown` completes,
/// then give the requests under way [`SHUTDOWN_GRACE`] to finish.
///
/// HTTP/1.1, or HTTPS when [`AdminConfig::tls`] is set. A client must send its request
/// headers within [`AdminConfig::header_read_timeout`] of connecting (and of its previous
/// answer, on a kept-alive connection) or is disconnected; at most
/// [`AdminConfig::max_connections`] are open at once, a TLS handshake included.
///
/// # Errors
/// [`AdminError::Config`] for an address beyond loopback without TLS (unless allowed) or
/// unreadable TLS files, [`AdminError::Bind`] when the address cannot be listened on.
pub async fn serve(
    config: AdminConfig,
    services: Services,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AdminError> {
    // Refused before binding: the address is never exposed, not even for a moment.
    check_exposure(&config)?;
    let tls = config.tls.as_ref().map(tls_acceptor).transpose()?;
    let listener = TcpListener::bind(config.addr)
        .await
        .map_err(|source| AdminError::Bind {
            addr: config.addr,
            source,
        })?;
    run(listener, config, tls, services, shutdown).await
}

/// [`serve`] on a listener already bound (a port picked by the system, an inherited
/// socket); [`AdminConfig::addr`] is not used.
///
/// # Errors
/// As [`serve`], for the listener's own address.
pub async fn serve_listener(
    listener: TcpListener,
    mut config: AdminConfig,
    services: Services,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AdminError> {
    config.addr = listener.local_addr()?;
    check_exposure(&config)?;
    let tls = config.tls.as_ref().map(tls_acceptor).transpose()?;
    run(listener, config, tls, services, shutdown).await
}

/// Accept and serve connections on `listener` until `shutdown`.
async fn run(
    listener: TcpListener,
    config: AdminConfig,
    tls: Option<TlsAcceptor>,
    services: Services,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AdminError> {
    let app = router(&config, services);
    tracing::info!(addr = %config.addr, tls = tls.is_some(), "admin API listening");
    let graceful = GracefulShutdown::new();
    let connections = Arc::new(Semaphore::new(config.max_connections.max(1)));
    let mut shutdown = std::pin::pin!(shutdown);
    // Kept so the ones still open after the grace period can be ended.
    let mut served = tokio::task::JoinSet::new();
    loop {
        // Reap the ended, so the set holds only live connections.
        while served.try_join_next().is_some() {}
        let permit = tokio::select! {
            () = &mut shutdown => break,
            permit = connections.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors, say: wait rather than spin; the connections
                    // open now will close.
                    tracing::warn!(error = %err, "admin API: cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let connection = Connection {
            app: app.clone(),
            peer,
            header_read_timeout: config.header_read_timeout,
        };
        let watcher = graceful.watcher();
        let tls = tls.clone();
        served.spawn(async move {
            let _permit = permit;
            match tls {
                None => connection.serve(stream, watcher).await,
                Some(tls) => {
                    let handshake =
                        tokio::time::timeout(connection.header_read_timeout, tls.accept(stream));
                    match handshake.await {
                        Ok(Ok(stream)) => connection.serve(stream, watcher).await,
                        Ok(Err(err)) => {
                            tracing::debug!(peer = %peer, error = %err, "admin API: TLS handshake failed");
                        }
                        Err(_) => {
                            tracing::debug!(peer = %peer, "admin API: TLS handshake timed out");
                        }
                    }
                }
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("admin API: requests still under way after {SHUTDOWN_GRACE:?}; ending them");
    }
    served.shutdown().await;
    Ok(())
}

/// One accepted connection and what serving it needs.
struct Connection {
    app: Router,
    peer: SocketAddr,
    header_read_timeout: Duration,
}

impl Connection {
    async fn serve<S>(self, stream: S, watcher: hyper_util::server::graceful::Watcher)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let Connection {
            app,
            peer,
            header_read_timeout,
        } = self;
        let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            // The client's address, for the audit trail and the authentication log.
            request.extensions_mut().insert(ConnectInfo(peer));
            tower::ServiceExt::oneshot(app.clone(), request.map(Body::new))
        });
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(header_read_timeout)
            .serve_connection(TokioIo::new(stream), service);
        if let Err(err) = watcher.watch(connection).await {
            tracing::debug!(peer = %peer, error = %err, "admin API: connection ended with an error");
        }
    }
}
