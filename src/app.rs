//! What every route and transport shares: the node's hub, metrics,
//! configuration, security gates and session places.

use std::net::IpAddr;
use std::sync::Arc;

use tokio::sync::watch;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::acl::Acl;
use crate::auth::{Identity, Verifier};
use crate::authz::Authz;
use crate::config::Config;
use crate::connect_auth::ConnectAuth;
use crate::handoff::Handoff;
use crate::hub::Hub;
use crate::limits::{IpLimits, IpSlot};
use crate::metrics::Metrics;
use crate::pending::Pending;
use crate::protocol::bayeux::conversation::{BayeuxRender, Endpoint, ServiceMap};
use crate::protocol::bayeux::message::Limits;
use crate::session::services::TcpBackends;
use crate::session::{Clients, SessionContext, SessionSlot};
use crate::shutdown::Phase;

/// What every route needs, shared by all connections.
pub struct App {
    /// The node's hub.
    pub hub: Hub,
    /// Server metrics.
    pub metrics: Metrics,
    /// Validated configuration.
    pub config: Config,
    /// Running, draining or stopping; sessions and connections watch it.
    pub phase: watch::Sender<Phase>,
    /// Live sessions. A watch (not an atomic) so shutdown can wait for zero;
    /// changed once per connect and disconnect, never per message.
    pub sessions: watch::Sender<usize>,
    /// Token verification, when a JWT key is configured.
    pub verifier: Option<Arc<Verifier>>,
    /// `WSGATE_ALLOW`, when set.
    pub allow: Option<Arc<Acl>>,
    /// `WSGATE_CLIENT_PUBLISH` (empty: no client may publish).
    pub client_publish: Arc<Acl>,
    /// The subscribe authorisation callback, when configured.
    pub authz: Option<Arc<Authz>>,
    /// Per-address connection limits.
    pub ip_limits: IpLimits,
    /// `GET /history`'s read rate, per reader (`WSGATE_HISTORY_READ_RATE`).
    pub history_readers: crate::read_rate::Readers,
    /// Connections not (yet) upgraded, and their node-wide cap.
    pub pending: Pending,
    /// Sessions that outlive their links (Bayeux), by key.
    pub clients: Clients,
    /// The Bayeux endpoint (`WSGATE_BAYEUX_PATH`).
    pub bayeux: Arc<Endpoint>,
    /// nodefony's endpoint (`WSGATE_NODEFONY_PATH`): the same engine.
    pub nodefony: Arc<Endpoint>,
    /// Fresh sessions offered to whichever node their client reaches next.
    pub handoff: Handoff,
    // RoadRunner and SocketStream.
    /// Places for RoadRunner's async publishes still waiting for the broker
    /// (beyond them, an async publish waits as the sync one does).
    pub roadrunner_async: Arc<tokio::sync::Semaphore>,
    /// What every SocketStream connection shares (`WSGATE_SOCKETSTREAM_CHANNELS`).
    pub socketstream: Arc<crate::protocol::socketstream::Endpoint>,
    /// The connect backend (`WSGATE_CONNECT_AUTH_URL`), when configured.
    pub connect_auth: Option<Arc<ConnectAuth>>,
    /// realizehit over Engine.IO (`WSGATE_REALIZEHIT_PATH`): its sids.
    pub realizehit: Arc<crate::transport::engineio::Endpoint>,
    /// The node's call router (services).
    pub rpc: crate::rpc::Rpc,
    /// `WSGATE_CALL_ALLOW`.
    pub call_allow: Arc<Acl>,
    /// This node's sessions by user (the operator API's orders).
    pub users: crate::session::Users,
    /// nodefony's TCP backends and the node's places for their connections.
    pub tcp: Arc<TcpBackends>,
}

/// RoadRunner async publishes one node lets wait for the broker at once.
pub const ROADRUNNER_ASYNC_IN_FLIGHT: usize = 1024;

