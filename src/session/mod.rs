//! One client session, from admission to its end, whatever its dialect and
//! transport.
//!
//! A session is one task. It owns the client's [`Conversation`] (its
//! dialect's state), its [`Session`] (the dialect-blind requests: limits,
//! ACLs, the callback, hub calls) and its outbox, and drives its link:
//!
//! - a WebSocket: it reads frames and writes whatever the outbox holds, a
//!   whole batch per flush, making write progress and reading in one poll so
//!   that a client that does not read never blocks the timers, the reader or
//!   the broker waits;
//! - long-polls ([`link::Poll`]): each is answered with its own replies once
//!   the requests it carried are answered (every wait remembers the poll it
//!   came in); a held connect ([`crate::protocol::Step::Hold`]) is answered
//!   with the deliveries queued meanwhile, when there are some or its time
//!   is up.
//!
//! A session whose dialect lingers ([`Conversation::linger`], a Bayeux
//! clientId) outlives its link: it is found by key in [`Clients`] and takes
//! the next WebSocket or poll as an [`Attach`]; it ends when none comes in
//! time. Otherwise it ends with its link.
//!
//! Requests are served by [`Session`] (`requests.rs`): a subscribe passes
//! the limits, the ACLs, the callback and the broker; a publish the name,
//! the rate and both publish lists ([`crate::publish::client_may_publish`]),
//! then the broker.
//!
//! It ends when the client leaves, on a fatal protocol error, when the outbox
//! overflows (close 4008, slow consumer), when the server drains (close 1012,
//! at this session's moment in the drain window) or stops (close 1001), when
//! the client shows no sign of life for `WSGATE_PONG_TIMEOUT_MS` (close 4009;
//! the server pings every `WSGATE_PING_INTERVAL_MS`), or when its token
//! expires (close 4001, unless a `refresh` brought a new one). Whatever the
//! reason, it leaves every topic it held, so the hub's refcounts stay exact.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll as TaskPoll;
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch};
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tracing::debug;

use crate::acl::Acl;
use crate::auth::{Identity, Verifier};
use crate::authz::Authz;
use crate::handoff::{self, Handoff, Record};
use crate::hub::Hub;
use crate::limits::IpSlot;
use crate::metrics::Metrics;
use crate::outbox::{Out, Outbox, State};
use crate::pattern_cost::PatternLimits;
use crate::protocol::{Answer, Conversation, Frame, Inbound, Step};
use crate::shutdown::Phase;

pub mod clients;
pub mod control;
pub mod direct;
pub mod link;
mod requests;
pub mod services;
pub mod users;

pub use clients::Clients;
pub use control::{Control, Inbox, InboxSender};
pub use link::{Attach, BoxSocket, Poll};
pub use requests::{validate, Outcome, Session};
pub use users::Users;

use link::{End, Io, Writer};

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
/// The refusal when the broker gave no answer in time.
pub const BROKER_UNAVAILABLE: &str = "broker unavailable";

/// Holds one of the `WSGATE_MAX_CONNECTIONS` places; gives it back on drop.
pub struct SessionSlot {
    sessions: watch::Sender<usize>,
}

impl SessionSlot {
    /// Takes a place among `max`, unless all are taken.
    pub fn take(sessions: &watch::Sender<usize>, max: usize) -> Option<SessionSlot> {
        let admitted = sessions.send_if_modified(|n| {
            if *n >= max {
                return false;
            }
            *n += 1;
            true
        });
        admitted.then(|| SessionSlot {
            sessions: sessions.clone(),
        })
    }
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        self.sessions.send_modify(|n| *n = n.saturating_sub(1));
    }
}

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
    /// Messages per second (and burst size) this connection's recoveries
    /// may read (`WSGATE_HISTORY_READ_RATE`).
    pub history_read_rate: usize,
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
    /// Where sessions that outlive their links are found by key.
    pub clients: Clients,
    /// Where a fresh keyed session is offered to the other nodes, and taken.
    pub handoff: Handoff,
    /// `WSGATE_NODE_ID`, for the handoff record.
    pub node_id: Arc<str>,
    /// The node's call router (services).
    pub rpc: crate::rpc::Rpc,
    /// `WSGATE_CALL_ALLOW`: what every connection may call.
    pub call_allow: Arc<Acl>,
    /// Largest call parameters, in bytes.
    pub max_call_bytes: usize,
    /// Calls one connection may have waiting.
    pub max_calls_in_flight: usize,
    /// This node's sessions by user, for the operator's orders.
    pub users: Users,
    /// nodefony's TCP backends (`WSGATE_TCP_SERVICES`), their bounds and the
    /// node's places.
    pub tcp: Arc<services::TcpBackends>,
}

