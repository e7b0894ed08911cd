//! One Bayeux client's side of the protocol: its clientId, its held
//! connects, and how its messages become session requests.
//!
//! The same conversation serves every transport: a WebSocket frame and a
//! long-poll body are both a batch of messages. What differs (who holds a
//! connect, where replies go) is the session's business.
//!
//! - `/meta/handshake` issues an unguessable clientId, verifies a token
//!   (`ext.token`, else the transport's `Authorization` or `?token=`) and
//!   binds the session to the clientId on this node.
//! - `/meta/connect` is answered at once when it is the first, or when the
//!   client asked `advice.timeout: 0`; otherwise it is held
//!   ([`Step::Hold`], `WSGATE_BAYEUX_CONNECT_TIMEOUT_MS`).
//! - `/meta/subscribe` and `/meta/unsubscribe` become one request per
//!   channel, each answered on its own; [`channel::GAP_CHANNEL`] and
//!   [`PRESENCE_SERVICE`] are answered here. `ext.wsgate.join_leave` asks a
//!   presence channel's join and leave events, delivered on the channel
//!   marked `ext.wsgate.presence` ([`reply::presence_event`]).
//! - A publish to [`PRESENCE_SERVICE`] of `{"channel":..}` becomes a
//!   [`Request::Presence`], answered on that channel with the members.
//! - A publish becomes a [`Request::Publish`] of the JSON text of `data`.
//! - `/service/<name>` is a line to a service, not a channel: its subscribe,
//!   unsubscribe and publish become [`Request::ServiceSubscribe`],
//!   [`Request::ServiceUnsubscribe`] and [`Request::ServicePublish`] (which
//!   need call rights, never publish rights), answered in Bayeux's shapes;
//!   what the service sends back arrives as messages on that channel for
//!   this client alone.
//! - A message naming a clientId this conversation does not hold is routed
//!   ([`Step::Route`]) when the conversation is fresh (Faye handshakes over
//!   HTTP, then opens a WebSocket), and otherwise answered `402`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::value::RawValue;

use super::channel::{self, Meta, Subscription, PRESENCE_SERVICE};
use super::client_id::ClientId;
use super::message::{self, Decoded, Id, Kind, Limits};
use super::reply::{self, Advice, Batch, Error};
use super::resume::Resume;
use crate::auth::{AuthError, Verifier};
use crate::broker::BrokerMessage;
use crate::protocol::{
    Ack, AckKind, Answer, Conversation, Frame, Inbound, Notice, Refusal, Render, Request,
    ServiceOp, Step,
};
use crate::rpc::CallError;

/// What every Bayeux conversation of one endpoint shares.
pub struct Endpoint {
    /// How deliveries look (the same for every Bayeux endpoint).
    pub render: Arc<dyn Render>,
    /// How long a connect is held.
    pub connect_timeout: Duration,
    /// How long a session waits for its client to come back.
    pub session_timeout: Duration,
    /// Bounds on one message batch.
    pub limits: Limits,
    /// Token verification, when authentication is on.
    pub verifier: Option<Arc<Verifier>>,
    /// nodefony's endpoint: connect replies carry `data`, the services
    /// available ([`ServiceMap`]); `None` on `/bayeux`.
    pub nodefony: Option<ServiceMap>,
}

/// The services nodefony's connect reply lists, as nodefony's realtime
/// bundle does (its `getServices()`: an object keyed by service name):
/// `{"random":{"type":"tcp"},"billing":{"type":"service"}}`. The TCP
/// backends come first, in configuration order, then the registered
/// services, sorted; a name that is both is listed once, as `tcp` (its
/// subscribe opens the backend). Unlike nodefony, no `port` nor `domain`:
/// where a backend runs is the operator's business, not the client's.
pub struct ServiceMap {
    /// `WSGATE_TCP_SERVICES`'s names.
    pub tcp: Vec<String>,
    /// The registered services, as this node's view of the directory has
    /// them when asked (`Rpc::services`).
    pub registered: Box<dyn Fn() -> Vec<String> + Send + Sync>,
}