impl App {
    /// Shared state for a freshly started server.
    pub fn new(
        hub: Hub,
        metrics: Metrics,
        config: Config,
        handoff: Handoff,
        rpc: crate::rpc::Rpc,
    ) -> App {
        let verifier = config.jwt_key.as_ref().map(|key| {
            Arc::new(Verifier::new(
                key,
                &config.jwt_audiences,
                &config.jwt_issuers,
                config.jwt_leeway,
            ))
        });
        let allow = config
            .allow
            .as_ref()
            .map(|entries| Arc::new(Acl::new(entries)));
        let client_publish = Arc::new(Acl::new(&config.client_publish));
        let authz = config.auth_url.as_ref().map(|url| {
            Arc::new(Authz::new(
                url.clone(),
                config.auth_timeout,
                config.auth_cache_ttl,
                config.auth_cache_entries.get(),
            ))
        });
        let ip_limits = IpLimits::new(
            config.max_connections_per_ip,
            config.new_connections_per_ip_per_sec,
            config.max_tracked_ips,
        );
        let pending = Pending::new(
            config.max_pending_connections.get(),
            metrics.pending_connections.clone(),
        );
        metrics
            .max_connections
            .set(i64::try_from(config.max_connections.get()).unwrap_or(i64::MAX));
        let tcp = Arc::new(TcpBackends::new(&config));
        let endpoint = |nodefony| {
            Arc::new(Endpoint {
                render: Arc::new(BayeuxRender),
                connect_timeout: config.bayeux_connect_timeout,
                session_timeout: config.bayeux_session_timeout,
                limits: Limits::new(config.max_message_bytes.get()),
                verifier: verifier.clone(),
                nodefony,
            })
        };
        let registered = rpc.clone();
        let services = ServiceMap {
            tcp: tcp.names(),
            registered: Box::new(move || registered.services()),
        };
        let (bayeux, nodefony) = (endpoint(None), endpoint(Some(services)));
        let connect_auth = config.connect_auth_url.as_ref().map(|url| {
            Arc::new(ConnectAuth::new(
                url.clone(),
                config.connect_auth_timeout,
                config.connect_auth_cache_ttl,
                config.connect_auth_cache_entries.get(),
            ))
        });
        let socketstream = Arc::new(crate::protocol::socketstream::Endpoint::new(
            &config.socketstream_channels,
        ));
        let realizehit = Arc::new(crate::transport::engineio::Endpoint::new(&config));
        let call_allow = Arc::new(Acl::new(&config.call_allow));
        let history_readers = crate::read_rate::Readers::new(
            config.history_read_rate.get(),
            crate::read_rate::MAX_READERS,
        );
        App {
            history_readers,
            tcp,
            rpc,
            call_allow,
            users: crate::session::Users::default(),
            realizehit,
            roadrunner_async: Arc::new(tokio::sync::Semaphore::new(ROADRUNNER_ASYNC_IN_FLIGHT)),
            socketstream,
            connect_auth,
            handoff,
            bayeux,
            nodefony,
            pending,
            hub,
            metrics,
            config,
            phase: watch::Sender::new(Phase::Running),
            sessions: watch::Sender::new(0),
            verifier,
            allow,
            authz,
            client_publish,
            ip_limits,
            clients: Clients::default(),
        }
    }

    /// Takes a session place, unless the node is full.
    pub fn admit(&self) -> Option<SessionSlot> {
        SessionSlot::take(&self.sessions, self.config.max_connections.get())
    }

    /// What a session admitted with these places needs.
    pub fn session_context(
        &self,
        slot: SessionSlot,
        ip_slot: IpSlot,
        client_ip: IpAddr,
        identity: Option<Identity>,
    ) -> SessionContext {
        SessionContext {
            ip_slot,
            client_ip,
            identity,
            verifier: self.verifier.clone(),
            allow: self.allow.clone(),
            authz: self.authz.clone(),
            client_publish: self.client_publish.clone(),
            clients: self.clients.clone(),
            handoff: self.handoff.clone(),
            node_id: self.config.node_id.as_str().into(),
            rpc: self.rpc.clone(),
            call_allow: self.call_allow.clone(),
            max_call_bytes: self.config.max_call_bytes.get(),
            max_calls_in_flight: self.config.max_calls_in_flight.get(),
            users: self.users.clone(),
            tcp: self.tcp.clone(),
            hub: self.hub.clone(),
            metrics: self.metrics.clone(),
            phase: self.phase.subscribe(),
            slot,
            max_subscriptions: self.config.max_subscriptions.get(),
            max_pattern_bytes: self.config.max_pattern_bytes.get(),
            pattern_limits: crate::pattern_cost::PatternLimits {
                max_wildcards: self.config.max_pattern_wildcards,
                max_classes: self.config.max_pattern_classes,
                max_per_connection: self.config.max_patterns_per_connection.get(),
                min_prefix: self.config.min_pattern_prefix_bytes,
            },
            queue_bytes: self.config.client_queue_bytes.get(),
            subscribe_timeout: self.config.subscribe_timeout,
            subscribe_rate: self.config.subscribe_rate.get(),
            history_read_rate: self.config.history_read_rate.get(),
            ping_interval: self.config.ping_interval,
            pong_timeout: self.config.pong_timeout,
        }
    }

    /// How tungstenite reads and writes a socket of this node.
    pub fn ws_config(&self) -> WebSocketConfig {
        let max = self.config.max_message_bytes.get();
        WebSocketConfig::default()
            .read_buffer_size(self.config.ws_read_buffer_bytes.get())
            .max_message_size(Some(max))
            .max_frame_size(Some(max))
            // Frames are batched by the session and flushed once per batch.
            .write_buffer_size(WRITE_BUFFER_BYTES)
    }
}

/// Outbound bytes tungstenite gathers before writing to the socket within
/// one batch: large enough that a burst goes out in few syscalls, and it is
/// only allocated on sockets that actually receive traffic.
const WRITE_BUFFER_BYTES: usize = 64 * 1024;