/// The link a session starts with.
pub enum Link {
    /// An upgraded WebSocket.
    Socket(BoxSocket),
    /// An upgraded WebSocket whose outbox writes it directly. Boxed: it is
    /// turned into a socket as the session starts, and the session's
    /// future keeps room for its argument for its whole life.
    Direct(Box<direct::Direct>),
    /// A long-poll (a Bayeux handshake over HTTP).
    Poll(Poll),
}

/// A connect being held: answered by [`Conversation::release`] at `until`,
/// or earlier when something is queued for a long-polling client.
struct Holding {
    /// The long-poll it came in; `None` over a WebSocket.
    poll: Option<Pending>,
    until: tokio::time::Instant,
}

/// A long-poll not answered yet: its number (the origin of its requests)
/// and the replies gathered for it so far. Each poll is answered with its
/// own replies (CometD fails a request whose response is empty, and wants a
/// connect's reply in the connect's own response); deliveries go with a
/// held connect's reply.
struct Pending {
    serial: u64,
    respond: oneshot::Sender<Vec<Frame>>,
    frames: Vec<Frame>,
}

impl Pending {
    fn new(serial: u64, respond: oneshot::Sender<Vec<Frame>>) -> Pending {
        Pending {
            serial,
            respond,
            frames: Vec::new(),
        }
    }

    fn answer(self, mut more: Vec<Frame>) {
        let mut frames = self.frames;
        frames.append(&mut more);
        let _ = self.respond.send(frames);
    }
}

/// What serving one inbound message asks of the loop.
#[derive(Default)]
struct Effects {
    hold: Option<Duration>,
    route: Option<String>,
    bind: Option<String>,
    end: bool,
}

impl Effects {
    /// True when carrying these out needs the handoff store ([`act`]).
    fn waits(&self) -> bool {
        self.bind.is_some() || self.route.is_some()
    }
}

/// The most long-polls waiting for their requests' answers; one more is
/// answered at once with what is queued (its answers follow in a later one).
const MAX_POLLS: usize = 4;

/// Runs a session until it ends.
///
/// Not an `async fn` itself: the context is boxed before the session's
/// future is built, so that future holds one pointer instead of a second
/// copy of the context beside the one it moves out of its arguments (idle
/// sockets are mostly this future: measured ~0.7 KiB each).
pub fn run(
    first: Link,
    conv: Box<dyn Conversation>,
    ctx: SessionContext,
) -> impl std::future::Future<Output = ()> + Send {
    session_loop(first, conv, Box::new(ctx))
}

