//! One WebSocket connection, from upgrade to close.
//!
//! A session is one task. It reads frames, asks its [`Dialect`] what they
//! mean, and turns requests into hub calls; it writes whatever its [`Outbox`]
//! holds, a whole batch per flush. It ends when the client leaves, on a fatal
//! protocol error, when the outbox overflows (close 4008, slow consumer), or
//! when the server drains (close 1012, at this session's moment in the drain
//! window) or stops (close 1001), or when the client shows no sign of life
//! for `WSGATE_PONG_TIMEOUT_MS` (close 4009; the server pings every
//! `WSGATE_PING_INTERVAL_MS`), or when its token expires (close 4001, unless
//! a `refresh` brought a new one). Whatever the reason, it leaves every topic
//! it held, so the hub's refcounts stay exact.
//!
//! A subscribe passes, in order: name validation, the per-connection limits,
//! the ACLs ([`crate::acl`]: `WSGATE_ALLOW`, then the token's `subscribe`
//! claim; refused with `not allowed`), then the authorisation callback
//! ([`crate::authz`]) when configured, whose answer is awaited beside the
//! other requests (the subscribe is answered when decided), and finally the
//! broker.
//!
//! A publish passes name validation, the rate (shared with subscribes) and
//! both publish lists ([`crate::publish::client_may_publish`]), then goes to
//! the broker ([`crate::publish::client_publish`]); its reply is awaited
//! beside the other requests, like a subscribe's confirmation.
//!
//! The session is generic over the socket's `Stream + Sink` so dialects can be
//! exercised over channels; production passes a tokio-tungstenite stream.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::future::{poll_fn, Future};
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use futures_util::stream::FuturesUnordered;
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tracing::{debug, warn};

use crate::acl::Acl;
use crate::auth::{Identity, Verifier};
use crate::authz::{Authz, AuthzError, Decision, Question};
use crate::broker::{BrokerError, Publication, Topic};
use crate::http::SessionSlot;
use crate::hub::{Hub, Joined, Member, Removed, Sub};
use crate::limits::IpSlot;
use crate::metrics::Metrics;
use crate::outbox::{Item, Outbox, State};
use crate::pattern_cost::{self, PatternLimits};
use crate::protocol::{Ack, AckKind, Dialect, Frame, Notice, NoticeKind, PublishReply, Request};
use crate::shutdown::Phase;

/// Close code for a client whose queue overflowed (Centrifugo's convention
/// of 4xxx application codes; documented in `docs/protocol.md`).
pub const CLOSE_SLOW_CONSUMER: u16 = 4008;
/// Close code for a client that showed no traffic and no pong in time.
pub const CLOSE_KEEPALIVE: u16 = 4009;
/// Close code while draining: "service restart", reconnect (elsewhere).
pub const CLOSE_RESTART: u16 = 1012;
/// Close code when the connection's token expired without a `refresh`:
/// reconnect with a new token.
pub const CLOSE_TOKEN_EXPIRED: u16 = 4001;

/// The refusal of a subscribe outside the ACLs. Deliberately the same
/// whichever list refused it, and whether or not the name exists.
pub const NOT_ALLOWED: &str = "not allowed";
/// The refusal when the authorisation callback gave no decision.
pub const AUTHZ_UNAVAILABLE: &str = "authorisation unavailable";

/// How long a closing handshake may take before the socket is just dropped:
/// a client that stopped reading gets this long to drain what is in flight
/// and see the close frame.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Limits and collaborators of one session.
pub struct SessionContext {
    /// The node's hub.
    pub hub: Hub,
    /// Server metrics.
    pub metrics: Metrics,
    /// Running, draining or stopping.
    pub phase: watch::Receiver<Phase>,
    /// This session's place among `WSGATE_MAX_CONNECTIONS`; freed on drop.
    pub slot: SessionSlot,
    /// Subscriptions one connection may hold.
    pub max_subscriptions: usize,
    /// Longest channel or pattern, in bytes.
    pub max_pattern_bytes: usize,
    /// What one pattern may contain, and how many one connection may hold.
    pub pattern_limits: PatternLimits,
    /// Outbound bytes queued before the client counts as slow.
    pub queue_bytes: usize,
    /// How long a subscribe waits for the broker.
    pub subscribe_timeout: Duration,
    /// Subscribes per second (and burst size) allowed.
    pub subscribe_rate: usize,
    /// How often the server pings the client.
    pub ping_interval: Duration,
    /// Silence after which the client counts as dead.
    pub pong_timeout: Duration,
    /// This connection's place among its address's connections; freed on drop.
    pub ip_slot: IpSlot,
    /// The client's address (after trusted proxies), for the callback.
    pub client_ip: IpAddr,
    /// Who connected, when JWT authentication is on; the session takes it
    /// and replaces it on `refresh`.
    pub identity: Option<Identity>,
    /// Token verification for `refresh`; `None` when authentication is off.
    pub verifier: Option<Arc<Verifier>>,
    /// `WSGATE_ALLOW`, when set.
    pub allow: Option<Arc<Acl>>,
    /// `WSGATE_CLIENT_PUBLISH` (empty: this connection may not publish).
    pub client_publish: Arc<Acl>,
    /// The authorisation callback, when configured.
    pub authz: Option<Arc<Authz>>,
}

