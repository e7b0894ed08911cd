//! `WSGATE_SERVICES_PATH`: the WebSocket of service and consumer processes
//! (`docs/services.md`), one task per connection.
//!
//! The upgrade is admitted like any other, then needs a credential: the
//! shared `WSGATE_SERVICE_KEY` (`Authorization: Bearer <key>` or `?key=`),
//! which may register any service and call anything (a trusted backend), or
//! a JWT whose `services` claim names what it may register and whose `call`
//! claim (or `WSGATE_CALL_ALLOW`) what it may call. Without either: 401.
//!
//! The task reads the process's messages, writes what the router sends it,
//! and keeps the calls this instance was handed until it replies or their
//! caller's deadline passes. When the connection ends, every call it still
//! held is answered `service gone` at once, and its instance leaves the
//! directory (dropping its [`ProcessHandle`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tracing::{debug, Instrument};
use warp::http::HeaderMap;

use super::admission::Admitted;
use super::unauthorised;
use crate::app::App;
use crate::auth::{self, Identity};
use crate::rpc::directory::Instance;
use crate::rpc::process::{IncomingCall, Origin, ProcessHandle, ToProcess, MAILBOX};
use crate::rpc::{self, CallError, Event, Outgoing, Registration};
use crate::shutdown::Phase;

/// How long one write to a process may take before it counts as gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most frames gathered into one write.
const WRITE_BATCH: usize = 64;
/// How often calls whose caller gave up are forgotten.
const SWEEP: Duration = Duration::from_millis(500);
/// Most methods one instance may register.
const MAX_METHODS: usize = 256;
/// Longest version string.
const MAX_VERSION_BYTES: usize = 64;
/// Service names no process may register.
const RESERVED: &str = "wsgate";

/// Who the process proved to be.
enum Credential {
    /// The shared service key.
    Key,
    /// A token with a `services` claim.
    Token(Box<Identity>),
}

/// The upgrade after its admission: checks the credential and starts the
/// connection's task; the `101`, or the 401.
pub fn accept(
    app: Arc<App>,
    admitted: Admitted,
    headers: &HeaderMap,
    query: &str,
    upgrade: OnUpgrade,
    switching: warp::reply::Response,
) -> warp::reply::Response {
    let Some(credential) = credential(&app, headers, query) else {
        app.metrics
            .refused
            .with_label_values(&["unauthorized"])
            .inc();
        return unauthorised(
            "a service key or a token with a services claim is required",
            "Bearer realm=\"wsgate\"",
        );
    };
    let config = app.ws_config();
    let span = tracing::info_span!("service", client = %admitted.client_ip);
    tokio::spawn(
        async move {
            match upgrade.await {
                Ok(upgraded) => {
                    let ws = WebSocketStream::from_raw_socket(
                        TokioIo::new(upgraded),
                        Role::Server,
                        Some(config),
                    )
                    .await;
                    serve(app, ws, credential, admitted).await;
                }
                Err(e) => debug!(cause = %e, "upgrade failed"),
            }
        }
        .instrument(span),
    );
    switching
}

/// The key (`Bearer` or `?key=`) or a verified token with a `services`
/// claim.
fn credential(app: &App, headers: &HeaderMap, query: &str) -> Option<Credential> {
    let bearer = auth::bearer(headers).ok().flatten();
    let key = query
        .split('&')
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| *k == "key")
        .and_then(|(_, v)| auth::percent_decode(v));
    if let Some(expected) = &app.config.service_key {
        let given = [bearer.as_deref(), key.as_deref()];
        if given
            .iter()
            .flatten()
            .any(|g| auth::secrets_equal(g.as_bytes(), expected.expose()))
        {
            return Some(Credential::Key);
        }
    }
    let verifier = app.verifier.as_ref()?;
    let token = auth::request_token(headers, query).ok()?;
    let identity = verifier.verify(&token).ok()?;
    (!identity.services_acl.is_empty()).then(|| Credential::Token(Box::new(identity)))
}