/// The session's loop ([`run`]).
async fn session_loop(first: Link, mut conv: Box<dyn Conversation>, mut ctx: Box<SessionContext>) {
    let (outbox, first) = match first {
        Link::Direct(d) => {
            let stream = Arc::new(d.stream);
            let outbox = Arc::new(Outbox::direct(ctx.queue_bytes, stream.clone()));
            let io = direct::SplitIo::new(stream, d.prefix, outbox.clone());
            let ws: BoxSocket = if d.inflate {
                let limit = d.config.max_message_size.unwrap_or(usize::MAX);
                let io = crate::deflate::inflate::InflateIo::new(io, limit);
                Box::new(WebSocketStream::from_raw_socket(io, Role::Server, Some(d.config)).await)
            } else {
                Box::new(WebSocketStream::from_raw_socket(io, Role::Server, Some(d.config)).await)
            };
            (outbox, Link::Socket(ws))
        }
        link => (Arc::new(Outbox::new(ctx.queue_bytes)), link),
    };
    let member = ctx.hub.join_node(outbox, conv.render());
    // The socket the outbox writes itself, if it does; `blocked` while it is
    // full and the session waits for it to drain.
    let direct = member.outbox.stream().cloned();
    let mut blocked = false;
    ctx.metrics.connections.inc();
    let mut session = Session::new(member.clone(), ctx.subscribe_rate);
    if let Some(identity) = ctx.identity.take() {
        session.set_identity(&ctx, identity);
    }
    let mut items = VecDeque::new();
    let mut socket: Option<BoxSocket> = None;
    let mut writer = Writer::default();
    let mut polls: VecDeque<Pending> = VecDeque::new();
    let mut serials = 0u64;
    let mut holding: Option<Holding> = None;
    let mut binding = None;
    let mut first_text = None;
    match first {
        Link::Socket(s) => socket = Some(s),
        Link::Direct(_) => {}
        Link::Poll(poll) => {
            serials += 1;
            first_text = Some((poll.text, serials));
            polls.push_back(Pending::new(serials, poll.respond));
        }
    }
    let mut phase = ctx.phase.clone();
    // Timers for closing on our own (drain slot, token expiry, a lingering
    // session nobody came back to) and for a held connect: armed once and
    // reset only when their deadline changes, never re-created per wake-up.
    let mut drain = None;
    arm(
        &mut drain,
        phase.borrow().close_at(member.id).map(Into::into),
    );
    let mut expiry = None;
    let mut armed_expiry = None;
    let mut hold_timer = None;
    let mut armed_hold = None;
    let mut linger = None;
    let mut armed_linger = None;
    let mut detached_at = None;
    let mut keepalive = tokio::time::interval_at(
        (Instant::now() + ctx.ping_interval).into(),
        ctx.ping_interval,
    );
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_seen = Instant::now();
    let mut pending_text = first_text;
    let mut offered = None;
    // What the dialect asks before its client says anything.
    let mut opening = Vec::new();
    conv.open(&mut opening);
    if !opening.is_empty() {
        take_steps(&ctx, &mut session, conv.as_mut(), opening);
    }
    // Adopted from another node before it started (a long-poll): findable
    // here from the start.
    if let Some(key) = conv.key().map(str::to_owned) {
        bind(&ctx, key, &mut binding);
    }
    let end = 'run: loop {
        // An inbound message waiting to be served (the first poll's, or one
        // handed over with a socket).
        if let Some((text, serial)) = pending_text.take() {
            // A poll's replies are its own; a socket's are queued.
            if serial == 0 {
                session.set_origin(0);
            } else {
                session.capture(serial);
            }
            if offered.is_some() && !Box::pin(claimed(&ctx, &mut offered)).await {
                if let Some(key) = binding.as_ref().map(|b| b.key().to_owned()) {
                    session.reply_opt(conv.unknown(Inbound::Text(&text), &key));
                }
                gathered_into(&mut session, &mut polls, serial);
                break 'run End::Close(1000, "client served elsewhere".into());
            }
            let fx = serve(&ctx, &mut session, conv.as_mut(), Inbound::Text(&text));
            if serial != 0 {
                gathered_into(&mut session, &mut polls, serial);
            }
            let acted = if fx.waits() {
                Box::pin(act(
                    &ctx,
                    &mut session,
                    conv.as_mut(),
                    fx,
                    Inbound::Text(&text),
                    &mut socket,
                    &mut polls,
                    &mut holding,
                    &mut binding,
                    &mut offered,
                ))
                .await
            } else {
                let (hold, end) = (fx.hold, fx.end);
                settle(
                    &ctx,
                    &mut session,
                    conv.as_mut(),
                    hold,
                    end,
                    &mut socket,
                    &mut polls,
                    &mut holding,
                )
            };
            match acted {
                Acted::Continue => {}
                Acted::End(end) => break 'run end,
                Acted::Again(text) => pending_text = Some((text, serial)),
            }
        }
        if socket.is_none() && holding.as_ref().is_some_and(|h| h.poll.is_none()) {
            // A connect held over a WebSocket that has gone: its answer has
            // nowhere to go (the client sends a new connect on its next
            // link), and the session now waits for that link.
            holding = None;
            let _ = conv.release();
        }
        complete_polls(&session, &mut polls);
        if socket.is_none() {
            release_if_queued(&ctx, &mut session, conv.as_mut(), &mut items, &mut holding);
        }
        // Deadlines that follow the state.
        if session.expires_at() != armed_expiry {
            armed_expiry = session.expires_at();
            arm(&mut expiry, armed_expiry);
        }
        let hold_at = holding.as_ref().map(|h| h.until);
        if hold_at != armed_hold {
            armed_hold = hold_at;
            arm(&mut hold_timer, hold_at);
        }
        let detached = socket.is_none() && holding.is_none() && polls.is_empty();
        if !detached {
            detached_at = None;
        } else if detached_at.is_none() {
            detached_at = Some(tokio::time::Instant::now());
        }
        // Asked only while detached: not a call per wake-up of a busy socket.
        let linger_at = detached_at.map(|at| at + conv.linger().unwrap_or(Duration::ZERO));
        if linger_at != armed_linger {
            armed_linger = linger_at;
            arm(&mut linger, linger_at);
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
            _ = fire(&mut linger) => {
                debug!("session not resumed in time");
                break End::Gone;
            }
            _ = fire(&mut hold_timer) => {
                if let Some(h) = holding.take() {
                    release(&ctx, &mut session, conv.as_mut(), &mut items, h);
                }
            }
            _ = keepalive.tick(), if socket.is_some() => {
                if last_seen.elapsed() >= ctx.pong_timeout {
                    break End::Close(CLOSE_KEEPALIVE, "keepalive timeout".into());
                }
                session.reply(Frame::Ping);
            }
            io = poll_fn(|cx| match socket.as_mut() {
                Some(s) => link::poll_io(s, &mut writer, cx),
                None => TaskPoll::Pending,
            }), if socket.is_some() => match io {
                Io::Wrote(n) => {
                    ctx.metrics.frames_out.inc_by(n);
                    if let Some(end) = refill(&ctx, &mut session, &mut items, &mut writer) {
                        break end;
                    }
                }
                Io::WriteFailed(e) => {
                    debug!(cause = %e, "write failed");
                    if let Some(end) = lost(conv.as_ref(), &mut socket, End::Gone) {
                        break end;
                    }
                }
                Io::Read(frame) => {
                    last_seen = Instant::now();
                    let ended = match frame {
                        None => Err(End::Gone),
                        Some(Ok(Message::Close(_))) => Err(End::ClientClosed),
                        Some(Ok(m)) => Ok(m),
                        Some(Err(e)) => Err(link::read_error(e)),
                    };
                    let frame = match ended {
                        Ok(frame) => frame,
                        Err(end) => match lost(conv.as_ref(), &mut socket, end) {
                            Some(end) => break end,
                            None => continue,
                        },
                    };
                    let inbound = match &frame {
                        Message::Text(t) => Inbound::Text(t.as_str()),
                        Message::Binary(b) => Inbound::Binary(b),
                        _ => continue, // pings and pongs: only signs of life
                    };
                    session.set_origin(0);
                    if offered.is_some() && !Box::pin(claimed(&ctx, &mut offered)).await {
                        if let Some(key) = binding.as_ref().map(|b| b.key().to_owned()) {
                            session.reply_opt(conv.unknown(inbound, &key));
                        }
                        break End::Close(1000, "client served elsewhere".into());
                    }
                    let fx = serve(&ctx, &mut session, conv.as_mut(), inbound);
                    let acted = if fx.waits() {
                        Box::pin(act(
                            &ctx, &mut session, conv.as_mut(), fx, inbound, &mut socket,
                            &mut polls, &mut holding, &mut binding, &mut offered,
                        )).await
                    } else {
                        let (hold, end) = (fx.hold, fx.end);
                        settle(&ctx, &mut session, conv.as_mut(), hold, end, &mut socket, &mut polls, &mut holding)
                    };
                    match acted {
                        Acted::Continue => {}
                        Acted::End(end) => break end,
                        Acted::Again(text) => pending_text = Some((text, 0)),
                    }
                }
            },
            _ = writable(&direct), if blocked => {
                member.outbox.unblock();
                match write_direct(&ctx, &mut session) {
                    Ok(b) => blocked = b,
                    Err(end) => break end,
                }
            }
            _ = member.outbox.ready(), if socket.is_none() || !writer.busy() => {
                // Without a socket, waking is enough: the top of the loop
                // answers a held long-poll connect with what was queued.
                if direct.is_some() {
                    match write_direct(&ctx, &mut session) {
                        Ok(b) => blocked = b,
                        Err(end) => break end,
                    }
                } else if socket.is_some() {
                    if let Some(end) = refill(&ctx, &mut session, &mut items, &mut writer) {
                        break end;
                    }
                }
            }
            attached = recv(&binding) => {
                match attached {
                    Attach::Socket(s, text) => {
                        // Faye moves from long-polling to a WebSocket: a
                        // connect held over HTTP is answered now.
                        if let Some(h) = holding.take() {
                            release(&ctx, &mut session, conv.as_mut(), &mut items, h);
                        }
                        socket = Some(s);
                        writer.start();
                        last_seen = Instant::now();
                        pending_text = Some((text, 0));
                    }
                    Attach::Poll(poll) => {
                        serials += 1;
                        polls.push_back(Pending::new(serials, poll.respond));
                        pending_text = Some((poll.text, serials));
                    }
                }
            }
            (origin, outcome) = session.next_outcome() => {
                let outcome = match outcome {
                    Outcome::Control(control) => match session.control(&ctx, conv.as_mut(), control) {
                        Some(end) => break end,
                        None => continue,
                    },
                    outcome => outcome,
                };
                // The answer goes to the poll that asked, while it waits.
                let asked = polls
                    .iter_mut()
                    .find(|p| p.serial == origin)
                    .or(holding.as_mut().and_then(|h| h.poll.as_mut()).filter(|p| p.serial == origin));
                match asked {
                    Some(p) if origin != 0 => {
                        session.capture(origin);
                        session.outcome(&ctx, conv.as_mut(), outcome);
                        p.frames.extend(session.gathered());
                    }
                    _ => {
                        session.set_origin(origin);
                        session.outcome(&ctx, conv.as_mut(), outcome);
                    }
                }
            }
        }
    };
    session.leave(&ctx);
    ctx.hub.leave_node(member.id);
    ctx.metrics.connections.dec();
    let mut rest = VecDeque::new();
    if direct.is_some() {
        // What is queued stays in the outbox: the close goes out after it.
    } else if session.drain(&ctx.metrics, &mut items, &mut rest) != State::Open {
        rest.clear();
    }
    // Replies go to the polls that asked (a disconnect's to its own); a
    // held connect gets its own reply, and what is left if nobody else
    // could take it.
    for poll in polls.drain(..) {
        poll.answer(Vec::new());
    }
    if let Some(h) = holding.take() {
        rest.extend(conv.release());
        if let Some(poll) = h.poll {
            poll.answer(std::mem::take(&mut rest).into());
        }
    }
    if let Some(mut s) = socket.take() {
        match &direct {
            Some(stream) => link::finish_direct(&mut s, &member.outbox, stream, end).await,
            None => link::finish(&mut s, writer, rest, end).await,
        }
    }
    member.outbox.close();
    drop(binding);
}