impl ServiceMap {
    /// The map as JSON text.
    pub fn render(&self) -> String {
        let mut out = String::from("{");
        let registered = (self.registered)();
        let tcp = self.tcp.iter().map(|n| (n, "tcp"));
        let others = registered
            .iter()
            .filter(|n| !self.tcp.contains(n))
            .map(|n| (n, "service"));
        for (name, kind) in tcp.chain(others) {
            if out.len() > 1 {
                out.push(',');
            }
            // A serialised &str is always valid JSON.
            out.push_str(&serde_json::to_string(name).unwrap_or_else(|_| "\"\"".into()));
            out.push_str(":{\"type\":\"");
            out.push_str(kind);
            out.push_str("\"}");
        }
        out.push('}');
        out
    }
}

/// Bayeux deliveries and gap notices: rendered once per message for every
/// Bayeux member (see [`reply::render`]).
#[derive(Debug, Default, Clone, Copy)]
pub struct BayeuxRender;

impl Render for BayeuxRender {
    fn key(&self) -> &'static str {
        "bayeux"
    }

    fn delivery(&self, message: &BrokerMessage) -> Option<Frame> {
        reply::render(message).map(Frame::text)
    }

    fn notice(&self, notice: &Notice<'_>) -> Option<Frame> {
        Some(Frame::text(reply::gap(notice)))
    }

    fn presence_event(&self, channel: &[u8], event: &[u8]) -> Option<Frame> {
        reply::presence_event(channel, event).map(Frame::text)
    }

    fn once_per_publish(&self) -> bool {
        true
    }
}

/// One Bayeux client: see the module docs.
pub struct BayeuxConversation {
    endpoint: Arc<Endpoint>,
    client_id: Option<ClientId>,
    /// The token the transport carried (header or query), for a handshake
    /// without `ext.token`.
    transport_token: Option<String>,
    /// A connect was answered already (the first one is answered at once).
    connected: bool,
    /// The ids of held connects, oldest first.
    held: Vec<Option<Id>>,
    /// `/meta/disconnect` was received: the session ends with its link.
    disconnected: bool,
    /// The messages of a batch that was routed, for a `402` if nobody
    /// took it.
    routed: Vec<(Option<String>, Option<Id>)>,
}

impl BayeuxConversation {
    /// A fresh conversation: no clientId yet.
    pub fn new(endpoint: Arc<Endpoint>, transport_token: Option<String>) -> BayeuxConversation {
        BayeuxConversation {
            endpoint,
            client_id: None,
            transport_token,
            connected: false,
            held: Vec::new(),
            disconnected: false,
            routed: Vec::new(),
        }
    }

    fn cid(&self) -> &str {
        self.client_id.as_ref().map_or("", ClientId::as_str)
    }

    fn handshake(
        &mut self,
        id: Option<&Id>,
        token: Option<String>,
        steps: &mut Vec<Step>,
        out: &mut Batch,
    ) {
        let meta = Some(Meta::Handshake.channel());
        if let Some(cid) = &self.client_id {
            // A second handshake on a live session: the same client.
            let advice = Advice::retry(self.timeout_ms());
            out.push(&reply::handshake(id, cid.as_str(), &advice));
            return;
        }
        if let Some(verifier) = &self.endpoint.verifier {
            let token = token.or_else(|| self.transport_token.take());
            let verified = token
                .ok_or(AuthError::Missing)
                .and_then(|t| verifier.verify(&t));
            match verified {
                Ok(identity) => steps.push(Step::Authenticated(identity)),
                Err(e) => {
                    let message = e.to_string();
                    let error = Error::Refused {
                        code: 401,
                        args: "",
                        message: &message,
                    };
                    out.push(&reply::failure_with(meta, id, &error, Some(Advice::none())));
                    return;
                }
            }
        }
        let Ok(cid) = ClientId::generate() else {
            let error = Error::Refused {
                code: 500,
                args: "",
                message: "no randomness for a clientId",
            };
            out.push(&reply::failure(meta, id, &error));
            return;
        };
        let advice = Advice::retry(self.timeout_ms());
        out.push(&reply::handshake(id, cid.as_str(), &advice));
        steps.push(Step::Bind(cid.as_str().to_owned()));
        self.client_id = Some(cid);
    }