/// A process's message, as it is read.
#[derive(Deserialize)]
struct Incoming {
    #[serde(rename = "type")]
    kind: Option<String>,
    id: Option<serde_json::Value>,
    name: Option<String>,
    version: Option<String>,
    methods: Option<Vec<String>>,
    destination: Option<String>,
    consumer: Option<String>,
    responder: Option<String>,
    payload: Option<Box<RawValue>>,
    error: Option<ReplyError>,
    timeout_ms: Option<u64>,
    events: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct ReplyError {
    code: Option<i64>,
    message: Option<String>,
}

/// A call this instance was handed and has not answered.
struct Handed {
    origin: Origin,
    deadline: Instant,
}

/// A call this process made, ended: its id, its responder, the outcome.
type Made = BoxFuture<'static, (String, Option<String>, Result<Bytes, CallError>)>;

/// One process connection's state.
struct Connection {
    app: Arc<App>,
    handle: ProcessHandle,
    credential: Credential,
    instance: Option<Arc<Instance>>,
    handed: HashMap<String, Handed>,
    made: FuturesUnordered<Made>,
    next_id: u64,
}

async fn serve(
    app: Arc<App>,
    mut ws: WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>,
    credential: Credential,
    admitted: Admitted,
) {
    let (handle, mut mailbox) = app.rpc.connect();
    let mut phase = app.phase.subscribe();
    let mut conn = Connection {
        app: app.clone(),
        handle,
        credential,
        instance: None,
        handed: HashMap::new(),
        made: FuturesUnordered::new(),
        next_id: 0,
    };
    let mut sweep = tokio::time::interval(SWEEP);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let out = tokio::select! {
            changed = phase.changed() => {
                if changed.is_err() || *phase.borrow() == Phase::Stopping {
                    break;
                }
                continue;
            }
            frame = ws.next() => match frame {
                Some(Ok(Message::Text(text))) => conn.message(text.as_str()).await,
                Some(Ok(Message::Binary(_))) => Some(error(None, "binary frames are not supported: send JSON text")),
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => None,
            },
            msg = mailbox.recv() => match msg {
                Some(msg) => conn.frame_for(msg),
                None => break,
            },
            Some((id, responder, outcome)) = conn.made.next(), if !conn.made.is_empty() => {
                Some(reply_frame(&id, responder.as_deref(), &outcome))
            }
            _ = sweep.tick() => {
                let now = Instant::now();
                conn.handed.retain(|_, h| h.deadline > now);
                None
            }
        };
        if let Some(text) = out {
            let sent =
                tokio::time::timeout(WRITE_TIMEOUT, write(&mut ws, &mut conn, &mut mailbox, text))
                    .await;
            if !matches!(sent, Ok(Ok(()))) {
                break;
            }
        }
    }
    for (_, handed) in conn.handed.drain() {
        app.rpc.reply(handed.origin, Err(CallError::ServiceGone));
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
    drop(conn);
    drop(admitted);
}

/// Writes `first` and whatever else the mailbox already holds (up to
/// [`WRITE_BATCH`] frames), then flushes once: under load the calls handed
/// to an instance go out in one write, not one syscall each.
async fn write(
    ws: &mut WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>,
    conn: &mut Connection,
    mailbox: &mut tokio::sync::mpsc::Receiver<ToProcess>,
    first: String,
) -> Result<(), tokio_tungstenite::tungstenite::Error> {
    ws.feed(Message::text(first)).await?;
    for _ in 1..WRITE_BATCH {
        let Ok(msg) = mailbox.try_recv() else {
            break;
        };
        if let Some(text) = conn.frame_for(msg) {
            ws.feed(Message::text(text)).await?;
        }
    }
    ws.flush().await
}

impl Connection {
    /// The frame for what the router sent this process, if any.
    fn frame_for(&mut self, msg: ToProcess) -> Option<String> {
        match msg {
            ToProcess::Call(call) => self.handed(call),
            ToProcess::Text(text) => Some(text),
        }
    }

    /// Serves one message; the frame to answer with, if any.
    async fn message(&mut self, text: &str) -> Option<String> {
        let msg: Incoming = match serde_json::from_str(text) {
            Ok(m) => m,
            Err(e) => return Some(error(None, &format!("invalid message: {e}"))),
        };
        let id = match &msg.id {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(_) => return Some(error(None, "\"id\" must be a string")),
        };
        match msg.kind.as_deref() {
            Some("register") => Some(self.register(msg, id.as_deref()).await),
            Some("message") => self.call(msg, id),
            Some("reply") => self.reply(msg, id),
            Some("broadcast") => self.broadcast(msg, id.as_deref()).await,
            Some("subscribe") => self.subscribe(msg, id.as_deref()),
            Some(other) => Some(error(
                id.as_deref(),
                &format!("unknown type {other:?}: expected register, message, reply, broadcast or subscribe"),
            )),
            None => Some(error(id.as_deref(), "missing field \"type\"")),
        }
    }

