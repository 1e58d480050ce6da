//! The supervised connection: one AMQP connection with its publishing channel, replaced by a
//! single supervisor task (exponential backoff with `backon`) whenever it is lost.
//!
//! lapin's own recovery is not used: it can give up silently when it reconnects while a
//! restarting broker has not opened the vhost yet, leaving consumers waiting forever. Here
//! every user of the connection notices its loss, asks for a new one, and rebuilds what it
//! needs (the publisher its channel, each subscription its queue, binding and consumer).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use helix_messaging_core::observe::connection::{
    ConnectionState, count_connection, count_connection_failure,
};
use helix_messaging_core::{Error, ErrorKind, Result, within};
use lapin::options::ConfirmSelectOptions;
use lapin::{Channel, Connection, ConnectionProperties};
use tokio::sync::watch;

use crate::config::{NAME, RabbitConfig};
use crate::error::from_lapin;
use crate::topology::Topology;

/// A live connection and its publishing channel.
pub(crate) struct Link {
    pub(crate) connection: Connection,
    /// In confirm mode when [`RabbitConfig::publisher_confirm`] is set. Replaced on its own
    /// when the server closes it (a publish to a missing exchange, say): the connection and
    /// every consumer on it stay as they are.
    publisher: std::sync::RwLock<Channel>,
    /// Held while a closed publishing channel is being replaced, so only one replacement is
    /// opened.
    reopening: tokio::sync::Mutex<()>,
    publisher_confirm: bool,
    /// Which node of [`RabbitConfig::node_uris`] it is connected to: a reconnect tries that
    /// one first.
    pub(crate) node: usize,
}

impl Link {
    /// Whether the connection is up. A closed publishing channel does not make the link
    /// unusable: [`Link::publisher`] opens a new one.
    pub(crate) fn usable(&self) -> bool {
        self.connection.status().connected()
    }

    fn current_publisher(&self) -> Channel {
        self.publisher
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The publishing channel, reopened first if the server closed it.
    pub(crate) async fn publisher(&self) -> Result<Channel> {
        let channel = self.current_publisher();
        if channel.status().connected() {
            return Ok(channel);
        }
        // Boxed: inline, opening a channel would make every publish's future (moved a few
        // times per publish) as large as its own.
        Box::pin(self.reopen_publisher()).await
    }

    /// [`Link::publisher`] once the channel was seen closed.
    async fn reopen_publisher(&self) -> Result<Channel> {
        let _reopening = self.reopening.lock().await;
        let channel = self.current_publisher();
        if channel.status().connected() {
            return Ok(channel);
        }
        tracing::info!("publishing channel closed by the server; opening a new one");
        let channel = open_publisher(&self.connection, self.publisher_confirm).await?;
        *self
            .publisher
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = channel.clone();
        Ok(channel)
    }

    /// Connect, open the publishing channel and declare the backend's own topology and then
    /// every topology in `declared`, all within the connect timeout: against a broker that is
    /// still starting, any of these can otherwise wait forever.
    /// Counted in `messaging_connections_total` or, when it fails,
    /// `messaging_connection_failures_total`.
    ///
    /// The nodes are tried from `first_node` on (see [`connect_to_a_node`]).
    pub(crate) async fn open(
        config: &RabbitConfig,
        declared: &[Topology],
        first_node: usize,
    ) -> Result<Link> {
        // Each node may take the whole connect timeout to fail.
        let nodes = u32::try_from(config.node_uris().len()).unwrap_or(u32::MAX);
        let opened = within(
            config.connect_timeout.saturating_mul(nodes),
            format!("setting up the connection to {}", config.address()),
            Link::open_unbounded(config, declared, first_node),
        )
        .await
        .and_then(|opened| opened);
        match &opened {
            Ok(_) => count_connection(NAME),
            Err(_) => count_connection_failure(NAME),
        }
        opened
    }

    async fn open_unbounded(
        config: &RabbitConfig,
        declared: &[Topology],
        first_node: usize,
    ) -> Result<Link> {
        let (connection, node) = connect_to_a_node(config, first_node).await?;
        let publisher = open_publisher(&connection, config.publisher_confirm).await?;
        config.base_topology().declare_on(&connection).await?;
        for topology in declared {
            topology.declare_on(&connection).await?;
        }
        Ok(Link {
            connection,
            publisher: std::sync::RwLock::new(publisher),
            reopening: tokio::sync::Mutex::new(()),
            publisher_confirm: config.publisher_confirm,
            node,
        })
    }
}

/// A connection to the first node that answers, and which it is: the nodes of
/// [`RabbitConfig::node_uris`] from `first` on, round to the ones before (a reconnect starts
/// at the node it was on, so a node that is down and silent costs no connect timeout while
/// another serves). A node that cannot be reached is counted as a failed attempt and the
/// next is tried; the last one's error is returned when none answers.
async fn connect_to_a_node(config: &RabbitConfig, first: usize) -> Result<(Connection, usize)> {
    let nodes = config.node_uris();
    let count = nodes.len();
    let mut failed = None;
    for step in 0..count {
        let index = (first + step) % count;
        let uri = nodes[index].clone();
        let address = format!("{}:{}", uri.authority.host, uri.authority.port);
        let runtime = lapin::runtime::default_runtime()
            .map_err(|e| from_lapin(e, "finding the Tokio runtime"))?;
        let connected = within(
            config.connect_timeout,
            format!("connecting to {address}"),
            Connection::connect_uri_with_config(
                uri,
                ConnectionProperties::default(),
                config.tls()?,
                runtime,
            ),
        )
        .await
        .and_then(|c| c.map_err(|e| from_lapin(e, format!("connecting to {address}"))));
        match connected {
            Ok(connection) => return Ok((connection, index)),
            Err(err) => {
                if step + 1 < count {
                    // The outer count records the attempt as a whole; a node passed over is
                    // a failed attempt of its own.
                    count_connection_failure(NAME);
                    tracing::warn!(node = %address, error = %err, "cannot reach this RabbitMQ node; trying the next");
                }
                failed = Some(err);
            }
        }
    }
    Err(failed
        .unwrap_or_else(|| Error::new(ErrorKind::Connection, "no RabbitMQ node to connect to")))
}

/// A publishing channel on `connection`, in confirm mode if `confirm`.
async fn open_publisher(connection: &Connection, confirm: bool) -> Result<Channel> {
    let publisher = connection
        .create_channel()
        .await
        .map_err(|e| from_lapin(e, "opening the publishing channel"))?;
    if confirm {
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| from_lapin(e, "enabling publisher confirms"))?;
    }
    Ok(publisher)
}