/// The socket ended with `end`: the session ends too, unless its dialect
/// lingers for the client to come back; then the socket alone is closed as
/// `end` says (a 1009 for a frame too big is still sent), on its own task
/// so that the session is not held up by it.
fn lost(conv: &dyn Conversation, socket: &mut Option<BoxSocket>, end: End) -> Option<End> {
    if conv.linger().is_none() {
        return Some(end);
    }
    if let Some(mut s) = socket.take() {
        tokio::spawn(async move {
            link::finish(&mut s, Writer::default(), VecDeque::new(), end).await;
        });
    }
    None
}

/// Resolves when the direct socket can take bytes again (never without one).
async fn writable(direct: &Option<Arc<tokio::net::TcpStream>>) {
    match direct {
        Some(stream) => {
            // An error shows again on the next write, which ends the session.
            let _ = stream.writable().await;
        }
        None => std::future::pending().await,
    }
}

/// Writes a direct outbox until it is written or the socket is full
/// (`Ok(true)`: wait for it to drain), rendering the gap marks it reaches
/// from this session's own subscriptions.
fn write_direct(ctx: &SessionContext, session: &mut Session) -> Result<bool, End> {
    loop {
        let (frames, out) = session.member.outbox.write_out();
        ctx.metrics.frames_out.inc_by(frames);
        match out {
            Out::Done => return Ok(false),
            Out::Blocked => return Ok(true),
            Out::Mark => session.render_front_mark(&ctx.metrics),
            Out::Failed => {
                return Err(match session.member.outbox.state() {
                    State::Overflowed => End::Close(CLOSE_SLOW_CONSUMER, "slow consumer".into()),
                    _ => End::Gone,
                })
            }
        }
    }
}