    async fn register(&mut self, msg: Incoming, id: Option<&str>) -> String {
        if self.instance.is_some() {
            return error(id, "already registered");
        }
        let Some(name) = msg.name else {
            return error(id, "missing field \"name\"");
        };
        if !rpc::valid_service_name(&name) {
            return error(id, "invalid name: expected 1 to 64 of A-Z a-z 0-9 _ -");
        }
        if name == RESERVED {
            return error(id, "the name wsgate is reserved");
        }
        let version = msg.version.unwrap_or_default();
        if version.len() > MAX_VERSION_BYTES {
            return error(id, "version longer than 64 bytes");
        }
        let methods = msg.methods.unwrap_or_default();
        if methods.len() > MAX_METHODS {
            return error(id, "more than 256 methods");
        }
        if let Some(bad) = methods.iter().find(|m| !rpc::valid_method_name(m)) {
            return error(
                id,
                &format!("invalid method {bad:?}: expected 1 to 128 of A-Z a-z 0-9 _ - ."),
            );
        }
        let may = match &self.credential {
            Credential::Key => true,
            Credential::Token(identity) => identity.services_acl.allows_publish(name.as_bytes()),
        };
        if !may {
            return error(id, "not allowed");
        }
        let mut unique = methods.clone();
        unique.sort();
        unique.dedup();
        let registration = Registration {
            name,
            version,
            methods: unique,
        };
        match self.app.rpc.register(&self.handle, registration).await {
            Ok(instance) => {
                let frame = format!(
                    "{{\"type\":\"registered\",\"name\":{},\"version\":{},\"instance\":{},\"node\":{}}}",
                    json_str(&instance.service),
                    json_str(&instance.version),
                    json_str(&instance.instance),
                    json_str(&instance.node),
                );
                self.instance = Some(instance);
                frame
            }
            Err(e) => error(id, &e.to_string()),
        }
    }

    /// A call this process makes.
    fn call(&mut self, msg: Incoming, id: Option<String>) -> Option<String> {
        let Some(id) = id else {
            return Some(error(None, "a message needs an \"id\""));
        };
        let Some(instance) = &self.instance else {
            return Some(error(Some(&id), "register first"));
        };
        let Some(destination) = msg.destination else {
            return Some(error(Some(&id), "missing field \"destination\""));
        };
        let Some((service, method)) = destination.split_once(':') else {
            return Some(reply_frame(
                &id,
                msg.responder.as_deref(),
                &Err(CallError::Invalid(
                    "destination must be service:method".into(),
                )),
            ));
        };
        let may = match &self.credential {
            Credential::Key => true,
            Credential::Token(identity) => {
                identity.call_acl.allows_publish(destination.as_bytes())
                    || self.app.call_allow.allows_publish(destination.as_bytes())
            }
        };
        let refused = if !may {
            Some(CallError::NotAllowed)
        } else if self.made.len() >= self.app.config.max_calls_in_flight.get() {
            Some(CallError::Busy)
        } else {
            None
        };
        if let Some(e) = refused {
            return Some(reply_frame(&id, msg.responder.as_deref(), &Err(e)));
        }
        let cap = self.app.rpc.call_timeout();
        let params = msg
            .payload
            .map(|p| Bytes::from(p.get().to_owned()))
            .unwrap_or_else(|| Bytes::from_static(b"null"));
        let outgoing = Outgoing {
            service: service.to_owned(),
            method: method.to_owned(),
            params,
            consumer: Some(msg.consumer.unwrap_or_else(|| instance.service.clone())),
            timeout: msg
                .timeout_ms
                .map_or(cap, |ms| Duration::from_millis(ms.max(1)).min(cap)),
            responder: msg.responder.clone(),
        };
        let done = self.app.rpc.call(outgoing);
        let responder = msg.responder;
        self.made
            .push(Box::pin(async move { (id, responder, done.await) }));
        None
    }

    /// The router hands this instance a call.
    fn handed(&mut self, call: IncomingCall) -> Option<String> {
        if self.handed.len() >= MAILBOX {
            self.app.rpc.reply(call.origin, Err(CallError::Busy));
            return None;
        }
        self.next_id += 1;
        let id = format!("{}", self.next_id);
        let mut frame = format!(
            "{{\"type\":\"message\",\"id\":{},\"destination\":{}",
            json_str(&id),
            json_str(&call.destination)
        );
        if let Some(c) = &call.consumer {
            frame.push_str(&format!(",\"consumer\":{}", json_str(c)));
        }
        if let Some(r) = &call.responder {
            frame.push_str(&format!(",\"responder\":{}", json_str(r)));
        }
        frame.push_str(&format!(",\"payload\":{}}}", call.payload.get()));
        self.handed.insert(
            id,
            Handed {
                origin: call.origin,
                deadline: call.deadline,
            },
        );
        Some(frame)
    }