    fn timeout_ms(&self) -> u64 {
        u64::try_from(self.endpoint.connect_timeout.as_millis()).unwrap_or(u64::MAX)
    }

    /// Serves one message of a batch that is for this conversation's client.
    fn serve(&mut self, msg: message::Message, steps: &mut Vec<Step>, out: &mut Batch) {
        let id = msg.id.as_ref();
        let tag = || id.map(|i| i.json().get().to_owned());
        match msg.kind {
            // Served by `handshake` before a message gets here.
            Kind::Handshake { .. } => {}
            Kind::Connect { timeout_ms, .. } => {
                let first = !std::mem::replace(&mut self.connected, true);
                if first || timeout_ms == Some(0) {
                    let advice = first.then(|| Advice::retry(self.timeout_ms()));
                    out.push(&self.connect_reply(id, advice.as_ref()));
                } else {
                    // Replies queued so far go first.
                    flush(out, steps);
                    self.held.push(msg.id.clone());
                    steps.push(Step::Hold(self.endpoint.connect_timeout));
                }
            }
            Kind::Subscribe { subscriptions } => {
                let ext = msg.ext.as_ref().map(|e| e.get().to_owned());
                self.subscriptions(AckKind::Subscribe, subscriptions, id, ext, steps, out);
            }
            Kind::Unsubscribe { subscriptions } => {
                self.subscriptions(AckKind::Unsubscribe, subscriptions, id, None, steps, out);
            }
            Kind::Disconnect => {
                out.push(&reply::disconnect(id, self.cid()));
                self.disconnected = true;
                flush(out, steps);
                steps.push(Step::End);
            }
            Kind::Publish { channel, data } => {
                flush(out, steps);
                steps.push(Step::Request(Request::Publish {
                    channel: Bytes::from(channel.into_bytes()),
                    payload: Bytes::from(String::from(Box::<str>::from(data)).into_bytes()),
                    id: tag(),
                }));
            }
            Kind::Service { channel, data } if channel == PRESENCE_SERVICE => {
                match presence_request(data.get()) {
                    Ok((name, stats)) => {
                        flush(out, steps);
                        steps.push(Step::Request(Request::Presence {
                            channel: Bytes::from(name.into_bytes()),
                            id: tag(),
                            stats,
                        }));
                    }
                    Err(error) => out.push(&reply::failure(Some(PRESENCE_SERVICE), id, &error)),
                }
            }
            Kind::Service { channel, data } => match channel::service_name(&channel) {
                Some(service) => {
                    flush(out, steps);
                    steps.push(Step::Request(Request::ServicePublish {
                        service: service.to_owned(),
                        data: Bytes::from(String::from(Box::<str>::from(data)).into_bytes()),
                        id: tag(),
                    }));
                }
                None => out.push(&reply::failure(
                    Some(&channel),
                    id,
                    &Error::NoSuchService(&channel),
                )),
            },
        }
    }

