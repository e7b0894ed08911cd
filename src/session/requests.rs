//! A client's requests, whatever its dialect: subscribe, unsubscribe,
//! publish, ping, refresh.
//!
//! A subscribe passes, in order: name validation, the per-connection limits,
//! the ACLs ([`crate::acl`]: `WSGATE_ALLOW`, then the token's `subscribe`
//! claim; refused as [`Refusal::NotAllowed`]), then the authorisation callback
//! ([`crate::authz`]) when configured, whose answer is awaited beside the
//! other requests (the subscribe is answered when decided), and finally the
//! broker. Answers are rendered by the connection's [`Conversation`] and
//! queued in its outbox; nothing here knows a wire format.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use tracing::warn;

use super::control::{Control, Inbox};
use super::link::End;
use super::services::{self, Lines, ServiceDone};
use super::users::Registration;
use super::{SessionContext, AUTHZ_UNAVAILABLE, BROKER_UNAVAILABLE, NOT_ALLOWED};
use crate::auth::Identity;
use crate::authz::{AuthzError, Decision, Question};
use crate::broker::{BrokerError, BrokerMessage, Publication, PublishError, Topic};
use crate::history::{self, Position, Query, Read, Since};
use crate::hub::{Joined, Member, Removed, Sub};
use crate::metrics::Metrics;
use crate::outbox::{Item, State};
use crate::pattern_cost;
use crate::presence::{Members, Who};
use crate::protocol::{
    Ack, AckKind, Answer, Call, Conversation, Frame, Notice, NoticeKind, Refusal, Request,
};
use crate::read_rate::Bucket;
use crate::rpc::{CallError, Outgoing};

/// A publish waiting for the broker: resolves to (channel, id, outcome).
type Publishing =
    Pin<Box<dyn Future<Output = (u64, (Bytes, Option<String>, Result<(), PublishError>))> + Send>>;

/// A call waiting for its service: resolves to (id, outcome).
type Calling =
    Pin<Box<dyn Future<Output = (u64, (Option<String>, Result<Bytes, CallError>))> + Send>>;

/// An awaited answer, for [`Session::outcome`].
pub enum Outcome {
    /// A call ended.
    Called(Option<String>, Result<Bytes, CallError>),
    /// A message of the session's inbox (see [`super::control`]).
    Control(Control),
    /// A TCP backend connection was opened, or a JSON-RPC call ended
    /// (see [`super::services`]).
    Service(ServiceDone),
    /// The broker answered a publish (or the wait timed out).
    Published(Bytes, Option<String>, Result<(), PublishError>),
    /// The broker answered (or the wait timed out).
    Confirmed(Topic, u64, Result<(), BrokerError>),
    /// The authorisation callback answered.
    Authorised(Topic, u64, Result<Decision, AuthzError>),
    /// A presence read ended (or timed out).
    Presence(Bytes, Option<String>, bool, Result<Members, Refusal>),
    /// A recovering subscribe's history reads ended (`None`: timed out);
    /// `false`: some channel of its `since` keeps no history or was not
    /// read; then the messages its reads took from the history read rate.
    Recovered(Topic, u64, Option<Vec<ChannelRead>>, bool, usize),
}

/// The next finished wait in a lazily allocated set; `None` at once when
/// nothing waits (which disables that `select!` branch for the iteration).
pub(super) async fn next_done<F: Future + Unpin>(
    set: &mut Option<FuturesUnordered<F>>,
) -> Option<F::Output> {
    match set {
        Some(s) => s.next().await,
        None => None,
    }
}

/// A subscribe waiting for the broker: resolves to (topic, seq, outcome).
type Waiting = Pin<Box<dyn Future<Output = (u64, (Topic, u64, Result<(), BrokerError>))> + Send>>;

/// One channel's recovery read: the channel, where it resumes, the read.
type ChannelRead = (Bytes, Position, Result<Read, BrokerError>);

/// A recovering subscribe's history reads: resolves to (topic, seq, the
/// reads, or `None` when they timed out, whether every channel of its
/// `since` keeps history and was read, and the messages taken from the
/// history read rate for them).
type Recovering = Pin<
    Box<dyn Future<Output = (u64, (Topic, u64, Option<Vec<ChannelRead>>, bool, usize))> + Send>,
>;

/// Why a recovering subscribe is refused while its connection's history
/// read rate (`WSGATE_HISTORY_READ_RATE`) is spent.
pub(super) const HISTORY_RATE: &str = "history read rate exceeded";

/// A presence read: resolves to (channel, id, stats, outcome).
type Presencing = Pin<
    Box<dyn Future<Output = (u64, (Bytes, Option<String>, bool, Result<Members, Refusal>))> + Send>,
>;

/// Why a presence request (or `join_leave`) is refused on a channel that
/// keeps no presence.
pub(super) const NO_PRESENCE: &str = "channel has no presence";

/// A subscribe waiting for the authorisation callback.
type Authorising =
    Pin<Box<dyn Future<Output = (u64, (Topic, u64, Result<Decision, AuthzError>))> + Send>>;

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
    /// The history positions the subscribe recovers from (`since`).
    since: Option<Since>,
    /// Active, but its reply waits for the history read (see
    /// `Session::recovered`): an unsubscribe meanwhile answers it first.
    recovering: bool,
    /// Asked for the channel's join and leave events (`docs/presence.md`).
    join_leave: bool,
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