    /// This instance answers a call it was handed.
    fn reply(&mut self, msg: Incoming, id: Option<String>) -> Option<String> {
        let Some(id) = id else {
            return Some(error(None, "a reply needs the \"id\" of its message"));
        };
        let Some(handed) = self.handed.remove(&id) else {
            // Its caller gave up (or it never was): dropped, counted.
            self.app.rpc.late_reply();
            return None;
        };
        let outcome = match (msg.error, msg.payload) {
            (Some(e), _) => Err(CallError::Failed {
                code: e.code.unwrap_or(500),
                message: e.message.unwrap_or_else(|| "service error".into()),
            }),
            (None, Some(p)) if p.get().len() > self.app.rpc.max_call_bytes() => {
                self.app.rpc.reply(handed.origin, Err(CallError::TooLarge));
                return Some(error(Some(&id), "reply larger than WSGATE_MAX_CALL_BYTES: the caller was told payload too large"));
            }
            (None, Some(p)) => Ok(Bytes::from(p.get().to_owned())),
            (None, None) => Ok(Bytes::from_static(b"null")),
        };
        self.app.rpc.reply(handed.origin, outcome);
        None
    }

    async fn broadcast(&mut self, msg: Incoming, id: Option<&str>) -> Option<String> {
        let Some(instance) = &self.instance else {
            return Some(error(id, "register first"));
        };
        let payload = msg.payload.unwrap_or_else(|| RawValue::NULL.to_owned());
        if payload.get().len() > self.app.rpc.max_call_bytes() {
            return Some(error(id, "payload too large"));
        }
        match self.app.rpc.broadcast(instance, &payload).await {
            Ok(()) => None,
            Err(e) => Some(error(id, &e.message())),
        }
    }

    fn subscribe(&mut self, msg: Incoming, id: Option<&str>) -> Option<String> {
        let names = msg.events.unwrap_or_default();
        let mut events = Vec::with_capacity(names.len());
        for name in &names {
            match Event::from_name(name) {
                Some(e) => events.push(e),
                None => {
                    return Some(error(
                        id,
                        &format!("unknown event {name:?}: expected connect, online, disconnect, offline, broadcast or unhandled"),
                    ))
                }
            }
        }
        self.handle.subscribe(&events);
        None
    }
}

/// The end of a call this process made.
fn reply_frame(id: &str, responder: Option<&str>, outcome: &Result<Bytes, CallError>) -> String {
    let mut frame = format!("{{\"type\":\"reply\",\"id\":{}", json_str(id));
    if let Some(r) = responder {
        frame.push_str(&format!(",\"responder\":{}", json_str(r)));
    }
    match outcome {
        Ok(payload) => {
            frame.push_str(",\"payload\":");
            frame.push_str(&String::from_utf8_lossy(payload));
        }
        Err(e) => frame.push_str(&format!(
            ",\"error\":{{\"code\":{},\"message\":{}}}",
            e.code(),
            json_str(&e.message())
        )),
    }
    frame.push('}');
    frame
}

/// `{"type":"error","id":..,"message":..}`.
fn error(id: Option<&str>, message: &str) -> String {
    match id {
        Some(id) => format!(
            "{{\"type\":\"error\",\"id\":{},\"message\":{}}}",
            json_str(id),
            json_str(message)
        ),
        None => format!("{{\"type\":\"error\",\"message\":{}}}", json_str(message)),
    }
}

/// `s` as a JSON string.
fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_byte_exact() {
        assert_eq!(
            reply_frame("c1", Some("cb"), &Ok(Bytes::from_static(b"{\"ok\":1}"))),
            r#"{"type":"reply","id":"c1","responder":"cb","payload":{"ok":1}}"#
        );
        assert_eq!(
            reply_frame("c1", None, &Err(CallError::NoSuchService)),
            r#"{"type":"reply","id":"c1","error":{"code":404,"message":"no such service"}}"#
        );
        assert_eq!(
            error(Some("x"), "register first"),
            r#"{"type":"error","id":"x","message":"register first"}"#
        );
    }
}