    /// A `/meta/subscribe` or `/meta/unsubscribe`: each name answered on its
    /// own, refused here when it is not a name a client may hold, answered
    /// here for [`channel::GAP_CHANNEL`] and [`PRESENCE_SERVICE`], else asked
    /// of the session.
    fn subscriptions(
        &mut self,
        kind: AckKind,
        names: Vec<String>,
        id: Option<&Id>,
        ext: Option<String>,
        steps: &mut Vec<Step>,
        out: &mut Batch,
    ) {
        let count = names.len();
        // `ext.wsgate.since`: where a subscribe resumes (unsubscribes carry no ext).
        let resume = Resume::read(ext.as_deref());
        // `ext.wsgate.join_leave`: a presence channel's events too.
        let join_leave = super::resume::join_leave(ext.as_deref());
        let render = match kind {
            AckKind::Subscribe => reply::subscribe,
            AckKind::Unsubscribe => reply::unsubscribe,
        };
        for name in names {
            if let Some(service) = channel::service_name(&name) {
                flush(out, steps);
                let service = service.to_owned();
                let id = id.map(|i| i.json().get().to_owned());
                steps.push(Step::Request(match kind {
                    AckKind::Subscribe => Request::ServiceSubscribe { service, id },
                    AckKind::Unsubscribe => Request::ServiceUnsubscribe { service, id },
                }));
                continue;
            }
            let topic = match Subscription::parse(&name) {
                Err(e) => {
                    out.push(&render(id, self.cid(), &name, Some(&e.error(&name))));
                    continue;
                }
                Ok(sub) => match sub.topic() {
                    None => {
                        out.push(&render(id, self.cid(), &name, None));
                        continue;
                    }
                    Some(topic) => topic.clone(),
                },
            };
            let join_leave = match (kind, join_leave, &topic) {
                (AckKind::Unsubscribe, ..) | (_, Ok(false), _) => false,
                (_, Ok(true), crate::broker::Topic::Channel(_)) => true,
                (_, Ok(true), crate::broker::Topic::Pattern(_)) => {
                    let bad = Error::BadRequest(super::resume::JOIN_LEAVE_CHANNELS);
                    out.push(&render(id, self.cid(), &name, Some(&bad)));
                    continue;
                }
                (_, Err(_), _) => {
                    let bad = Error::BadRequest(super::resume::BAD_JOIN_LEAVE);
                    out.push(&render(id, self.cid(), &name, Some(&bad)));
                    continue;
                }
            };
            let Ok(since) = resume.since_for(&topic, count) else {
                let bad = Error::BadRequest(super::resume::BAD);
                out.push(&render(id, self.cid(), &name, Some(&bad)));
                continue;
            };
            flush(out, steps);
            let id = id.map(|i| i.json().get().to_owned());
            steps.push(Step::Request(match kind {
                AckKind::Subscribe => Request::Subscribe {
                    topic,
                    id,
                    ext: ext.clone(),
                    since,
                    join_leave,
                },
                AckKind::Unsubscribe => Request::Unsubscribe { topic, id },
            }));
        }
    }

    fn connect_reply(&self, id: Option<&Id>, advice: Option<&Advice>) -> String {
        let map = self.endpoint.nodefony.as_ref().map(ServiceMap::render);
        let data = map
            .as_deref()
            .and_then(|m| serde_json::from_str::<&RawValue>(m).ok());
        reply::connect(id, self.cid(), advice, None, data)
    }

    /// The Bayeux error for a refusal of `name` (a subscription or a
    /// channel), or `None` when Bayeux counts it as done (subscribing twice,
    /// unsubscribing what is not held: both idempotent, as in CometD).
    fn refusal<'a>(refusal: &'a Refusal, name: &'a str) -> Option<Error<'a>> {
        let refused = |code, message| Error::Refused {
            code,
            args: name,
            message,
        };
        Some(match refusal {
            Refusal::AlreadySubscribed | Refusal::NotSubscribed => return None,
            Refusal::NotAllowed => Error::Forbidden(name),
            Refusal::Denied(_) | Refusal::Other(_) => refused(403, refusal.message()),
            Refusal::RateLimited => refused(429, refusal.message()),
            Refusal::Cancelled => refused(409, refusal.message()),
            Refusal::Unavailable(_) => refused(503, refusal.message()),
        })
    }