/// A subscribe waiting for the broker: resolves to (topic, seq, outcome).
type Waiting = Pin<Box<dyn Future<Output = (Topic, u64, Result<(), BrokerError>)> + Send>>;

/// A subscribe waiting for the authorisation callback.
type Authorising = Pin<Box<dyn Future<Output = (Topic, u64, Result<Decision, AuthzError>)> + Send>>;

/// A publish waiting for the broker: resolves to its reply.
type Publishing = Pin<Box<dyn Future<Output = Frame> + Send>>;

/// One subscription the client holds, as the session tracks it.
struct Held {
    /// Distinguishes this subscribe from an earlier one of the same topic.
    seq: u64,
    /// The subscribe's id, for a late refusal.
    id: Option<String>,
    /// How far the subscribe has got.
    stage: Stage,
    /// Told `interrupted` and not yet `resumed`.
    told: bool,
}

/// Where a held subscription is. Every stage counts against the limit and
/// makes a second subscribe `already subscribed`.
enum Stage {
    /// Waiting for the authorisation callback; the hub knows nothing yet.
    Authorising,
    /// Joined in the hub, waiting for the broker.
    Pending,
    /// Receiving deliveries through this place in the hub.
    Active(Arc<Sub>),
}

impl Stage {
    fn is_authorising(&self) -> bool {
        matches!(self, Stage::Authorising)
    }

    fn is_pending(&self) -> bool {
        matches!(self, Stage::Pending)
    }

    /// Its place in the hub, when active.
    fn sub(&self) -> Option<&Sub> {
        match self {
            Stage::Active(sub) => Some(sub),
            _ => None,
        }
    }
}