/// Moves what is queued into the writer. `Some` when the session must end.
fn refill(
    ctx: &SessionContext,
    session: &mut Session,
    items: &mut VecDeque<crate::outbox::Item>,
    writer: &mut Writer,
) -> Option<End> {
    match session.drain(&ctx.metrics, items, &mut writer.batch) {
        State::Open => {}
        State::Overflowed => return Some(End::Close(CLOSE_SLOW_CONSUMER, "slow consumer".into())),
        State::Closed => return Some(End::Gone),
    }
    writer.start();
    None
}

/// Serves one inbound message: each step of it, in order. The steps live
/// only as long as the message: an idle socket keeps no buffer for them.
fn serve(
    ctx: &SessionContext,
    session: &mut Session,
    conv: &mut dyn Conversation,
    inbound: Inbound<'_>,
) -> Effects {
    let mut steps = Vec::new();
    conv.decode(inbound, &mut steps);
    take_steps(ctx, session, conv, steps)
}

/// Serves the steps of one message (or of the connection's opening), in
/// order.
fn take_steps(
    ctx: &SessionContext,
    session: &mut Session,
    conv: &mut dyn Conversation,
    mut steps: Vec<Step>,
) -> Effects {
    let mut fx = Effects::default();
    for step in steps.drain(..) {
        match step {
            Step::Request(request) => session.handle(ctx, conv, request),
            Step::Reply(frame) => session.reply(frame),
            Step::Malformed(frame) => {
                ctx.metrics.malformed_frames.inc();
                session.reply(frame);
            }
            Step::Authenticated(identity) => session.set_identity(ctx, identity),
            Step::Bind(key) => fx.bind = Some(key),
            Step::Route(key) => {
                fx.route = Some(key);
                break;
            }
            Step::Hold(wait) => fx.hold = Some(wait),
            Step::End => fx.end = true,
        }
    }
    // Anything after a route (dropped with the drain) is for the other
    // session, which serves the whole message again.
    fx
}