    /// The Bayeux error for a refused service request on `channel`, or
    /// `None` when Bayeux counts it as done (opening a line already open,
    /// closing one not open). A refusal naming a call error
    /// (`docs/services.md`) takes that error's code: `404:<channel>:No such
    /// service`, `413:<channel>:payload too large`, `429:<channel>:too many
    /// calls in flight`...
    fn service_refusal<'a>(
        kind: ServiceOp,
        refusal: &'a Refusal,
        channel: &'a str,
    ) -> Option<Error<'a>> {
        let refused = |code, message| Error::Refused {
            code,
            args: channel,
            message,
        };
        Some(match refusal {
            Refusal::AlreadySubscribed | Refusal::NotSubscribed if kind != ServiceOp::Publish => {
                return None
            }
            Refusal::NotSubscribed => refused(404, "not subscribed"),
            Refusal::Other(text) => match call_error(text) {
                Some(CallError::NoSuchService) => Error::NoSuchService(channel),
                Some(e) => refused(u16::try_from(e.code()).unwrap_or(500), text),
                None => refused(403, text),
            },
            _ => return Self::refusal(refusal, channel),
        })
    }
}

/// The call error whose text `text` is, if any (the session phrases a
/// refused service request by its call error's text).
fn call_error(text: &str) -> Option<CallError> {
    [
        CallError::NoSuchService,
        CallError::NoSuchMethod,
        CallError::Timeout,
        CallError::ServiceGone,
        CallError::Busy,
        CallError::TooLarge,
        CallError::Unavailable,
    ]
    .into_iter()
    .find(|e| e.message() == text)
}

/// Moves the replies gathered so far into a step of their own, so that they
/// keep their place before the requests that follow.
fn flush(out: &mut Batch, steps: &mut Vec<Step>) {
    if !out.is_empty() {
        let batch = std::mem::take(out);
        steps.push(Step::Reply(Frame::text(batch.finish())));
    }
}

/// The `data` of a publish to [`PRESENCE_SERVICE`]: `{"channel":<a
/// broadcast channel name>}`, with an optional `"stats":true` for the
/// counts only. A channel that is not a broadcast name (a wildcard,
/// `/meta/..`) is `405`; anything else malformed `400`.
fn presence_request(data: &str) -> Result<(String, bool), Error<'static>> {
    #[derive(serde::Deserialize)]
    struct Ask {
        channel: String,
        #[serde(default)]
        stats: Option<bool>,
    }
    let ask: Ask = serde_json::from_str(data).map_err(|_| Error::BadRequest(PRESENCE_BAD))?;
    let broadcast = channel::is_name(ask.channel.as_bytes())
        && channel::class(&ask.channel) == channel::Class::Broadcast;
    if !broadcast {
        return Err(Error::BadRequest(PRESENCE_NOT_A_CHANNEL));
    }
    Ok((ask.channel, ask.stats.unwrap_or(false)))
}

/// The reason of the `400` for a presence request whose `data` is not
/// `{"channel":..}`.
const PRESENCE_BAD: &str = "bad presence request";

/// The reason of the `400` for a presence request of a name that is not a
/// broadcast channel (a wildcard, `/meta/..`, `/service/..`, `/wsgate/..`).
const PRESENCE_NOT_A_CHANNEL: &str = "presence is for broadcast channels";

/// The id a request was tagged with, as an [`Id`] again.
fn untag(tag: Option<&str>) -> Option<Id> {
    tag.and_then(Id::from_json)
}