/// One client's requests, dialect-blind: see the module docs.
pub struct Session {
    /// Its place in the hub.
    pub member: Arc<Member>,
    held: HashMap<Topic, Held>,
    /// Subscribes waiting for the broker; allocated only while there are some
    /// (an idle socket should cost as little memory as possible).
    waiting: Option<FuturesUnordered<Waiting>>,
    /// Subscribes waiting for the authorisation callback; likewise lazy.
    authorising: Option<FuturesUnordered<Authorising>>,
    /// Publishes waiting for the broker; likewise lazy.
    publishing: Option<FuturesUnordered<Publishing>>,
    /// Recovering subscribes' history reads; likewise lazy.
    recovering: Option<FuturesUnordered<Recovering>>,
    /// Presence reads; likewise lazy.
    presencing: Option<FuturesUnordered<Presencing>>,
    /// Calls waiting for their services; likewise lazy, and at most
    /// `WSGATE_MAX_CALLS_IN_FLIGHT`.
    calling: Option<FuturesUnordered<Calling>>,
    /// Orders and backend lines addressed to this session; created on first
    /// use ([`Session::inbox`]).
    inbox: Inbox,
    /// Its lines to services (`/service/<name>`); allocated on first use.
    pub(super) lines: Option<Box<Lines>>,
    /// Which inbound message the requests being served came in (a
    /// long-poll's number): every wait remembers it, so that its answer goes
    /// back to that poll.
    origin: u64,
    /// The origins of the waits in progress, one entry per wait.
    origins: Vec<u64>,
    /// Replies are gathered here instead of queued (a long-poll's own
    /// answer), while set.
    capture: RefCell<Option<Vec<Frame>>>,
    seq: u64,
    /// The subscribe rate (`WSGATE_SUBSCRIBE_RATE`): one token per
    /// subscribe, presence or call request.
    bucket: Bucket,
    /// Messages this connection's recoveries may still read
    /// (`WSGATE_HISTORY_READ_RATE`); boxed and made on first use, so a
    /// socket that never recovers pays one pointer.
    history_reads: Option<Box<Bucket>>,
    /// The verified token, when authentication is on.
    identity: Option<Identity>,
    /// When the token expires: the socket is closed with 4001 then.
    expires_at: Option<tokio::time::Instant>,
    /// Its entry among this node's sessions of its user, while it has one.
    user: Option<Registration>,
}

/// How `available` history messages are shared by `channels` reads: evenly,
/// at most [`history::RECOVERY_LIMIT`] each, the remainder one more each to
/// the first ones.
fn shares(available: usize, channels: usize) -> Vec<usize> {
    let Some(share) = available.checked_div(channels) else {
        return Vec::new();
    };
    let share = share.min(history::RECOVERY_LIMIT);
    let rest = available.saturating_sub(share * channels);
    (0..channels)
        .map(|i| (share + usize::from(i < rest)).min(history::RECOVERY_LIMIT))
        .collect()
}

impl Session {
    /// A session for a member that just joined the hub.
    pub fn new(member: Arc<Member>, subscribe_rate: usize) -> Session {
        Session {
            member,
            held: HashMap::new(),
            waiting: None,
            authorising: None,
            publishing: None,
            recovering: None,
            presencing: None,
            calling: None,
            inbox: Inbox::default(),
            lines: None,
            origin: 0,
            origins: Vec::new(),
            capture: RefCell::new(None),
            seq: 0,
            bucket: Bucket::new(subscribe_rate, Instant::now()),
            history_reads: None,
            expires_at: None,
            identity: None,
            user: None,
        }
    }

    /// Who the client is, when authentication is on.
    pub fn identity(&self) -> Option<&Identity> {
        self.identity.as_ref()
    }

    /// When the token expires, if there is one.
    pub fn expires_at(&self) -> Option<tokio::time::Instant> {
        self.expires_at
    }

    /// Queues a frame for the client (or gathers it, see [`Session::capture`]).
    pub fn reply(&self, frame: Frame) {
        if let Some(gathered) = self.capture.borrow_mut().as_mut() {
            gathered.push(frame);
            return;
        }
        self.member.outbox.push(frame);
    }

    /// From now on, answers belong to inbound message `origin`, and replies
    /// are gathered (for a long-poll's own response) until [`Session::gathered`].
    pub fn capture(&mut self, origin: u64) {
        self.origin = origin;
        *self.capture.get_mut() = Some(Vec::new());
    }

    /// The replies gathered since [`Session::capture`]; replies are queued
    /// again from now on.
    pub fn gathered(&mut self) -> Vec<Frame> {
        self.capture.get_mut().take().unwrap_or_default()
    }

    /// Answers belong to inbound message `origin` (no gathering: a WebSocket).
    pub fn set_origin(&mut self, origin: u64) {
        self.origin = origin;
    }

    /// Whether a request of inbound message `origin` still waits.
    pub fn waiting_for(&self, origin: u64) -> bool {
        self.origins.contains(&origin)
    }

    /// Records a wait for a request of the current inbound message: its
    /// poll is answered once the wait ends. Returns that message's origin.
    pub(super) fn started(&mut self) -> u64 {
        self.origins.push(self.origin);
        self.origin
    }

    /// Takes a token of the subscribe rate limit, if there is one.
    pub(super) fn take_token(&mut self) -> bool {
        self.bucket.take(1, Instant::now()).is_ok()
    }

    /// This connection's history read budget, made full on first use.
    fn history_reads(&mut self, ctx: &SessionContext) -> &mut Bucket {
        self.history_reads
            .get_or_insert_with(|| Box::new(Bucket::new(ctx.history_read_rate, Instant::now())))
    }

    /// Calls of this connection waiting for their services.
    pub(super) fn calls_in_flight(&self) -> usize {
        self.calling.as_ref().map_or(0, FuturesUnordered::len)
    }

    /// Queues a frame, if there is one.
    pub fn reply_opt(&self, frame: Option<Frame>) {
        if let Some(frame) = frame {
            self.reply(frame);
        }
    }

    /// Queues what the conversation makes of `answer`.
    pub fn answer(&self, conv: &mut dyn Conversation, answer: Answer<'_>) {
        let mut frames = Vec::new();
        conv.answer(answer, &mut frames);
        for frame in frames {
            self.reply(frame);
        }
    }

    fn ack(
        &self,
        conv: &mut dyn Conversation,
        kind: AckKind,
        topic: &Topic,
        id: Option<&str>,
        error: Option<&Refusal>,
    ) {
        self.answer(
            conv,
            Answer::Ack(Ack {
                kind,
                topic,
                id,
                error,
                recovered: None,
            }),
        );
    }