/// Why the session loop stopped, and how to close the socket.
enum End {
    /// The socket failed or ended: nothing more to send.
    Gone,
    /// The client sent a close frame: answer it (same code) and end.
    ClientClosed,
    /// Close with this code and reason.
    Close(u16, Cow<'static, str>),
}

/// Runs a session over an upgraded WebSocket until it ends.
pub async fn run<S>(mut ws: S, dialect: Arc<dyn Dialect>, mut ctx: SessionContext)
where
    S: Stream<Item = Result<Message, WsError>> + Sink<Message, Error = WsError> + Unpin,
{
    let member = ctx
        .hub
        .join_node(Arc::new(Outbox::new(ctx.queue_bytes)), dialect);
    ctx.metrics.connections.inc();
    let mut session = Session {
        member: member.clone(),
        held: HashMap::new(),
        waiting: None,
        authorising: None,
        publishing: None,
        seq: 0,
        bucket: TokenBucket::new(ctx.subscribe_rate),
        expires_at: None,
        identity: None,
    };
    if let Some(identity) = ctx.identity.take() {
        session.set_identity(identity);
    }
    let mut writer = Writer::default();
    let mut items = VecDeque::new();
    let mut phase = ctx.phase.clone();
    // Timers for closing on our own (drain slot, token expiry): armed once and
    // reset only when their deadline changes, never re-created per wake-up.
    let mut drain = None;
    arm(
        &mut drain,
        phase.borrow().close_at(member.id).map(Into::into),
    );
    let mut expiry = None;
    let mut armed_expiry = None;
    let mut keepalive = tokio::time::interval_at(
        (Instant::now() + ctx.ping_interval).into(),
        ctx.ping_interval,
    );
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_seen = Instant::now();
    // Every branch stays live while a write is blocked on a client that does
    // not read: the socket is driven by one `poll_io` that makes write
    // progress and reads in the same poll, so timers, the reader and the
    // subscribe waits never wait for the write.
    let end = loop {
        if session.expires_at != armed_expiry {
            armed_expiry = session.expires_at;
            arm(&mut expiry, armed_expiry);
        }
        tokio::select! {
            biased;
            changed = phase.changed() => {
                let current = *phase.borrow_and_update();
                if changed.is_err() || current == Phase::Stopping {
                    break End::Close(1001, "server shutting down".into());
                }
                arm(&mut drain, current.close_at(member.id).map(Into::into));
            }
            _ = fire(&mut drain) => break End::Close(CLOSE_RESTART, "service restart".into()),
            _ = fire(&mut expiry) => {
                ctx.metrics.refused.with_label_values(&["token_expired"]).inc();
                break End::Close(CLOSE_TOKEN_EXPIRED, "token expired".into());
            }
            _ = member.outbox.overflowed() => break End::Close(CLOSE_SLOW_CONSUMER, "slow consumer".into()),
            _ = keepalive.tick() => {
                if last_seen.elapsed() >= ctx.pong_timeout {
                    break End::Close(CLOSE_KEEPALIVE, "keepalive timeout".into());
                }
                session.reply(Message::Ping(bytes::Bytes::new()));
            }
            io = poll_fn(|cx| poll_io(&mut ws, &mut writer, cx)) => match io {
                Io::Wrote(n) => {
                    ctx.metrics.frames_out.inc_by(n);
                    if let Some(end) = session.refill(&ctx.metrics, &mut writer, &mut items) {
                        break end;
                    }
                }
                Io::WriteFailed(e) => {
                    debug!(cause = %e, "write failed");
                    break End::Gone;
                }
                Io::Read(frame) => {
                    last_seen = Instant::now();
                    match frame {
                        None => break End::Gone,
                        Some(Ok(Message::Close(_))) => break End::ClientClosed,
                        Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                        Some(Ok(frame)) => session.handle(&ctx, &frame),
                        Some(Err(e)) => break read_error(e),
                    }
                }
            },
            _ = member.outbox.ready(), if !writer.busy() => {
                if let Some(end) = session.refill(&ctx.metrics, &mut writer, &mut items) {
                    break end;
                }
            }
            Some((topic, seq, outcome)) = next_done(&mut session.waiting) => {
                session.confirmed(&ctx, topic, seq, outcome);
                if session.waiting.as_ref().is_some_and(FuturesUnordered::is_empty) {
                    session.waiting = None; // give its allocation back while idle
                }
            }
            Some((topic, seq, outcome)) = next_done(&mut session.authorising) => {
                session.authorised(&ctx, topic, seq, outcome);
                if session.authorising.as_ref().is_some_and(FuturesUnordered::is_empty) {
                    session.authorising = None;
                }
            }
            Some(reply) = next_done(&mut session.publishing) => {
                session.reply(reply);
                if session.publishing.as_ref().is_some_and(FuturesUnordered::is_empty) {
                    session.publishing = None;
                }
            }
        }
    };
    session.leave(&ctx);
    ctx.hub.leave_node(member.id);
    ctx.metrics.connections.dec();
    finish(&mut ws, writer, &member.outbox, end).await;
    member.outbox.close();
}

/// How a failed read ends the session: protocol errors get the close code
/// RFC 6455 gives them (1002, 1007 for invalid UTF-8, 1009 for too big), so
/// the client learns why instead of seeing the connection vanish.
fn read_error(e: WsError) -> End {
    match e {
        WsError::Capacity(CapacityError::MessageTooLong { .. }) => {
            End::Close(1009, "message too big".into())
        }
        WsError::Capacity(e) => End::Close(1009, e.to_string().into()),
        WsError::Utf8(_) => End::Close(1007, "invalid UTF-8 in a text message".into()),
        WsError::Protocol(p) => End::Close(1002, close_reason(p.to_string()).into()),
        e => {
            debug!(cause = %e, "read failed");
            End::Gone
        }
    }
}

/// A close reason fits in a control frame: at most 123 bytes.
fn close_reason(mut text: String) -> String {
    if text.len() > 123 {
        let mut cut = 123;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    text
}

/// What [`poll_io`] made happen.
enum Io {
    /// The batch in progress was written and flushed: this many frames.
    Wrote(u64),
    /// Writing failed: the socket is gone.
    WriteFailed(WsError),
    /// The client sent something (or the stream ended).
    Read(Option<Result<Message, WsError>>),
}

/// The batch being written to the socket, fed frame by frame as the sink
/// accepts them and then flushed; it lives across `select!` iterations so a
/// blocked write never blocks anything else.
#[derive(Default)]
struct Writer {
    batch: VecDeque<Frame>,
    fed: u64,
    flushing: bool,
}

impl Writer {
    /// A batch is in progress (no new one is taken until it is flushed).
    fn busy(&self) -> bool {
        self.flushing
    }
}

/// Makes write progress, then reads: whichever completes first is returned.
fn poll_io<S>(ws: &mut S, w: &mut Writer, cx: &mut Context<'_>) -> Poll<Io>
where
    S: Stream<Item = Result<Message, WsError>> + Sink<Message, Error = WsError> + Unpin,
{
    if w.flushing {
        match poll_write(ws, w, cx) {
            Poll::Ready(Ok(n)) => return Poll::Ready(Io::Wrote(n)),
            Poll::Ready(Err(e)) => return Poll::Ready(Io::WriteFailed(e)),
            Poll::Pending => {}
        }
    }
    ws.poll_next_unpin(cx).map(Io::Read)
}

fn poll_write<S>(ws: &mut S, w: &mut Writer, cx: &mut Context<'_>) -> Poll<Result<u64, WsError>>
where
    S: Sink<Message, Error = WsError> + Unpin,
{
    while !w.batch.is_empty() {
        ready!(ws.poll_ready_unpin(cx))?;
        if let Some(frame) = w.batch.pop_front() {
            ws.start_send_unpin(frame)?;
            w.fed += 1;
        }
    }
    ready!(ws.poll_flush_unpin(cx))?;
    w.flushing = false;
    Poll::Ready(Ok(std::mem::take(&mut w.fed)))
}

/// Ends the socket as `end` says: a client's close is answered (tungstenite
/// queued the echo; it only needs flushing), a close of ours goes out after
/// what is queued (unless the client is too slow to be worth waiting for),
/// and either takes at most [`CLOSE_GRACE`].
async fn finish<S>(ws: &mut S, mut writer: Writer, outbox: &Outbox, end: End)
where
    S: Stream<Item = Result<Message, WsError>> + Sink<Message, Error = WsError> + Unpin,
{
    let (code, reason) = match end {
        End::Gone => return,
        End::ClientClosed => {
            let _ = tokio::time::timeout(CLOSE_GRACE, async {
                ws.flush().await?;
                while let Some(msg) = ws.next().await {
                    msg?;
                }
                Ok::<(), WsError>(())
            })
            .await;
            return;
        }
        End::Close(code, reason) => (code, reason),
    };
    let frame = CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into_owned().into(),
    };
    let slow = code == CLOSE_SLOW_CONSUMER;
    let handshake = async {
        if !slow {
            let mut items = VecDeque::new();
            outbox.take(&mut items);
            writer
                .batch
                .extend(items.into_iter().filter_map(|i| match i {
                    Item::Frame(f) => Some(f),
                    Item::Mark(_) => None,
                }));
            for frame in writer.batch.drain(..) {
                ws.feed(frame).await?;
            }
        }
        ws.send(Message::Close(Some(frame))).await?;
        while let Some(msg) = ws.next().await {
            msg?;
        }
        Ok::<(), WsError>(())
    };
    let _ = tokio::time::timeout(CLOSE_GRACE, handshake).await;
}

/// An optional timer: allocated only when a deadline exists.
type Timer = Option<Pin<Box<tokio::time::Sleep>>>;

/// Sets `timer` to fire at `at` (reusing its allocation), or disarms it.
fn arm(timer: &mut Timer, at: Option<tokio::time::Instant>) {
    match (timer.as_mut(), at) {
        (Some(t), Some(at)) => t.as_mut().reset(at),
        (None, Some(at)) => *timer = Some(Box::pin(tokio::time::sleep_until(at))),
        (_, None) => *timer = None,
    }
}

/// Resolves when `timer` fires; never when it is disarmed.
async fn fire(timer: &mut Timer) {
    match timer {
        Some(t) => t.as_mut().await,
        None => std::future::pending().await,
    }
}

/// The next finished wait in a lazily allocated set; `None` at once when
/// nothing waits (which disables that `select!` branch for the iteration).
async fn next_done<F: Future + Unpin>(set: &mut Option<FuturesUnordered<F>>) -> Option<F::Output> {
    match set {
        Some(s) => s.next().await,
        None => None,
    }
}

/// Per-connection request handling state.
struct Session {
    member: Arc<Member>,
    held: HashMap<Topic, Held>,
    /// Subscribes waiting for the broker; allocated only while there are some
    /// (an idle socket should cost as little memory as possible).
    waiting: Option<FuturesUnordered<Waiting>>,
    /// Subscribes waiting for the authorisation callback; likewise lazy.
    authorising: Option<FuturesUnordered<Authorising>>,
    /// Publishes waiting for the broker; likewise lazy.
    publishing: Option<FuturesUnordered<Publishing>>,
    seq: u64,
    bucket: TokenBucket,
    /// The verified token, when authentication is on.
    identity: Option<Identity>,
    /// When the token expires: the socket is closed with 4001 then.
    expires_at: Option<tokio::time::Instant>,
}

/// Subscribe rate limit: `rate` tokens per second, holding at most `rate`.
struct TokenBucket {
    rate: f64,
    tokens: f64,
    refilled: Instant,
}

impl TokenBucket {
    fn new(rate: usize) -> TokenBucket {
        let rate = rate as f64;
        TokenBucket {
            rate,
            tokens: rate,
            refilled: Instant::now(),
        }
    }

    /// Takes one token if there is one.
    fn take(&mut self) -> bool {
        let now = Instant::now();
        let earned = now.duration_since(self.refilled).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + earned).min(self.rate);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl Session {
    fn reply(&self, frame: Frame) {
        self.member.outbox.push(frame);
    }

    fn ack(&self, kind: AckKind, topic: &Topic, id: Option<&str>, error: Option<&str>) {
        self.reply(self.member.dialect.ack(&Ack {
            kind,
            topic,
            id,
            error,
        }));
    }

    fn handle(&mut self, ctx: &SessionContext, frame: &Message) {
        match self.member.dialect.decode(frame) {
            Ok(Request::Subscribe { topic, id }) => self.subscribe(ctx, topic, id),
            Ok(Request::Unsubscribe { topic, id }) => self.unsubscribe(ctx, topic, id),
            Ok(Request::Ping { id }) => self.reply(self.member.dialect.pong(id.as_deref())),
            Ok(Request::Refresh { token, id }) => self.refresh(ctx, &token, id.as_deref()),
            Ok(Request::Publish {
                channel,
                payload,
                id,
            }) => self.publish(ctx, channel, payload, id),
            Err(rejection) => {
                ctx.metrics.malformed_frames.inc();
                self.reply(self.member.dialect.reject(&rejection));
            }
        }
    }

    /// Why this connection may not subscribe to `topic` now, if it may not.
    fn refusal(&mut self, ctx: &SessionContext, topic: &Topic) -> Option<String> {
        if let Err(error) = validate(topic, ctx.max_pattern_bytes) {
            return Some(error);
        }
        if self.held.contains_key(topic) {
            return Some("already subscribed".to_owned());
        }
        if self.held.len() >= ctx.max_subscriptions {
            return Some(format!(
                "subscription limit reached ({})",
                ctx.max_subscriptions
            ));
        }
        if let Some(r) =
            pattern_cost::connection_refusal(&ctx.pattern_limits, topic, self.held.keys())
        {
            ctx.metrics.refused.with_label_values(&[r.reason]).inc();
            return Some(r.message);
        }
        if !self.bucket.take() {
            ctx.metrics
                .refused
                .with_label_values(&["rate_limited"])
                .inc();
            return Some("rate limited".to_owned());
        }
        None
    }

    /// Takes `identity` and arms the expiry timer. An `exp` too far ahead to
    /// be represented as an instant (centuries) arms none, rather than
    /// overflowing.
    fn set_identity(&mut self, identity: Identity) {
        self.expires_at = tokio::time::Instant::now().checked_add(identity.remaining());
        self.identity = Some(identity);
    }

    /// May this connection hold `topic` at all? Both `WSGATE_ALLOW` and, when
    /// authentication is on, the token's ACL must allow it.
    fn permitted(&self, ctx: &SessionContext, topic: &Topic) -> bool {
        let server = ctx.allow.as_ref().is_none_or(|acl| acl.allows(topic));
        let token = ctx.verifier.is_none()
            || self
                .identity
                .as_ref()
                .is_some_and(|id| id.acl.allows(topic));
        server && token
    }

    fn refuse(
        &self,
        ctx: &SessionContext,
        reason: &str,
        topic: &Topic,
        id: Option<&str>,
        error: &str,
    ) {
        ctx.metrics.refused.with_label_values(&[reason]).inc();
        self.ack(AckKind::Subscribe, topic, id, Some(error));
    }

    fn subscribe(&mut self, ctx: &SessionContext, topic: Topic, id: Option<String>) {
        if let Some(error) = self.refusal(ctx, &topic) {
            return self.ack(AckKind::Subscribe, &topic, id.as_deref(), Some(&error));
        }
        if !self.permitted(ctx, &topic) {
            return self.refuse(ctx, "not_allowed", &topic, id.as_deref(), NOT_ALLOWED);
        }
        self.seq += 1;
        let seq = self.seq;
        if let Some(authz) = &ctx.authz {
            let question = Question {
                subject: self.identity.as_ref().map(|i| i.subject.as_str()),
                claims: self.identity.as_ref().map(|i| &i.claims),
                topic: &topic,
                remote_addr: ctx.client_ip,
            };
            match authz.cached(&question) {
                Some(Decision::Allow) => {}
                Some(Decision::Deny(reason)) => {
                    return self.refuse(ctx, "authz_denied", &topic, id.as_deref(), &reason);
                }
                None => {
                    let answer = authz.ask(&question);
                    self.held.insert(
                        topic.clone(),
                        Held {
                            seq,
                            id,
                            stage: Stage::Authorising,
                            told: false,
                        },
                    );
                    self.authorising
                        .get_or_insert_with(FuturesUnordered::new)
                        .push(Box::pin(async move { (topic, seq, answer.await) }));
                    return;
                }
            }
        }
        self.join(ctx, topic, id, seq);
    }

    /// The callback answered a subscribe (unless it was withdrawn meanwhile).
    fn authorised(
        &mut self,
        ctx: &SessionContext,
        topic: Topic,
        seq: u64,
        outcome: Result<Decision, AuthzError>,
    ) {
        let current = self
            .held
            .get(&topic)
            .is_some_and(|h| h.seq == seq && h.stage.is_authorising());
        if !current {
            return; // unsubscribed or revoked meanwhile, and already answered
        }
        let id = self.held.remove(&topic).and_then(|h| h.id);
        match outcome {
            Ok(Decision::Allow) => self.join(ctx, topic, id, seq),
            Ok(Decision::Deny(reason)) => {
                self.refuse(ctx, "authz_denied", &topic, id.as_deref(), &reason)
            }
            Err(e) => {
                warn!(cause = %e, "authorisation callback failed");
                self.refuse(
                    ctx,
                    "authz_unavailable",
                    &topic,
                    id.as_deref(),
                    AUTHZ_UNAVAILABLE,
                );
            }
        }
    }

    /// Joins the topic in the hub: an authorised subscribe.
    fn join(&mut self, ctx: &SessionContext, topic: Topic, id: Option<String>, seq: u64) {
        let joined = match ctx.hub.subscribe(&self.member, topic.clone()) {
            Ok(joined) => joined,
            Err(r) => return self.refuse(ctx, r.reason, &topic, id.as_deref(), &r.message),
        };
        self.held.insert(
            topic.clone(),
            Held {
                seq,
                id,
                stage: Stage::Pending,
                told: false,
            },
        );
        self.joined(ctx, topic, seq, joined);
    }

    /// Follows up a hub join: an active one is answered and started (reply
    /// first, so it precedes every delivery), a pending one waits.
    fn joined(&mut self, ctx: &SessionContext, topic: Topic, seq: u64, joined: Joined) {
        match joined {
            Joined::Active(sub) => {
                let Some(held) = self.held.get_mut(&topic) else {
                    return;
                };
                let ack = self.member.dialect.ack(&Ack {
                    kind: AckKind::Subscribe,
                    topic: &topic,
                    id: held.id.as_deref(),
                    error: None,
                });
                self.member.outbox.push(ack);
                sub.start();
                held.stage = Stage::Active(sub);
            }
            Joined::Pending(confirmation) => {
                let timeout = ctx.subscribe_timeout;
                self.waiting
                    .get_or_insert_with(FuturesUnordered::new)
                    .push(Box::pin(async move {
                        let mut confirmation = confirmation;
                        let answered = async {
                            match confirmation.wait_for(Option::is_some).await {
                                Ok(answer) => answer.clone(),
                                Err(_) => None,
                            }
                        };
                        let outcome = match tokio::time::timeout(timeout, answered).await {
                            Ok(Some(outcome)) => outcome,
                            Ok(None) | Err(_) => Err(BrokerError::Unavailable),
                        };
                        (topic, seq, outcome)
                    }));
            }
        }
    }

    /// A wait for the broker ended.
    fn confirmed(
        &mut self,
        ctx: &SessionContext,
        topic: Topic,
        seq: u64,
        outcome: Result<(), BrokerError>,
    ) {
        let current = self
            .held
            .get(&topic)
            .is_some_and(|h| h.seq == seq && h.stage.is_pending());
        if !current {
            return; // unsubscribed meanwhile, and already answered
        }
        let error = match outcome {
            Ok(()) => None,
            // The broker refused this topic (e.g. a Redis ACL): the hub has
            // already withdrawn it; nobody else is affected.
            Err(BrokerError::Refused(why)) => {
                ctx.metrics
                    .refused
                    .with_label_values(&["broker_refused"])
                    .inc();
                Some(why)
            }
            // Timed out: withdraw, unless confirmed in the meantime.
            Err(_) if ctx.hub.cancel_pending(self.member.id, &topic) => {
                Some("broker unavailable".to_owned())
            }
            Err(_) => None,
        };
        if let Some(error) = error {
            let id = self.held.remove(&topic).and_then(|h| h.id);
            return self.ack(AckKind::Subscribe, &topic, id.as_deref(), Some(&error));
        }
        match ctx.hub.activate(&self.member, &topic) {
            Some(joined) => self.joined(ctx, topic, seq, joined),
            None => {
                let id = self.held.remove(&topic).and_then(|h| h.id);
                self.ack(
                    AckKind::Subscribe,
                    &topic,
                    id.as_deref(),
                    Some("broker unavailable"),
                );
            }
        }
    }

    /// Moves the next queued items into the writer, rendering gap marks from
    /// this session's own subscriptions. `Some` when the session must end.
    fn refill(
        &mut self,
        metrics: &Metrics,
        writer: &mut Writer,
        items: &mut VecDeque<Item>,
    ) -> Option<End> {
        match self.member.outbox.take(items) {
            State::Open => {}
            State::Overflowed => {
                return Some(End::Close(CLOSE_SLOW_CONSUMER, "slow consumer".into()))
            }
            State::Closed => return Some(End::Gone),
        }
        for item in items.drain(..) {
            match item {
                Item::Frame(frame) => writer.batch.push_back(frame),
                Item::Mark(kind) => {
                    if let Some(frame) = self.render_mark(kind) {
                        metrics.gap_notices.inc();
                        writer.batch.push_back(frame);
                    }
                }
            }
        }
        writer.flushing = !writer.batch.is_empty();
        None
    }

    /// The gap notice a mark stands for: `interrupted` names the active
    /// subscriptions not yet told, `resumed` those told and still held.
    fn render_mark(&mut self, kind: NoticeKind) -> Option<Frame> {
        let mut topics: Vec<Topic> = Vec::new();
        for (topic, held) in self.held.iter_mut() {
            let concerned = match kind {
                NoticeKind::Interrupted => {
                    matches!(held.stage, Stage::Active(_))
                        && !std::mem::replace(&mut held.told, true)
                }
                NoticeKind::Resumed => {
                    std::mem::take(&mut held.told) && matches!(held.stage, Stage::Active(_))
                }
            };
            if concerned {
                topics.push(topic.clone());
            }
        }
        // In no particular order (as documented): sorting 256 topics per
        // session was a third of an outage's cost.
        if topics.is_empty() {
            return None;
        }
        let reason = match kind {
            NoticeKind::Interrupted => Some("broker connection lost"),
            NoticeKind::Resumed => None,
        };
        Some(self.member.dialect.notice(&Notice {
            kind,
            topics: &topics,
            reason,
        }))
    }

    fn unsubscribe(&mut self, ctx: &SessionContext, topic: Topic, id: Option<String>) {
        let Some(held) = self.held.remove(&topic) else {
            return self.ack(
                AckKind::Unsubscribe,
                &topic,
                id.as_deref(),
                Some("not subscribed"),
            );
        };
        if let Stage::Active(sub) = &held.stage {
            sub.stop();
        }
        if held.stage.is_authorising()
            || ctx
                .hub
                .unsubscribe(self.member.id, &topic, held.stage.sub())
                == Removed::Pending
        {
            // The subscribe never completed: answer it before the unsubscribe.
            self.ack(
                AckKind::Subscribe,
                &topic,
                held.id.as_deref(),
                Some("cancelled by unsubscribe"),
            );
        }
        self.ack(AckKind::Unsubscribe, &topic, id.as_deref(), None);
    }

    /// Takes a fresh token: same subject required. The new token's ACL
    /// replaces the old one; subscriptions it does not allow are ended, each
    /// with an `unsubscribed` notice (or, if not yet answered, a `not allowed`
    /// refusal), after the refresh reply.
    fn refresh(&mut self, ctx: &SessionContext, token: &str, id: Option<&str>) {
        let dialect = self.member.dialect.clone();
        let Some(verifier) = &ctx.verifier else {
            return self.reply(dialect.refreshed(id, Some("authentication is not enabled")));
        };
        if !self.bucket.take() {
            ctx.metrics
                .refused
                .with_label_values(&["rate_limited"])
                .inc();
            return self.reply(dialect.refreshed(id, Some("rate limited")));
        }
        let identity = match verifier.verify(token) {
            Ok(identity) => identity,
            Err(e) => return self.reply(dialect.refreshed(id, Some(&e.to_string()))),
        };
        let same_subject = self
            .identity
            .as_ref()
            .is_some_and(|current| current.subject == identity.subject);
        if !same_subject {
            return self.reply(dialect.refreshed(id, Some("token is for another subject")));
        }
        self.set_identity(identity);
        self.reply(dialect.refreshed(id, None));
        let mut revoked: Vec<Topic> = self
            .held
            .keys()
            .filter(|t| !self.permitted(ctx, t))
            .cloned()
            .collect();
        revoked.sort();
        for topic in revoked {
            self.revoke(ctx, topic);
        }
    }

    /// A client publish: checked as a subscribe is (name, rate), then against
    /// both publish lists (refused `not allowed`, counted as
    /// `publish_not_allowed`), then sent to the broker as `POST /publish`
    /// sends it; answered once the broker answered.
    fn publish(
        &mut self,
        ctx: &SessionContext,
        channel: bytes::Bytes,
        payload: bytes::Bytes,
        id: Option<String>,
    ) {
        let refusal =
            if let Err(error) = validate(&Topic::Channel(channel.clone()), ctx.max_pattern_bytes) {
                Some((None, error))
            } else if !self.bucket.take() {
                Some((Some("rate_limited"), "rate limited".to_owned()))
            } else if !crate::publish::client_may_publish(
                &ctx.client_publish,
                self.identity.as_ref(),
                ctx.verifier.is_some(),
                &channel,
            ) {
                Some((Some("publish_not_allowed"), NOT_ALLOWED.to_owned()))
            } else {
                None
            };
        if let Some((reason, error)) = refusal {
            if let Some(reason) = reason {
                ctx.metrics.refused.with_label_values(&[reason]).inc();
            }
            return self.reply(self.member.dialect.published(&PublishReply {
                channel: &channel,
                id: id.as_deref(),
                error: Some(&error),
                maybe_published: None,
            }));
        }
        let publication = Publication {
            channel,
            payload,
            idempotency_key: None,
        };
        let sent = crate::publish::client_publish(
            ctx.hub.clone(),
            self.member.dialect.clone(),
            publication,
            id,
            ctx.subscribe_timeout,
        );
        self.publishing
            .get_or_insert_with(FuturesUnordered::new)
            .push(Box::pin(sent));
    }

    /// Ends a held subscription the client may no longer have.
    fn revoke(&mut self, ctx: &SessionContext, topic: Topic) {
        let Some(held) = self.held.remove(&topic) else {
            return;
        };
        ctx.metrics
            .refused
            .with_label_values(&["not_allowed"])
            .inc();
        if let Stage::Active(sub) = &held.stage {
            sub.stop();
        }
        let answered = !held.stage.is_authorising()
            && ctx
                .hub
                .unsubscribe(self.member.id, &topic, held.stage.sub())
                == Removed::Active;
        if answered {
            self.reply(self.member.dialect.revoked(&topic, NOT_ALLOWED));
        } else {
            self.ack(
                AckKind::Subscribe,
                &topic,
                held.id.as_deref(),
                Some(NOT_ALLOWED),
            );
        }
    }

    /// Leaves every topic: the connection is ending.
    fn leave(&mut self, ctx: &SessionContext) {
        for (topic, held) in &self.held {
            if let Stage::Active(sub) = &held.stage {
                sub.stop();
            }
            if !held.stage.is_authorising() {
                ctx.hub.unsubscribe(self.member.id, topic, held.stage.sub());
            }
        }
        self.held.clear();
    }
}

/// Checks a channel or pattern name against the server's rules.
fn validate(topic: &Topic, max_bytes: usize) -> Result<(), String> {
    let (name, kind) = (topic.name(), topic.kind());
    if name.is_empty() {
        return Err(format!("invalid {kind}: empty"));
    }
    if name.len() > max_bytes {
        return Err(format!(
            "{kind} too long ({} bytes, max {max_bytes})",
            name.len()
        ));
    }
    if name.iter().any(|b| b.is_ascii_control()) {
        return Err(format!(
            "invalid {kind}: control characters are not allowed"
        ));
    }
    Ok(())
}