impl Conversation for BayeuxConversation {
    fn name(&self) -> &'static str {
        "bayeux"
    }

    fn render(&self) -> Arc<dyn Render> {
        self.endpoint.render.clone()
    }

    fn decode(&mut self, inbound: Inbound<'_>, steps: &mut Vec<Step>) {
        let decoded = match inbound {
            Inbound::Text(text) => message::decode_json(text.as_bytes(), &self.endpoint.limits),
            Inbound::Binary(bytes) => message::decode_json(bytes, &self.endpoint.limits),
        };
        let batch: Vec<Decoded> = match decoded {
            Ok(batch) => batch,
            Err(e) => {
                steps.push(Step::Malformed(Frame::text(reply::bad_body(&e))));
                return;
            }
        };
        // A fresh conversation (a WebSocket whose handshake went over HTTP)
        // given a batch for a clientId: the batch belongs to that session.
        if self.client_id.is_none() {
            let handshake = batch
                .iter()
                .any(|m| matches!(m, Ok(m) if matches!(m.kind, Kind::Handshake { .. })));
            let theirs = batch
                .iter()
                .find_map(|m| m.as_ref().ok().and_then(|m| m.client_id.clone()));
            if let (false, Some(theirs)) = (handshake, theirs) {
                self.routed = batch
                    .into_iter()
                    .filter_map(Result::ok)
                    .map(|m| (msg_channel(&m.kind).map(str::to_owned), m.id))
                    .collect();
                steps.push(Step::Route(theirs));
                return;
            }
        }
        let mut out = Batch::new();
        let mut malformed = Batch::new();
        for entry in batch {
            let msg = match entry {
                Ok(msg) => msg,
                Err(e) => {
                    malformed.push(&reply::rejected(&e));
                    continue;
                }
            };
            if let Kind::Handshake { token, .. } = msg.kind {
                self.handshake(msg.id.as_ref(), token, steps, &mut out);
                continue;
            }
            let mine = match (&self.client_id, &msg.client_id) {
                (Some(own), Some(theirs)) => own.as_str() == theirs,
                _ => false,
            };
            if !mine {
                let channel = msg_channel(&msg.kind);
                let error = Error::UnknownClient(msg.client_id.as_deref().unwrap_or(""));
                out.push(&reply::failure(channel, msg.id.as_ref(), &error));
                continue;
            }
            self.serve(msg, steps, &mut out);
        }
        if !malformed.is_empty() {
            steps.push(Step::Malformed(Frame::text(malformed.finish())));
        }
        flush(&mut out, steps);
    }

    fn answer(&mut self, answer: Answer<'_>, out: &mut Vec<Frame>) {
        let text = match answer {
            Answer::Ack(Ack {
                kind,
                topic,
                id,
                error,
                recovered,
            }) => {
                let name = channel::subscription_name(topic);
                let id = untag(id);
                let error = error.and_then(|r| Self::refusal(r, &name));
                let one = match (kind, recovered) {
                    (AckKind::Subscribe, Some(recovered)) if error.is_none() => {
                        reply::subscribe_recovered(id.as_ref(), self.cid(), &name, recovered)
                    }
                    (AckKind::Subscribe, _) => {
                        reply::subscribe(id.as_ref(), self.cid(), &name, error.as_ref())
                    }
                    (AckKind::Unsubscribe, _) => {
                        reply::unsubscribe(id.as_ref(), self.cid(), &name, error.as_ref())
                    }
                };
                wrap(&one)
            }
            Answer::Published {
                channel, id, error, ..
            } => {
                let name = String::from_utf8_lossy(channel);
                let id = untag(id);
                let error = error.and_then(|r| Self::refusal(r, &name));
                wrap(&reply::publish(id.as_ref(), &name, error.as_ref()))
            }
            Answer::UnknownClient { key } => {
                let mut batch = Batch::new();
                for (channel, id) in self.routed.drain(..) {
                    let error = Error::UnknownClient(key);
                    batch.push(&reply::failure(channel.as_deref(), id.as_ref(), &error));
                }
                batch.finish()
            }
            Answer::ServiceAck {
                kind,
                service,
                id,
                error,
            } => {
                let name = format!("/service/{service}");
                let id = untag(id);
                let error = error.and_then(|r| Self::service_refusal(kind, r, &name));
                let (id, error) = (id.as_ref(), error.as_ref());
                wrap(&match kind {
                    ServiceOp::Subscribe => reply::subscribe(id, self.cid(), &name, error),
                    ServiceOp::Unsubscribe => reply::unsubscribe(id, self.cid(), &name, error),
                    ServiceOp::Publish => reply::publish(id, &name, error),
                })
            }
            Answer::ServiceData { service, id, data } => {
                let name = format!("/service/{service}");
                wrap(&reply::service_message(&name, untag(id).as_ref(), data))
            }
            Answer::ServiceEnded { service, reason } => {
                reply::service_ended(&format!("/service/{service}"), self.cid(), reason)
            }
            Answer::Presence {
                channel,
                id,
                stats,
                outcome,
            } => {
                let name = String::from_utf8_lossy(channel);
                let id = untag(id);
                match outcome {
                    Ok(members) => wrap(&reply::presence(id.as_ref(), &name, stats, members)),
                    Err(refusal) => {
                        let error = Self::refusal(refusal, &name).unwrap_or(Error::Refused {
                            code: 500,
                            args: &name,
                            message: "presence refused",
                        });
                        wrap(&reply::failure(Some(PRESENCE_SERVICE), id.as_ref(), &error))
                    }
                }
            }
            Answer::Pong { .. }
            | Answer::Refreshed { .. }
            | Answer::Revoked { .. }
            | Answer::Called { .. } => return,
        };
        out.push(Frame::text(text));
    }

    fn release(&mut self) -> Option<Frame> {
        if self.held.is_empty() {
            return None;
        }
        let id = self.held.remove(0);
        Some(Frame::text(wrap(&self.connect_reply(id.as_ref(), None))))
    }

    fn may_linger(&self) -> bool {
        true
    }

    fn linger(&self) -> Option<Duration> {
        (self.client_id.is_some() && !self.disconnected).then_some(self.endpoint.session_timeout)
    }

    fn key(&self) -> Option<&str> {
        self.client_id.as_ref().map(ClientId::as_str)
    }

    fn adopt(&mut self, key: &str) -> bool {
        if self.client_id.is_some() {
            return false;
        }
        let Some(cid) = ClientId::parse(key) else {
            return false;
        };
        self.client_id = Some(cid);
        self.routed.clear();
        true
    }

    fn unknown(&mut self, inbound: Inbound<'_>, key: &str) -> Option<Frame> {
        let bytes = match inbound {
            Inbound::Text(text) => text.as_bytes(),
            Inbound::Binary(bytes) => bytes,
        };
        let batch = message::decode_json(bytes, &self.endpoint.limits).ok()?;
        Some(Frame::text(unknown_batch(&batch, key)))
    }
}