/// What [`act`] decided.
enum Acted {
    Continue,
    End(End),
    /// The session adopted the client the message named: serve it again.
    Again(String),
}

/// Carries out what serving a message asked of the loop.
#[allow(clippy::too_many_arguments)]
async fn act(
    ctx: &SessionContext,
    session: &mut Session,
    conv: &mut dyn Conversation,
    fx: Effects,
    inbound: Inbound<'_>,
    socket: &mut Option<BoxSocket>,
    polls: &mut VecDeque<Pending>,
    holding: &mut Option<Holding>,
    binding: &mut Option<clients::Binding>,
    offered: &mut Option<String>,
) -> Acted {
    if let Some(key) = fx.bind {
        // Findable here at once, and by the other nodes until a first
        // message claims it (offered before the handshake is answered).
        let record = Record::new(session.identity(), &ctx.node_id).encode();
        let ttl = conv.linger().unwrap_or(Duration::from_secs(60));
        if let Err(e) = ctx.handoff.offer(&key, record, ttl).await {
            debug!(cause = ?e, "fresh session not offered to the other nodes");
        } else {
            *offered = Some(key.clone());
        }
        bind(ctx, key, binding);
    }
    if let Some(key) = fx.route {
        let raw = match inbound {
            Inbound::Text(t) => Some(t),
            Inbound::Binary(_) => None,
        };
        let to = ctx.clients.get(&key).zip(raw);
        if let Some((to, raw)) = to {
            if let Some(s) = socket.take() {
                match to.push(Attach::Socket(s, raw.to_owned())) {
                    Ok(()) => return Acted::End(End::Gone),
                    Err(Attach::Socket(s, _)) => *socket = Some(s),
                    Err(Attach::Poll(_)) => {}
                }
            }
        }
        // Issued by another node and not used yet: this node adopts it, with
        // the identity its handshake proved.
        if let (Some(raw), true) = (raw, binding.is_none()) {
            if let Some(identity) = handoff::adopt(&ctx.handoff, &key).await {
                if conv.adopt(&key) {
                    if let Some(identity) = identity {
                        session.set_identity(ctx, identity);
                    }
                    bind(ctx, key, binding);
                    return Acted::Again(raw.to_owned());
                }
            }
        }
        session.answer(conv, Answer::UnknownClient { key: &key });
    }
    settle(ctx, session, conv, fx.hold, fx.end, socket, polls, holding)
}