/// The current link and the machinery that replaces it.
pub(crate) struct Supervisor {
    config: RabbitConfig,
    /// `None` while there is no usable link (reconnecting, given up, or closed).
    current: watch::Sender<Option<Arc<Link>>>,
    reconnecting: AtomicBool,
    /// The node the last link was on (see [`Link::node`]).
    last_node: std::sync::atomic::AtomicUsize,
    gave_up: AtomicBool,
    closed: AtomicBool,
    /// `messaging_connection_up` of this broker's connection.
    state: ConnectionState,
    /// Topologies the application declared, declared again on every new connection.
    declared: std::sync::Mutex<Vec<Topology>>,
}

impl Supervisor {
    pub(crate) fn new(config: RabbitConfig, first: Link) -> Arc<Self> {
        let first = Arc::new(first);
        let state = ConnectionState::new(NAME, config.address());
        state.set(true);
        let supervisor = Arc::new(Supervisor {
            state,
            last_node: std::sync::atomic::AtomicUsize::new(first.node),
            config,
            current: watch::Sender::new(Some(first.clone())),
            reconnecting: AtomicBool::new(false),
            gave_up: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            declared: std::sync::Mutex::default(),
        });
        supervisor.watch(&first);
        supervisor
    }

    /// Reconnect as soon as `link`'s connection reports an error, rather than when someone
    /// next happens to use it.
    fn watch(self: &Arc<Self>, link: &Arc<Link>) {
        let events = link.connection.events_listener();
        let status = link.connection.status().clone();
        let supervisor = Arc::downgrade(self);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            use futures::StreamExt;
            let mut events = std::pin::pin!(events);
            loop {
                let event = events.next().await;
                let Some(supervisor) = supervisor.upgrade() else {
                    return;
                };
                match event {
                    // lapin reports a channel the server closed (a refused declaration,
                    // say) here too; only the connection's own end needs a new one.
                    Some(lapin::Event::Error(err)) if status.connected() => {
                        tracing::debug!(error = %err, "channel closed by the server");
                    }
                    Some(lapin::Event::Error(err)) => {
                        tracing::warn!(error = %err, "connection error");
                        supervisor.reconnect();
                        return;
                    }
                    Some(_) => {}
                    None => {
                        supervisor.reconnect();
                        return;
                    }
                }
            }
        });
    }

    /// Resolves once `link` is no longer the current one (replaced, lost, or closed).
    pub(crate) async fn replaced(&self, link: &Arc<Link>) {
        let mut changes = self.current.subscribe();
        loop {
            let same = matches!(&*changes.borrow_and_update(), Some(current) if Arc::ptr_eq(current, link));
            if !same || changes.changed().await.is_err() {
                return;
            }
        }
    }

    pub(crate) fn config(&self) -> &RabbitConfig {
        &self.config
    }

    /// Remember `topology`, so every later connection declares it too.
    pub(crate) fn remember(&self, topology: Topology) {
        self.declared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(topology);
    }

    fn declared(&self) -> Vec<Topology> {
        self.declared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    pub(crate) fn gave_up(&self) -> bool {
        self.gave_up.load(Ordering::Acquire)
    }

    /// The link if it is usable right now; otherwise starts reconnecting and returns
    /// `None` (callers fail fast with a retryable error instead of waiting).
    pub(crate) fn usable(self: &Arc<Self>) -> Option<Arc<Link>> {
        let link = self.current.borrow().clone();
        match link {
            Some(link) if link.usable() => Some(link),
            _ => {
                self.reconnect();
                None
            }
        }
    }

    /// Wait for a usable link, reconnecting as needed; `None` once closed or given up.
    pub(crate) async fn wait_usable(self: &Arc<Self>) -> Option<Arc<Link>> {
        let mut changes = self.current.subscribe();
        loop {
            if self.is_closed() || self.gave_up() {
                return None;
            }
            if let Some(link) = self.usable() {
                return Some(link);
            }
            if changes.changed().await.is_err() {
                return None;
            }
        }
    }

    /// The error for an operation attempted while there is no usable link.
    pub(crate) fn unavailable(&self) -> Error {
        if self.gave_up() {
            Error::new(
                ErrorKind::Connection,
                format!(
                    "lost the connection to {} and gave up after {} attempts",
                    self.config.address(),
                    self.config.reconnect_attempts
                ),
            )
            .with_retryable(false)
        } else {
            Error::new(
                ErrorKind::Connection,
                format!("reconnecting to {}", self.config.address()),
            )
        }
    }

    /// Start replacing the link unless that is already under way (one supervisor task).
    pub(crate) fn reconnect(self: &Arc<Self>) {
        if self.is_closed() || self.gave_up() || self.reconnecting.swap(true, Ordering::AcqRel) {
            return;
        }
        self.current.send_replace(None);
        self.state.set(false);
        let supervisor = self.clone();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.reconnecting.store(false, Ordering::Release);
            return;
        };
        runtime.spawn(async move {
            let config = &supervisor.config;
            tracing::warn!(address = %config.address(), "connection lost; reconnecting");
            let backoff = ExponentialBuilder::default()
                .with_min_delay(config.reconnect_delay)
                .with_max_delay(config.max_reconnect_delay)
                .with_max_times(config.reconnect_attempts)
                .with_jitter();
            let declared = supervisor.declared();
            let last_node = supervisor.last_node.load(Ordering::Acquire);
            let opened = (|| Link::open(config, &declared, last_node))
                .retry(backoff)
                .sleep(tokio::time::sleep)
                .when(|_| !supervisor.is_closed())
                .notify(|err: &Error, wait: Duration| {
                    tracing::warn!(error = %err, ?wait, "reconnect attempt failed");
                })
                .await;
            match opened {
                Ok(link) if !supervisor.is_closed() => {
                    tracing::info!(address = %config.address(), "reconnected");
                    helix_messaging_core::observe::count_reconnect(NAME);
                    let link = Arc::new(link);
                    supervisor.last_node.store(link.node, Ordering::Release);
                    supervisor.watch(&link);
                    supervisor.reconnecting.store(false, Ordering::Release);
                    supervisor.state.set(true);
                    supervisor.current.send_replace(Some(link));
                }
                Ok(link) => {
                    let _ = link.connection.close(200, "closed".into()).await;
                    supervisor.reconnecting.store(false, Ordering::Release);
                }
                Err(err) => {
                    tracing::error!(error = %err, "giving up reconnecting");
                    supervisor.gave_up.store(true, Ordering::Release);
                    supervisor.reconnecting.store(false, Ordering::Release);
                    // Wakes everyone waiting for a link, so they can report the failure.
                    supervisor.current.send_replace(None);
                }
            }
        });
    }

    /// Close for good: no more reconnecting, waiters are woken.
    pub(crate) async fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let link = self.current.send_replace(None);
        self.state.set(false);
        let Some(link) = link else { return Ok(()) };
        match link
            .connection
            .close(200, "closed by the application".into())
            .await
        {
            Ok(()) => Ok(()),
            // Already gone is as closed as it gets.
            Err(err) if !link.connection.status().connected() => {
                tracing::debug!(error = %err, "connection was already closed");
                Ok(())
            }
            Err(err) => Err(from_lapin(err, "closing the connection")),
        }
    }
}