impl BayeuxConversation {
    /// A conversation for a session issued by another node and adopted
    /// here before its first message (a long-poll naming it).
    pub fn adopted(endpoint: Arc<Endpoint>, client_id: ClientId) -> BayeuxConversation {
        let mut conv = BayeuxConversation::new(endpoint, None);
        conv.client_id = Some(client_id);
        conv
    }
}

/// Every message of `batch` answered `402 Unknown client` for `client_id`
/// (a malformed one with its own error), as one array.
pub fn unknown_batch(batch: &[Decoded], client_id: &str) -> String {
    let mut out = Batch::new();
    let error = Error::UnknownClient(client_id);
    for entry in batch {
        match entry {
            Ok(m) => out.push(&reply::failure(msg_channel(&m.kind), m.id.as_ref(), &error)),
            Err(e) => out.push(&reply::rejected(e)),
        }
    }
    out.finish()
}

/// The channel of a decoded message, for an error reply.
fn msg_channel(kind: &Kind) -> Option<&str> {
    Some(match kind {
        Kind::Handshake { .. } => Meta::Handshake.channel(),
        Kind::Connect { .. } => Meta::Connect.channel(),
        Kind::Subscribe { .. } => Meta::Subscribe.channel(),
        Kind::Unsubscribe { .. } => Meta::Unsubscribe.channel(),
        Kind::Disconnect => Meta::Disconnect.channel(),
        Kind::Publish { channel, .. } | Kind::Service { channel, .. } => channel,
    })
}

/// One message as a batch.
fn wrap(message: &str) -> String {
    let mut batch = Batch::new();
    batch.push(message);
    batch.finish()
}