    /// Serves one request; its answer is queued now or when it is decided.
    pub fn handle(&mut self, ctx: &SessionContext, conv: &mut dyn Conversation, request: Request) {
        match request {
            Request::Subscribe {
                topic,
                id,
                ext,
                since,
                join_leave,
            } => self.subscribe(ctx, conv, topic, id, ext, since, join_leave),
            Request::Presence { channel, id, stats } => {
                self.presence(ctx, conv, channel, id, stats)
            }
            Request::Unsubscribe { topic, id } => self.unsubscribe(ctx, conv, topic, id),
            Request::Ping { id } => self.answer(conv, Answer::Pong { id: id.as_deref() }),
            Request::Refresh { token, id } => self.refresh(ctx, conv, &token, id.as_deref()),
            Request::Publish {
                channel,
                payload,
                id,
            } => self.publish(ctx, conv, channel, payload, id),
            Request::Call(call) => self.call(ctx, conv, call),
            Request::ServiceSubscribe { service, id } => {
                self.service_subscribe(ctx, conv, service, id)
            }
            Request::ServiceUnsubscribe { service, id } => {
                self.service_unsubscribe(conv, service, id)
            }
            Request::ServicePublish { service, data, id } => {
                self.service_publish(ctx, conv, service, data, id)
            }
        }
    }

    /// Why a call to `destination` with `params` bytes may not go now, if
    /// it may not (counted in `wsgate_refused_total`): the call rights
    /// (`WSGATE_CALL_ALLOW` or the token's `call` claim), the size, this
    /// connection's calls in flight (its own and its service lines').
    pub(super) fn call_refusal(
        &self,
        ctx: &SessionContext,
        destination: &str,
        params: usize,
    ) -> Option<CallError> {
        let in_flight =
            self.calls_in_flight() + self.lines.as_ref().map_or(0, |l| l.calls_in_flight());
        let (reason, error) = if !self.may_call(ctx, destination) {
            (Some("call_not_allowed"), CallError::NotAllowed)
        } else if params > ctx.max_call_bytes {
            (None, CallError::TooLarge)
        } else if in_flight >= ctx.max_calls_in_flight {
            (Some("calls_in_flight"), CallError::Busy)
        } else {
            return None;
        };
        if let Some(reason) = reason {
            ctx.metrics.refused.with_label_values(&[reason]).inc();
        }
        Some(error)
    }

    /// A call: checked against the call rights (`WSGATE_CALL_ALLOW` or the
    /// token's `call` claim), the size and this connection's calls in
    /// flight, then handed to the router; answered when it ends.
    fn call(&mut self, ctx: &SessionContext, conv: &mut dyn Conversation, call: Call) {
        let destination = format!("{}:{}", call.service, call.method);
        if let Some(error) = self.call_refusal(ctx, &destination, call.params.len()) {
            let refused = Answer::Called {
                id: call.id.as_deref(),
                outcome: Err(&error),
            };
            return self.answer(conv, refused);
        }
        let deadline = ctx.rpc.call_timeout();
        let outgoing = Outgoing {
            service: call.service,
            method: call.method,
            params: call.params,
            consumer: self.identity.as_ref().map(|i| i.subject.clone()),
            timeout: call.timeout.map_or(deadline, |t| t.min(deadline)),
            responder: None,
        };
        let done = ctx.rpc.call(outgoing);
        let id = call.id;
        let origin = self.started();
        self.calling
            .get_or_insert_with(FuturesUnordered::new)
            .push(Box::pin(async move { (origin, (id, done.await)) }));
    }

    /// Why this connection may not subscribe to `topic` now, if it may not.
    fn refusal(&mut self, ctx: &SessionContext, topic: &Topic) -> Option<Refusal> {
        if let Err(error) = validate(topic, ctx.max_pattern_bytes) {
            return Some(Refusal::Other(error));
        }
        if self.held.contains_key(topic) {
            return Some(Refusal::AlreadySubscribed);
        }
        if self.held.len() >= ctx.max_subscriptions {
            return Some(Refusal::Other(format!(
                "subscription limit reached ({})",
                ctx.max_subscriptions
            )));
        }
        if let Some(r) =
            pattern_cost::connection_refusal(&ctx.pattern_limits, topic, self.held.keys())
        {
            ctx.metrics.refused.with_label_values(&[r.reason]).inc();
            return Some(Refusal::Other(r.message));
        }
        if !self.take_token() {
            ctx.metrics
                .refused
                .with_label_values(&["rate_limited"])
                .inc();
            return Some(Refusal::RateLimited);
        }
        None
    }

    /// Takes `identity` and arms the expiry timer. An `exp` too far ahead to
    /// be represented as an instant (centuries) arms none, rather than
    /// overflowing.
    ///
    /// The session is registered under the identity's subject for the
    /// operator's orders ([`super::users`]), once per subject: a refresh
    /// (same subject) keeps the registration.
    pub fn set_identity(&mut self, ctx: &SessionContext, identity: Identity) {
        self.expires_at = tokio::time::Instant::now().checked_add(identity.remaining());
        let registered = self
            .user
            .as_ref()
            .is_some_and(|r| r.user() == identity.subject);
        if !registered {
            self.user = None;
            if !identity.subject.is_empty() {
                let inbox = self.inbox();
                let id = self.member.id;
                self.user = Some(ctx.users.register(&identity.subject, id, inbox));
            }
        }
        self.identity = Some(identity);
    }

    /// May this connection hold `topic` at all? Both `WSGATE_ALLOW` and the
    /// identity's ACL must allow it: the token's when authentication is on
    /// (no identity then allows nothing), or the one the connect backend
    /// gave (`crate::connect_auth`); an anonymous client of a node without
    /// authentication has only `WSGATE_ALLOW`.
    fn permitted(&self, ctx: &SessionContext, topic: &Topic) -> bool {
        let server = ctx.allow.as_ref().is_none_or(|acl| acl.allows(topic));
        let identity = match &self.identity {
            Some(id) => id.acl.allows(topic),
            None => ctx.verifier.is_none(),
        };
        server && identity
    }