/// The part of [`act`] that never waits: holding a connect, bounding the
/// waiting polls, ending. Most messages need only this, so the loop calls
/// it directly and boxes `act`'s future only for a message that binds or
/// routes a client (the session's future would otherwise keep room for it
/// on every idle socket).
#[allow(clippy::too_many_arguments)]
fn settle(
    ctx: &SessionContext,
    session: &mut Session,
    conv: &mut dyn Conversation,
    hold: Option<Duration>,
    end: bool,
    socket: &mut Option<BoxSocket>,
    polls: &mut VecDeque<Pending>,
    holding: &mut Option<Holding>,
) -> Acted {
    if let Some(wait) = hold {
        if let Some(h) = holding.take() {
            let mut items = VecDeque::new();
            release(ctx, session, conv, &mut items, h);
        }
        // A connect over a poll is held by that poll; over a WebSocket, by
        // the socket.
        let poll = if socket.is_none() {
            polls.pop_back()
        } else {
            None
        };
        *holding = Some(Holding {
            poll,
            until: tokio::time::Instant::now() + wait,
        });
    }
    if polls.len() > MAX_POLLS {
        if let Some(oldest) = polls.pop_front() {
            oldest.answer(Vec::new());
        }
    }
    if end {
        return Acted::End(End::Close(1000, "disconnected".into()));
    }
    Acted::Continue
}

/// Makes this session findable on this node by `key`.
fn bind(ctx: &SessionContext, key: String, binding: &mut Option<clients::Binding>) {
    if let Some(b) = ctx.clients.bind(key) {
        *binding = Some(b);
    }
}

/// A session offered to the other nodes claims itself back before it serves
/// its client's first message: `false` when another node took it first
/// (then that node serves the client, and this session must not). A store
/// that cannot be reached leaves it here: no other node could take it
/// either.
async fn claimed(ctx: &SessionContext, offered: &mut Option<String>) -> bool {
    match offered.take() {
        Some(key) => !matches!(ctx.handoff.take(&key).await, Ok(None)),
        None => true,
    }
}

/// Moves the replies gathered while serving poll `serial` into its answer.
fn gathered_into(session: &mut Session, polls: &mut VecDeque<Pending>, serial: u64) {
    let gathered = session.gathered();
    if let Some(p) = polls.iter_mut().find(|p| p.serial == serial) {
        p.frames.extend(gathered);
    }
}

/// Answers the long-polls whose own requests are all answered, each with
/// its own replies.
fn complete_polls(session: &Session, polls: &mut VecDeque<Pending>) {
    if polls.iter().all(|p| session.waiting_for(p.serial)) {
        return;
    }
    let (done, waiting): (Vec<Pending>, Vec<Pending>) = polls
        .drain(..)
        .partition(|p| !session.waiting_for(p.serial));
    polls.extend(waiting);
    for poll in done {
        poll.answer(Vec::new());
    }
}

/// A held long-poll connect is answered as soon as something is queued.
fn release_if_queued(
    ctx: &SessionContext,
    session: &mut Session,
    conv: &mut dyn Conversation,
    items: &mut VecDeque<crate::outbox::Item>,
    holding: &mut Option<Holding>,
) {
    if holding.as_ref().is_some_and(|h| h.poll.is_some()) && !session.member.outbox.is_empty() {
        if let Some(h) = holding.take() {
            release(ctx, session, conv, items, h);
        }
    }
}

/// Answers a held connect: over a poll, with what is queued and the connect
/// reply last; over a WebSocket, by queuing the reply.
fn release(
    ctx: &SessionContext,
    session: &mut Session,
    conv: &mut dyn Conversation,
    items: &mut VecDeque<crate::outbox::Item>,
    holding: Holding,
) {
    let reply = conv.release();
    match holding.poll {
        Some(poll) => {
            let mut frames = VecDeque::new();
            session.drain(&ctx.metrics, items, &mut frames);
            frames.extend(reply);
            ctx.metrics.frames_out.inc_by(frames.len() as u64);
            poll.answer(frames.into());
        }
        None => {
            if let Some(reply) = reply {
                session.reply(reply);
            }
        }
    }
}

/// The next link handed over; pending forever when the session has no key.
async fn recv(binding: &Option<clients::Binding>) -> Attach {
    match binding {
        Some(b) => b.inbox().next().await,
        None => std::future::pending().await,
    }
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