    fn refuse(
        &self,
        ctx: &SessionContext,
        conv: &mut dyn Conversation,
        reason: &str,
        topic: &Topic,
        id: Option<&str>,
        error: Refusal,
    ) {
        ctx.metrics.refused.with_label_values(&[reason]).inc();
        self.ack(conv, AckKind::Subscribe, topic, id, Some(&error));
    }

    // The request's own fields, passed on as they came (a struct would only rename them).
    #[allow(clippy::too_many_arguments)]
    fn subscribe(
        &mut self,
        ctx: &SessionContext,
        conv: &mut dyn Conversation,
        topic: Topic,
        id: Option<String>,
        ext: Option<String>,
        since: Option<Since>,
        join_leave: bool,
    ) {
        if join_leave && !ctx.hub.has_presence(topic.name()) {
            let error = Refusal::Other(NO_PRESENCE.to_owned());
            return self.ack(
                conv,
                AckKind::Subscribe,
                &topic,
                id.as_deref(),
                Some(&error),
            );
        }
        if let Some(error) = self.refusal(ctx, &topic) {
            return self.ack(
                conv,
                AckKind::Subscribe,
                &topic,
                id.as_deref(),
                Some(&error),
            );
        }
        if !self.permitted(ctx, &topic) {
            let id = id.as_deref();
            return self.refuse(ctx, conv, "not_allowed", &topic, id, Refusal::NotAllowed);
        }
        let recovers = since
            .iter()
            .flatten()
            .any(|(c, _)| ctx.hub.history_rule(c).is_some());
        if recovers && self.history_reads(ctx).available(Instant::now()) == 0 {
            let id = id.as_deref();
            let error = Refusal::Other(HISTORY_RATE.to_owned());
            return self.refuse(ctx, conv, "history_rate", &topic, id, error);
        }
        self.seq += 1;
        let seq = self.seq;
        if let Some(authz) = &ctx.authz {
            let question = Question {
                subject: self.identity.as_ref().map(|i| i.subject.as_str()),
                claims: self.identity.as_ref().map(|i| &i.claims),
                topic: &topic,
                remote_addr: ctx.client_ip,
                ext: ext.as_deref(),
            };
            match authz.cached(&question) {
                Some(Decision::Allow) => {}
                Some(Decision::Deny(reason)) => {
                    let id = id.as_deref();
                    let denied = Refusal::Denied(reason);
                    return self.refuse(ctx, conv, "authz_denied", &topic, id, denied);
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
                            since,
                            recovering: false,
                            join_leave,
                        },
                    );
                    let origin = self.started();
                    self.authorising
                        .get_or_insert_with(FuturesUnordered::new)
                        .push(Box::pin(
                            async move { (origin, (topic, seq, answer.await)) },
                        ));
                    return;
                }
            }
        }
        self.join(ctx, conv, topic, id, seq, since, join_leave);
    }

    /// The next answer of the callback or the broker, when one is awaited,
    /// with the origin of the request it answers; pending forever otherwise
    /// (a `select!` branch that never fires).
    pub async fn next_outcome(&mut self) -> (u64, Outcome) {
        let (origin, outcome) = self.next_done().await;
        if matches!(
            outcome,
            Outcome::Control(_) | Outcome::Service(ServiceDone::Called(_))
        ) {
            return (origin, outcome); // no request of the client waited for it
        }
        if let Some(at) = self.origins.iter().position(|o| *o == origin) {
            self.origins.swap_remove(at);
        }
        (origin, outcome)
    }

    async fn next_done(&mut self) -> (u64, Outcome) {
        tokio::select! {
            control = self.inbox.recv() => (0, Outcome::Control(control)),
            Some((origin, (topic, seq, outcome))) = next_done(&mut self.waiting) => {
                if self.waiting.as_ref().is_some_and(FuturesUnordered::is_empty) {
                    self.waiting = None; // give its allocation back while idle
                }
                (origin, Outcome::Confirmed(topic, seq, outcome))
            }
            Some((origin, (topic, seq, reads, all, reserved))) = next_done(&mut self.recovering) => {
                if self.recovering.as_ref().is_some_and(FuturesUnordered::is_empty) {
                    self.recovering = None;
                }
                (origin, Outcome::Recovered(topic, seq, reads, all, reserved))
            }
            Some((origin, (channel, id, stats, outcome))) = next_done(&mut self.presencing) => {
                if self.presencing.as_ref().is_some_and(FuturesUnordered::is_empty) {
                    self.presencing = None;
                }
                (origin, Outcome::Presence(channel, id, stats, outcome))
            }
            Some((origin, (topic, seq, outcome))) = next_done(&mut self.authorising) => {
                if self.authorising.as_ref().is_some_and(FuturesUnordered::is_empty) {
                    self.authorising = None;
                }
                (origin, Outcome::Authorised(topic, seq, outcome))
            }
            Some((origin, (id, outcome))) = next_done(&mut self.calling) => {
                if self.calling.as_ref().is_some_and(FuturesUnordered::is_empty) {
                    self.calling = None;
                }
                (origin, Outcome::Called(id, outcome))
            }
            Some((origin, done)) = services::next(&mut self.lines) => (origin, Outcome::Service(done)),
            Some((origin, (channel, id, outcome))) = next_done(&mut self.publishing) => {
                if self.publishing.as_ref().is_some_and(FuturesUnordered::is_empty) {
                    self.publishing = None;
                }
                (origin, Outcome::Published(channel, id, outcome))
            }
            else => std::future::pending().await,
        }
    }

    /// Acts on what [`Session::next_outcome`] returned.
    pub fn outcome(&mut self, ctx: &SessionContext, conv: &mut dyn Conversation, outcome: Outcome) {
        match outcome {
            // Served by the loop (it may end the session).
            Outcome::Control(_) => {}
            Outcome::Service(ServiceDone::Connected(done)) => {
                self.service_connected(ctx, conv, done)
            }
            Outcome::Service(ServiceDone::Called(done)) => self.service_called(conv, done),
            Outcome::Called(id, outcome) => {
                let outcome = outcome.as_ref().map(|r| &r[..]);
                self.answer(
                    conv,
                    Answer::Called {
                        id: id.as_deref(),
                        outcome,
                    },
                );
            }
            Outcome::Confirmed(topic, seq, o) => self.confirmed(ctx, conv, topic, seq, o),
            Outcome::Authorised(topic, seq, o) => self.authorised(ctx, conv, topic, seq, o),
            Outcome::Recovered(topic, seq, reads, all, reserved) => {
                self.recovered(conv, topic, seq, reads, all, reserved)
            }
            Outcome::Presence(channel, id, stats, outcome) => self.answer(
                conv,
                Answer::Presence {
                    channel: &channel,
                    id: id.as_deref(),
                    stats,
                    outcome: outcome.as_ref(),
                },
            ),
            Outcome::Published(channel, id, outcome) => {
                let error = outcome.as_ref().err();
                let refusal = error.map(|e| match e {
                    PublishError::Refused(_) => Refusal::Other(e.client_error().into_owned()),
                    _ => Refusal::Unavailable(e.client_error().into_owned()),
                });
                self.answer(
                    conv,
                    Answer::Published {
                        channel: &channel,
                        id: id.as_deref(),
                        error: refusal.as_ref(),
                        maybe_published: error.map(PublishError::maybe_published),
                    },
                );
            }
        }
    }

    /// A client publish: checked as a subscribe is (name, rate), then against
    /// both publish lists (refused `not allowed`, counted as
    /// `publish_not_allowed`), then sent to the broker as `POST /publish`
    /// sends it; answered once the broker answered.
    fn publish(
        &mut self,
        ctx: &SessionContext,
        conv: &mut dyn Conversation,
        channel: Bytes,
        payload: Bytes,
        id: Option<String>,
    ) {
        let refusal =
            if let Err(error) = validate(&Topic::Channel(channel.clone()), ctx.max_pattern_bytes) {
                Some((None, Refusal::Other(error)))
            } else if !self.take_token() {
                Some((Some("rate_limited"), Refusal::RateLimited))
            } else if !crate::publish::client_may_publish(
                &ctx.client_publish,
                self.identity.as_ref(),
                ctx.verifier.is_some() || self.identity.is_some(),
                &channel,
            ) {
                Some((Some("publish_not_allowed"), Refusal::NotAllowed))
            } else {
                None
            };
        if let Some((reason, error)) = refusal {
            if let Some(reason) = reason {
                ctx.metrics.refused.with_label_values(&[reason]).inc();
            }
            let refused = Answer::Published {
                channel: &channel,
                id: id.as_deref(),
                error: Some(&error),
                maybe_published: None,
            };
            return self.answer(conv, refused);
        }
        let publication = Publication {
            channel: channel.clone(),
            payload,
            idempotency_key: None,
        };
        let sent =
            crate::publish::client_publish(ctx.hub.clone(), publication, ctx.subscribe_timeout);
        let origin = self.started();
        self.publishing
            .get_or_insert_with(FuturesUnordered::new)
            .push(Box::pin(async move { (origin, (channel, id, sent.await)) }));
    }

    /// The callback answered a subscribe (unless it was withdrawn meanwhile).
    fn authorised(
        &mut self,
        ctx: &SessionContext,
        conv: &mut dyn Conversation,
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
        let (id, since, join_leave) = match self.held.remove(&topic) {
            Some(h) => (h.id, h.since, h.join_leave),
            None => (None, None, false),
        };
        match outcome {
            Ok(Decision::Allow) => self.join(ctx, conv, topic, id, seq, since, join_leave),
            Ok(Decision::Deny(reason)) => {
                let denied = Refusal::Denied(reason);
                self.refuse(ctx, conv, "authz_denied", &topic, id.as_deref(), denied)
            }
            Err(e) => {
                warn!(cause = %e, "authorisation callback failed");
                let unavailable = Refusal::Unavailable(AUTHZ_UNAVAILABLE.to_owned());
                let id = id.as_deref();
                self.refuse(ctx, conv, "authz_unavailable", &topic, id, unavailable);
            }
        }
    }

    /// Joins the topic in the hub: an authorised subscribe.
    #[allow(clippy::too_many_arguments)]
    fn join(
        &mut self,
        ctx: &SessionContext,
        conv: &mut dyn Conversation,
        topic: Topic,
        id: Option<String>,
        seq: u64,
        since: Option<Since>,
        join_leave: bool,
    ) {
        let joined = match ctx.hub.subscribe(&self.member, topic.clone()) {
            Ok(joined) => joined,
            Err(r) => {
                let other = Refusal::Other(r.message);
                return self.refuse(ctx, conv, r.reason, &topic, id.as_deref(), other);
            }
        };
        self.held.insert(
            topic.clone(),
            Held {
                seq,
                id,
                stage: Stage::Pending,
                told: false,
                since,
                recovering: false,
                join_leave,
            },
        );
        self.joined(ctx, conv, topic, seq, joined);
    }

    /// Follows up a hub join: an active one is answered and started (reply
    /// first, so it precedes every delivery), a pending one waits.
    fn joined(
        &mut self,
        ctx: &SessionContext,
        conv: &mut dyn Conversation,
        topic: Topic,
        seq: u64,
        joined: Joined,
    ) {
        match joined {
            Joined::Active(sub) => {
                let Some(held) = self.held.get(&topic) else {
                    return;
                };
                let id = held.id.clone();
                let since = held.since.clone();
                let (with, without): (Vec<_>, Vec<_>) = since
                    .iter()
                    .flatten()
                    .cloned()
                    .partition(|(c, _)| ctx.hub.history_rule(c).is_some());
                if !with.is_empty() {
                    // Reply once the reads are in: see `Session::recovered`.
                    sub.recover();
                    self.activated(ctx, &topic, &sub);
                    sub.start();
                    if let Some(held) = self.held.get_mut(&topic) {
                        held.stage = Stage::Active(sub);
                        held.recovering = true;
                    }
                    // The channels share what the connection's history read
                    // rate still allows, evenly (at most RECOVERY_LIMIT each);
                    // one left with nothing is not read (and not recovered).
                    let now = Instant::now();
                    let budget = self.history_reads(ctx);
                    let limits = shares(budget.available(now), with.len());
                    let reserved = budget.take_up_to(limits.iter().sum(), now);
                    let mut all = without.is_empty();
                    let reads =
                        with.into_iter()
                            .zip(limits)
                            .filter_map(|((channel, since), limit)| {
                                if limit == 0 {
                                    all = false;
                                    return None;
                                }
                                let hub = ctx.hub.clone();
                                let query = Query::After {
                                    offset: since.offset,
                                    epoch: since.epoch.clone(),
                                    limit,
                                };
                                Some(async move {
                                    let read = hub.read_history(channel.clone(), query).await;
                                    (channel, since, read)
                                })
                            });
                    let reads = futures_util::future::join_all(reads.collect::<Vec<_>>());
                    let timeout = ctx.subscribe_timeout;
                    let origin = self.started();
                    self.recovering
                        .get_or_insert_with(FuturesUnordered::new)
                        .push(Box::pin(async move {
                            let reads = tokio::time::timeout(timeout, reads).await.ok();
                            (origin, (topic, seq, reads, all, reserved))
                        }));
                    return;
                }
                self.answer(
                    conv,
                    Answer::Ack(Ack {
                        kind: AckKind::Subscribe,
                        topic: &topic,
                        id: id.as_deref(),
                        error: None,
                        // Asked to recover a channel without history.
                        recovered: since.map(|_| false),
                    }),
                );
                self.activated(ctx, &topic, &sub);
                sub.start();
                if let Some(held) = self.held.get_mut(&topic) {
                    held.stage = Stage::Active(sub);
                }
            }
            Joined::Pending(confirmation) => {
                let timeout = ctx.subscribe_timeout;
                let origin = self.started();
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
                        (origin, (topic, seq, outcome))
                    }));
            }
        }
    }

    /// A recovering subscribe's reads ended: under the subscription's hold,
    /// the reply (`recovered` true or false), then each channel's recovered
    /// messages, then the live ones held meanwhile that the reads did not
    /// return; the rest arrive as usual, minus those at or below a recovered
    /// position.
    fn recovered(
        &mut self,
        conv: &mut dyn Conversation,
        topic: Topic,
        seq: u64,
        reads: Option<Vec<ChannelRead>>,
        all: bool,
        reserved: usize,
    ) {
        // What the reads took from the history read rate and did not return
        // goes back (a read that timed out keeps its share: it may have run).
        if let (Some(reads), Some(budget)) = (&reads, self.history_reads.as_mut()) {
            let returned: usize = reads
                .iter()
                .filter_map(|(_, _, r)| r.as_ref().ok())
                .map(|r| r.entries.len())
                .sum();
            budget.refund(reserved.saturating_sub(returned), Instant::now());
        }
        let (sub, id) = match self.held.get_mut(&topic) {
            Some(held) if held.seq == seq => match &held.stage {
                Stage::Active(sub) => {
                    held.recovering = false;
                    (sub.clone(), held.id.clone())
                }
                _ => return,
            },
            _ => return, // unsubscribed meanwhile, and already answered
        };
        let mut complete = all && reads.is_some();
        let mut found = Vec::new();
        for (channel, since, read) in reads.into_iter().flatten() {
            match read {
                Ok(read) => {
                    complete &= history::recovered(&since, &read, history::RECOVERY_LIMIT);
                    found.push((channel, since, read));
                }
                Err(e) => {
                    warn!(cause = %e, "history read for a recovery failed");
                    complete = false;
                }
            }
        }
        let floors: Vec<(Bytes, Position)> = if complete {
            found
                .iter()
                .map(|(channel, since, read)| {
                    let offset = read.entries.last().map_or(since.offset, |e| e.offset);
                    let epoch = read.epoch.clone();
                    (channel.clone(), Position { offset, epoch })
                })
                .collect()
        } else {
            Vec::new()
        };
        let render = self.member.render.clone();
        sub.release(floors.clone(), |held| {
            let complete = complete && !held.overflowed;
            self.answer(
                conv,
                Answer::Ack(Ack {
                    kind: AckKind::Subscribe,
                    topic: &topic,
                    id: id.as_deref(),
                    error: None,
                    recovered: Some(complete),
                }),
            );
            if complete {
                for (channel, _, read) in &found {
                    for entry in &read.entries {
                        let msg = BrokerMessage {
                            topic: topic.clone(),
                            channel: channel.clone(),
                            payload: entry.payload.clone(),
                            position: Some(Position {
                                offset: entry.offset,
                                epoch: read.epoch.clone(),
                            }),
                        };
                        self.reply_opt(render.delivery(&msg));
                    }
                }
            }
            for (frame, channel, position) in held.frames {
                let duplicate = position.is_some_and(|p| {
                    floors
                        .iter()
                        .any(|(c, f)| *c == channel && p.epoch == f.epoch && p.offset <= f.offset)
                });
                if !duplicate {
                    self.reply(frame);
                }
            }
        });
    }

    /// A wait for the broker ended.
    fn confirmed(
        &mut self,
        ctx: &SessionContext,
        conv: &mut dyn Conversation,
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
                Some(Refusal::Other(why))
            }
            // Timed out: withdraw, unless confirmed in the meantime.
            Err(_) if ctx.hub.cancel_pending(self.member.id, &topic) => {
                Some(Refusal::Unavailable(BROKER_UNAVAILABLE.to_owned()))
            }
            Err(_) => None,
        };
        if let Some(error) = error {
            let id = self.held.remove(&topic).and_then(|h| h.id);
            return self.ack(
                conv,
                AckKind::Subscribe,
                &topic,
                id.as_deref(),
                Some(&error),
            );
        }
        match ctx.hub.activate(&self.member, &topic) {
            Some(joined) => self.joined(ctx, conv, topic, seq, joined),
            None => {
                let id = self.held.remove(&topic).and_then(|h| h.id);
                let error = Refusal::Unavailable(BROKER_UNAVAILABLE.to_owned());
                self.ack(
                    conv,
                    AckKind::Subscribe,
                    &topic,
                    id.as_deref(),
                    Some(&error),
                );
            }
        }
    }

    /// Takes everything queued, rendering gap marks from this session's own
    /// subscriptions, into `out`. The outbox's state says whether to go on.
    pub fn drain(
        &mut self,
        metrics: &Metrics,
        items: &mut VecDeque<Item>,
        out: &mut VecDeque<Frame>,
    ) -> State {
        let state = self.member.outbox.take(items);
        for item in items.drain(..) {
            match item {
                Item::Frame(frame) => out.push_back(frame),
                Item::Raw(_) => {} // only in direct outboxes, never drained
                Item::Mark(kind) => {
                    if let Some(frame) = self.render_mark(kind) {
                        metrics.gap_notices.inc();
                        out.push_back(frame);
                    }
                }
            }
        }
        state
    }

    /// Direct outboxes: renders the gap mark at the front of the outbox in
    /// its place.
    pub fn render_front_mark(&mut self, metrics: &Metrics) {
        if let Some(kind) = self.member.outbox.take_mark() {
            if let Some(frame) = self.render_mark(kind) {
                metrics.gap_notices.inc();
                self.member.outbox.push_front(frame);
            }
        }
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
                // A subscription the hub heals gets its `resumed` from the
                // hub, after the healed messages (`docs/history.md`).
                NoticeKind::Resumed => {
                    std::mem::take(&mut held.told)
                        && matches!(&held.stage, Stage::Active(sub) if !sub.take_healing())
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
        self.member.render.notice(&Notice {
            kind,
            topics: &topics,
            reason,
            recovered: None,
        })
    }

    fn unsubscribe(
        &mut self,
        ctx: &SessionContext,
        conv: &mut dyn Conversation,
        topic: Topic,
        id: Option<String>,
    ) {
        let Some(held) = self.held.remove(&topic) else {
            let error = Refusal::NotSubscribed;
            return self.ack(
                conv,
                AckKind::Unsubscribe,
                &topic,
                id.as_deref(),
                Some(&error),
            );
        };
        if let Stage::Active(sub) = &held.stage {
            sub.stop();
            self.departed(ctx, &topic);
        }
        let unanswered = held.stage.is_authorising()
            || ctx
                .hub
                .unsubscribe(self.member.id, &topic, held.stage.sub())
                == Removed::Pending;
        if unanswered || held.recovering {
            // The subscribe never completed: answer it before the unsubscribe.
            let error = Refusal::Cancelled;
            self.ack(
                conv,
                AckKind::Subscribe,
                &topic,
                held.id.as_deref(),
                Some(&error),
            );
        }
        self.ack(conv, AckKind::Unsubscribe, &topic, id.as_deref(), None);
    }

    /// Takes a fresh token: same subject required. The new token's ACL
    /// replaces the old one; subscriptions it does not allow are ended, each
    /// with an `unsubscribed` notice (or, if not yet answered, a `not allowed`
    /// refusal), after the refresh reply.
    fn refresh(
        &mut self,
        ctx: &SessionContext,
        conv: &mut dyn Conversation,
        token: &str,
        id: Option<&str>,
    ) {
        let refused = |s: &Session, conv: &mut dyn Conversation, error: &str| {
            s.answer(
                conv,
                Answer::Refreshed {
                    id,
                    error: Some(error),
                },
            )
        };
        let Some(verifier) = &ctx.verifier else {
            return refused(self, conv, "authentication is not enabled");
        };
        if !self.take_token() {
            ctx.metrics
                .refused
                .with_label_values(&["rate_limited"])
                .inc();
            return refused(self, conv, "rate limited");
        }
        let identity = match verifier.verify(token) {
            Ok(identity) => identity,
            Err(e) => return refused(self, conv, &e.to_string()),
        };
        let same_subject = self
            .identity
            .as_ref()
            .is_some_and(|current| current.subject == identity.subject);
        if !same_subject {
            return refused(self, conv, "token is for another subject");
        }
        self.set_identity(ctx, identity);
        self.answer(conv, Answer::Refreshed { id, error: None });
        let mut revoked: Vec<Topic> = self
            .held
            .keys()
            .filter(|t| !self.permitted(ctx, t))
            .cloned()
            .collect();
        revoked.sort();
        for topic in revoked {
            self.revoke(ctx, conv, topic);
        }
    }

    /// Ends a held subscription the client may no longer have.
    fn revoke(&mut self, ctx: &SessionContext, conv: &mut dyn Conversation, topic: Topic) {
        self.revoke_because(ctx, conv, topic, NOT_ALLOWED, "not_allowed");
    }

    /// Ends a subscription the client holds, telling it `reason` (counted
    /// under `label`); `false` when it held none.
    fn revoke_because(
        &mut self,
        ctx: &SessionContext,
        conv: &mut dyn Conversation,
        topic: Topic,
        reason: &str,
        label: &str,
    ) -> bool {
        let Some(held) = self.held.remove(&topic) else {
            return false;
        };
        ctx.metrics.refused.with_label_values(&[label]).inc();
        if let Stage::Active(sub) = &held.stage {
            sub.stop();
            self.departed(ctx, &topic);
        }
        let answered = !held.stage.is_authorising()
            && ctx
                .hub
                .unsubscribe(self.member.id, &topic, held.stage.sub())
                == Removed::Active;
        if answered {
            let revoked = Answer::Revoked {
                topic: &topic,
                reason,
            };
            self.answer(conv, revoked);
        } else {
            let error = if reason == NOT_ALLOWED {
                Refusal::NotAllowed
            } else {
                Refusal::Other(reason.to_owned())
            };
            self.ack(
                conv,
                AckKind::Subscribe,
                &topic,
                held.id.as_deref(),
                Some(&error),
            );
        }
        true
    }

    /// A subscription is about to start: it takes join/leave events if it
    /// asked, and the connection becomes a member of a presence channel.
    fn activated(&self, ctx: &SessionContext, topic: &Topic, sub: &Sub) {
        let Topic::Channel(channel) = topic else {
            return;
        };
        if !ctx.hub.has_presence(channel) {
            return;
        }
        if self.held.get(topic).is_some_and(|h| h.join_leave) {
            sub.want_join_leave();
        }
        if let Some(tracker) = ctx.hub.presence() {
            let identity = self.identity.as_ref();
            let who = Who::new(
                &ctx.node_id,
                self.member.id,
                identity.map(|i| i.subject.as_str()),
                identity.and_then(|i| i.claims.get("info")),
            );
            tracker.join(channel, &who);
        }
    }

    /// An active subscription ended: the connection leaves the channel's
    /// presence (nothing if it keeps none).
    fn departed(&self, ctx: &SessionContext, topic: &Topic) {
        let Topic::Channel(channel) = topic else {
            return;
        };
        if let Some(tracker) = ctx.hub.presence() {
            if tracker.rules().covers(channel) {
                tracker.leave(channel, &Who::client_id(&ctx.node_id, self.member.id));
            }
        }
    }

    /// `presence` / `presence_stats`: checked as a subscribe of the channel
    /// would be (name, rate, ACLs; not the callback), then read from the
    /// broker within the subscribe timeout.
    fn presence(
        &mut self,
        ctx: &SessionContext,
        conv: &mut dyn Conversation,
        channel: Bytes,
        id: Option<String>,
        stats: bool,
    ) {
        let topic = Topic::Channel(channel.clone());
        let refusal = if let Err(error) = validate(&topic, ctx.max_pattern_bytes) {
            Some(Refusal::Other(error))
        } else if !ctx.hub.has_presence(&channel) {
            Some(Refusal::Other(NO_PRESENCE.to_owned()))
        } else if !self.take_token() {
            ctx.metrics
                .refused
                .with_label_values(&["rate_limited"])
                .inc();
            Some(Refusal::RateLimited)
        } else if !self.permitted(ctx, &topic) {
            ctx.metrics
                .refused
                .with_label_values(&["not_allowed"])
                .inc();
            Some(Refusal::NotAllowed)
        } else {
            None
        };
        if let Some(error) = refusal {
            return self.answer(
                conv,
                Answer::Presence {
                    channel: &channel,
                    id: id.as_deref(),
                    stats,
                    outcome: Err(&error),
                },
            );
        }
        let hub = ctx.hub.clone();
        let timeout = ctx.subscribe_timeout;
        let origin = self.started();
        self.presencing
            .get_or_insert_with(FuturesUnordered::new)
            .push(Box::pin(async move {
                let read = tokio::time::timeout(timeout, hub.read_presence(channel.clone())).await;
                let outcome = match read {
                    Ok(Ok(members)) => Ok(members),
                    Ok(Err(e)) => {
                        warn!(cause = %e, "presence read failed");
                        Err(Refusal::Unavailable(BROKER_UNAVAILABLE.to_owned()))
                    }
                    Err(_) => Err(Refusal::Unavailable(BROKER_UNAVAILABLE.to_owned())),
                };
                (origin, (channel, id, stats, outcome))
            }));
    }

    /// A sender to this session's inbox, for whoever will address it later
    /// (a TCP backend's reader, the operator's orders).
    pub fn inbox(&mut self) -> super::control::InboxSender {
        self.inbox.sender()
    }

    /// Acts on a message of the session's [`super::Inbox`]; `Some` when the
    /// session must end.
    pub fn control(
        &mut self,
        ctx: &SessionContext,
        conv: &mut dyn Conversation,
        control: Control,
    ) -> Option<End> {
        match control {
            Control::Close { code, reason, done } => {
                if let Some(done) = done {
                    let _ = done.send(true);
                }
                return Some(End::Close(code, reason.into()));
            }
            Control::Revoke {
                topic,
                reason,
                done,
            } => {
                let held = self.revoke_because(ctx, conv, topic, &reason, "server_unsubscribe");
                if let Some(done) = done {
                    let _ = done.send(held);
                }
            }
            Control::ServiceData {
                service,
                line,
                data,
            } => self.service_line(conv, &service, line, &data),
            Control::ServiceEnded {
                service,
                line,
                reason,
            } => self.service_ended(conv, &service, line, &reason),
        }
        None
    }

    /// Leaves every topic, and its user's sessions: the connection is ending.
    pub fn leave(&mut self, ctx: &SessionContext) {
        self.user = None;
        for (topic, held) in &self.held {
            if let Stage::Active(sub) = &held.stage {
                sub.stop();
                self.departed(ctx, topic);
            }
            if !held.stage.is_authorising() {
                ctx.hub.unsubscribe(self.member.id, topic, held.stage.sub());
            }
        }
        self.held.clear();
        // Closes every TCP backend connection (their tasks see it) and
        // drops the calls and connects still waiting.
        self.lines = None;
    }
}

/// Checks a channel or pattern name against the server's rules (the
/// operator API's orders are held to them too).
pub fn validate(topic: &Topic, max_bytes: usize) -> Result<(), String> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_reads_share_the_budget_evenly() {
        assert_eq!(shares(1000, 1), vec![1000]);
        assert_eq!(shares(1000, 2), vec![500, 500]);
        assert_eq!(shares(10, 3), vec![4, 3, 3]);
        assert_eq!(shares(2, 3), vec![1, 1, 0]);
        assert_eq!(shares(0, 2), vec![0, 0]);
        assert_eq!(
            shares(5000, 2),
            vec![1000, 1000],
            "at most RECOVERY_LIMIT each"
        );
        assert!(shares(5, 0).is_empty());
    }
}
