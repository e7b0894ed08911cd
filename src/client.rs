//! A reconnecting client of the native protocol, for programs that consume
//! wsgate: the cluster test, load generators, back-end services.
//!
//! [`run`] connects to one URL (typically a load balancer in front of N
//! nodes), subscribes to every [`Subscription`] of its [`ClientConfig`] and
//! waits for each `status:true`, then forwards every other text frame to the
//! caller as raw text: deliveries are never parsed here, the caller decides
//! what to decode. When the connection ends (the node drained with 1012, died,
//! or the load balancer dropped it), it reconnects with jittered exponential
//! backoff and subscribes again, until the shutdown future resolves, the
//! caller drops the event receiver, or [`ClientConfig::give_up_after`]
//! consecutive attempts have failed.
//!
//! Redis pub/sub is at-most-once: whatever is published between
//! [`Event::Disconnected`] and the next [`Event::Subscribed`] is lost for this
//! client; the pair brackets the gap so the caller can refetch state. The same
//! logic, in JavaScript for browsers, is the README's example client.
//!
//! Every wait is bounded: the connect (`connect_timeout`), the subscribe phase
//! (`subscribe_timeout`), each write (`connect_timeout`), and the silence on an
//! established connection (`idle_timeout`; the server pings every 25 s).

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};

use crate::backoff::backoff;
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Every delivery starts with this; such frames are forwarded without parsing.
const DELIVERY_PREFIX: &str = "{\"action\":\"message\"";
/// Pause before re-sending a subscribe the server refused with `rate limited`
/// (its token bucket refills `WSGATE_SUBSCRIBE_RATE` per second).
const RATE_LIMITED_RETRY: Duration = Duration::from_millis(250);
/// How long a polite close (our close frame, the server's reply) may take on
/// shutdown before the socket is just dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// One interest, kept across reconnects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subscription {
    /// A Redis glob pattern (`PSUBSCRIBE` on the node).
    Pattern(String),
    /// An exact channel (`SUBSCRIBE` on the node): cheaper for Redis.
    Channel(String),
}

impl Subscription {
    /// The JSON field naming this kind of subscription in requests and replies.
    fn field(&self) -> &'static str {
        match self {
            Subscription::Pattern(_) => "pattern",
            Subscription::Channel(_) => "channel",
        }
    }

    fn name(&self) -> &str {
        match self {
            Subscription::Pattern(n) | Subscription::Channel(n) => n,
        }
    }

    /// The subscribe request frame, with `id` for matching the reply.
    fn request(&self, id: &str) -> String {
        let mut frame = serde_json::Map::new();
        frame.insert("action".into(), "subscribe".into());
        frame.insert(self.field().into(), self.name().into());
        frame.insert("id".into(), id.into());
        serde_json::Value::Object(frame).to_string()
    }
}

impl fmt::Display for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {:?}", self.field(), self.name())
    }
}

/// What to connect to and how persistently; [`ClientConfig::new`] fills in
/// defaults suited to a gateway behind a load balancer.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `ws://host:port/path` of a node or of the load balancer in front of them.
    pub url: String,
    /// Subscribed on every connection, in this order.
    pub subscriptions: Vec<Subscription>,
    /// First reconnect delay (default 50 ms): short, because a drained node's
    /// clients should land on another node quickly, and the drain itself
    /// already spreads them over time.
    pub backoff_min: Duration,
    /// Cap of the doubling delay (default 2 s), so a client finds the
    /// service again soon after an outage without hammering it meanwhile.
    pub backoff_max: Duration,
    /// Bound on the TCP + WebSocket handshake and on each write (default 5 s).
    pub connect_timeout: Duration,
    /// Bound on confirming every subscription of one connection (default 10 s,
    /// above the node's own 5 s `WSGATE_SUBSCRIBE_TIMEOUT_MS`).
    pub subscribe_timeout: Duration,
    /// A connection silent this long counts as dead and is replaced (default
    /// 60 s: the server pings every 25 s, so silence means a dead path).
    pub idle_timeout: Duration,
    /// Subscribe requests sent before their replies arrive (default 32):
    /// pipelined for speed, below the node's per-connection rate burst.
    pub max_in_flight: usize,
    /// Stop with [`ClientError::GaveUp`] after this many consecutive failed
    /// attempts; `None` (the default) retries until shut down, as a
    /// long-running consumer should.
    pub give_up_after: Option<u32>,
}

impl ClientConfig {
    /// A config for `url` with `subscriptions` and default timings.
    pub fn new(url: impl Into<String>, subscriptions: Vec<Subscription>) -> ClientConfig {
        ClientConfig {
            url: url.into(),
            subscriptions,
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(5),
            subscribe_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_in_flight: 32,
            give_up_after: None,
        }
    }
}

/// What the client tells its caller, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Every subscription is confirmed on connection number `connection`
    /// (1 for the first): from here on every publish is delivered.
    Subscribed {
        /// Counts WebSocket handshakes of this client, from 1.
        connection: u64,
    },
    /// A text frame that is not a reply to our subscribes: a delivery, a gap
    /// notice, an error. Raw, as the server sent it.
    Text(String),
    /// Connection number `connection` ended; a reconnect follows (unless the
    /// client is stopping). Messages published from now until the next
    /// [`Event::Subscribed`] are lost for this client.
    Disconnected {
        /// The connection that ended.
        connection: u64,
        /// Why it ended.
        reason: Ended,
    },
}

/// Why an established connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// The server sent a close frame (1012 while a node drains, 1001 when it
    /// stops, 4008 for a slow consumer, ...).
    Closed {
        /// The close code (1005 when the frame carried none).
        code: u16,
        /// The close reason text.
        reason: String,
    },
    /// The stream ended or failed without a close frame (node killed,
    /// connection reset).
    Lost(String),
    /// Nothing arrived for `idle_timeout`.
    Idle,
    /// The subscriptions were not all confirmed within `subscribe_timeout`.
    SubscribeTimeout,
    /// The node answered `broker unavailable` (its Redis is away): try again.
    BrokerUnavailable,
}

impl fmt::Display for Ended {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ended::Closed { code, reason } => write!(f, "closed by the server: {code} {reason}"),
            Ended::Lost(cause) => write!(f, "connection lost: {cause}"),
            Ended::Idle => f.write_str("no frame within the idle timeout"),
            Ended::SubscribeTimeout => f.write_str("subscriptions not confirmed in time"),
            Ended::BrokerUnavailable => f.write_str("the node's broker is unavailable"),
        }
    }
}

/// Counters of one [`run`], returned when it stops.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// WebSocket handshakes completed.
    pub connections: u64,
    /// Handshakes after the first: how often the client had to come back.
    pub reconnects: u64,
    /// Attempts that did not reach a fully subscribed connection (refused
    /// connect, handshake error, timeout, broker unavailable).
    pub failed_attempts: u64,
}

/// Why [`run`] stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The URL cannot be used; retrying would not help.
    #[error("invalid URL {url:?}: {cause}")]
    Url {
        /// The configured URL.
        url: String,
        /// What is wrong with it.
        cause: String,
    },
    /// The server refused a subscription for a reason a retry does not fix
    /// (invalid pattern, too long, subscription limit).
    #[error("{subscription} refused: {error}")]
    Refused {
        /// The refused subscription.
        subscription: Subscription,
        /// The server's `error` text.
        error: String,
    },
    /// [`ClientConfig::give_up_after`] consecutive attempts failed.
    #[error("gave up after {attempts} failed attempts; last: {last}")]
    GaveUp {
        /// Consecutive failed attempts.
        attempts: u32,
        /// Why the last one failed.
        last: String,
    },
}

/// How one connection attempt went.
enum Attempt {
    /// Shut down (or the caller went away): stop.
    Stopped,
    /// No usable connection, or it ended before every subscription held.
    Failed(String),
    /// A fully subscribed connection ended; reconnect promptly.
    Served,
    /// Stop with this error.
    Fatal(ClientError),
}

/// Connects, subscribes and forwards frames to `events`, reconnecting for as
/// long as it runs; returns when `shutdown` resolves, when `events` is
/// closed, or with an error that retrying cannot fix.
pub async fn run(
    config: ClientConfig,
    events: mpsc::Sender<Event>,
    shutdown: impl Future<Output = ()>,
) -> Result<Stats, ClientError> {
    let mut shutdown = std::pin::pin!(shutdown);
    let mut stats = Stats::default();
    let mut failures: u32 = 0;
    let mut first = true;
    loop {
        if !first {
            let delay = backoff(failures, config.backoff_min, config.backoff_max);
            tokio::select! {
                _ = shutdown.as_mut() => return Ok(stats),
                _ = events.closed() => return Ok(stats),
                _ = tokio::time::sleep(delay) => {}
            }
        }
        first = false;
        match attempt(&config, &events, shutdown.as_mut(), &mut stats).await {
            Attempt::Stopped => return Ok(stats),
            Attempt::Served => failures = 0,
            Attempt::Fatal(e) => return Err(e),
            Attempt::Failed(last) => {
                stats.failed_attempts += 1;
                failures = failures.saturating_add(1);
                if config.give_up_after.is_some_and(|n| failures >= n) {
                    return Err(ClientError::GaveUp {
                        attempts: failures,
                        last,
                    });
                }
            }
        }
    }
}

/// One connection: handshake, subscribe, forward until it ends.
async fn attempt<S: Future<Output = ()>>(
    config: &ClientConfig,
    events: &mpsc::Sender<Event>,
    mut shutdown: Pin<&mut S>,
    stats: &mut Stats,
) -> Attempt {
    let connect = tokio::time::timeout(
        config.connect_timeout,
        tokio_tungstenite::connect_async(config.url.as_str()),
    );
    let mut ws = tokio::select! {
        _ = shutdown.as_mut() => return Attempt::Stopped,
        r = connect => match r {
            Err(_) => return Attempt::Failed("connect timed out".into()),
            Ok(Err(tungstenite::Error::Url(e))) => {
                return Attempt::Fatal(ClientError::Url {
                    url: config.url.clone(),
                    cause: e.to_string(),
                })
            }
            Ok(Err(e)) => return Attempt::Failed(format!("connect: {e}")),
            Ok(Ok((ws, _response))) => ws,
        }
    };
    stats.connections += 1;
    if stats.connections > 1 {
        stats.reconnects += 1;
    }
    let connection = stats.connections;
    let mut conn = Connection::new(config, connection);
    let end = conn.drive(&mut ws, events, shutdown.as_mut()).await;
    let reason = match end {
        Drive::Stopped => {
            // Bounded polite close; the server cleans up either way.
            let bye = CloseFrame {
                code: CloseCode::Normal,
                reason: "client stopping".into(),
            };
            let _ = tokio::time::timeout(CLOSE_GRACE, async {
                let _ = ws.close(Some(bye)).await;
                while let Some(Ok(_)) = ws.next().await {}
            })
            .await;
            return Attempt::Stopped;
        }
        Drive::Fatal(e) => return Attempt::Fatal(e),
        Drive::Ended(reason) => reason,
    };
    let told = Event::Disconnected {
        connection,
        reason: reason.clone(),
    };
    tokio::select! {
        _ = shutdown.as_mut() => return Attempt::Stopped,
        sent = events.send(told) => if sent.is_err() { return Attempt::Stopped },
    }
    if conn.subscribed {
        Attempt::Served
    } else {
        Attempt::Failed(reason.to_string())
    }
}

/// How [`Connection::drive`] finished.
enum Drive {
    Stopped,
    Ended(Ended),
    Fatal(ClientError),
}

/// What a text frame was, to [`Connection::on_text`].
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    /// Not a reply to our subscribes: forward it to the caller.
    Other,
    /// A reply to one of our subscribes, consumed here.
    Reply,
    /// The reply that confirmed the last subscription.
    LastReply,
}

/// The subscribe bookkeeping of one connection.
struct Connection<'a> {
    config: &'a ClientConfig,
    connection: u64,
    /// Indexes into `config.subscriptions` not yet sent (or to re-send).
    to_send: VecDeque<usize>,
    /// Request id → index, for subscribes sent and not yet answered.
    in_flight: HashMap<String, usize>,
    confirmed: usize,
    /// Set after a `rate limited` refusal: send nothing before this.
    resume_sending_at: Option<Instant>,
    subscribed: bool,
}

/// The fields of a control frame the client looks at.
#[derive(Deserialize)]
struct Reply {
    action: String,
    id: Option<String>,
    status: Option<bool>,
    error: Option<String>,
}

impl<'a> Connection<'a> {
    fn new(config: &'a ClientConfig, connection: u64) -> Connection<'a> {
        Connection {
            config,
            connection,
            to_send: (0..config.subscriptions.len()).collect(),
            in_flight: HashMap::new(),
            confirmed: 0,
            resume_sending_at: None,
            subscribed: false,
        }
    }

    async fn drive<S: Future<Output = ()>>(
        &mut self,
        ws: &mut Socket,
        events: &mpsc::Sender<Event>,
        mut shutdown: Pin<&mut S>,
    ) -> Drive {
        let subscribe_deadline = Instant::now() + self.config.subscribe_timeout;
        let mut outgoing: Vec<Event> = Vec::new();
        if self.config.subscriptions.is_empty() {
            self.subscribed = true;
            outgoing.push(Event::Subscribed {
                connection: self.connection,
            });
        }
        loop {
            for event in outgoing.drain(..) {
                tokio::select! {
                    _ = shutdown.as_mut() => return Drive::Stopped,
                    sent = events.send(event) => if sent.is_err() { return Drive::Stopped },
                }
            }
            if let Err(end) = self.send_subscribes(ws).await {
                return Drive::Ended(end);
            }
            let wake = if self.subscribed {
                Instant::now() + self.config.idle_timeout
            } else {
                self.resume_sending_at
                    .map_or(subscribe_deadline, |t| t.min(subscribe_deadline))
            };
            let frame = tokio::select! {
                _ = shutdown.as_mut() => return Drive::Stopped,
                _ = tokio::time::sleep_until(wake) => {
                    if self.subscribed {
                        return Drive::Ended(Ended::Idle);
                    }
                    if Instant::now() >= subscribe_deadline {
                        return Drive::Ended(Ended::SubscribeTimeout);
                    }
                    continue; // time to re-send what was rate limited
                }
                frame = ws.next() => frame,
            };
            let text = match frame {
                None => return Drive::Ended(Ended::Lost("stream ended".into())),
                Some(Err(e)) => return Drive::Ended(Ended::Lost(e.to_string())),
                Some(Ok(Message::Close(frame))) => {
                    let (code, reason) = frame
                        .map(|f| (u16::from(f.code), f.reason.as_str().to_owned()))
                        .unwrap_or((1005, String::new()));
                    return Drive::Ended(Ended::Closed { code, reason });
                }
                Some(Ok(Message::Text(text))) => text,
                // Pings are answered by tungstenite itself; the server sends
                // no binary frames.
                Some(Ok(_)) => continue,
            };
            match self.on_text(text.as_str()) {
                Ok(Seen::Other) => outgoing.push(Event::Text(text.as_str().to_owned())),
                Ok(Seen::Reply) => {}
                Ok(Seen::LastReply) => outgoing.push(Event::Subscribed {
                    connection: self.connection,
                }),
                Err(end) => return end,
            }
        }
    }

    /// Sends queued subscribes, up to `max_in_flight` unanswered.
    async fn send_subscribes(&mut self, ws: &mut Socket) -> Result<(), Ended> {
        if self.resume_sending_at.is_some_and(|t| Instant::now() < t) {
            return Ok(());
        }
        self.resume_sending_at = None;
        while self.in_flight.len() < self.config.max_in_flight.max(1) {
            let Some(index) = self.to_send.pop_front() else {
                break;
            };
            let Some(sub) = self.config.subscriptions.get(index) else {
                continue;
            };
            let id = format!("sub{index}");
            let frame = Message::Text(sub.request(&id).into());
            match tokio::time::timeout(self.config.connect_timeout, ws.send(frame)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(Ended::Lost(e.to_string())),
                Err(_) => return Err(Ended::Lost("write timed out".into())),
            }
            self.in_flight.insert(id, index);
        }
        Ok(())
    }

    /// Looks at one text frame: a reply to one of our subscribes is consumed
    /// here; `Err` when it ends the connection.
    fn on_text(&mut self, text: &str) -> Result<Seen, Drive> {
        if text.starts_with(DELIVERY_PREFIX) {
            return Ok(Seen::Other);
        }
        let Ok(reply) = serde_json::from_str::<Reply>(text) else {
            return Ok(Seen::Other);
        };
        if reply.action != "subscribe" {
            return Ok(Seen::Other);
        }
        let Some(index) = reply.id.as_ref().and_then(|id| self.in_flight.remove(id)) else {
            return Ok(Seen::Other);
        };
        if reply.status == Some(true) {
            self.confirmed += 1;
            if self.confirmed == self.config.subscriptions.len() {
                self.subscribed = true;
                return Ok(Seen::LastReply);
            }
            return Ok(Seen::Reply);
        }
        match reply.error.as_deref().unwrap_or("") {
            "rate limited" => {
                self.to_send.push_back(index);
                self.resume_sending_at = Some(Instant::now() + RATE_LIMITED_RETRY);
                Ok(Seen::Reply)
            }
            "broker unavailable" => Err(Drive::Ended(Ended::BrokerUnavailable)),
            error => Err(Drive::Fatal(ClientError::Refused {
                subscription: self
                    .config
                    .subscriptions
                    .get(index)
                    .cloned()
                    .unwrap_or_else(|| Subscription::Channel(String::new())),
                error: error.to_owned(),
            })),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;
    use tokio::sync::oneshot;

    #[test]
    fn requests_name_the_kind_and_carry_the_id() {
        let p = Subscription::Pattern("news.*".into());
        let c = Subscription::Channel("a\"b".into());
        let v: serde_json::Value = serde_json::from_str(&p.request("sub0")).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"action":"subscribe","pattern":"news.*","id":"sub0"})
        );
        let v: serde_json::Value = serde_json::from_str(&c.request("sub1")).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"action":"subscribe","channel":"a\"b","id":"sub1"})
        );
    }

    #[test]
    fn replies_are_consumed_and_everything_else_is_forwarded() {
        let config = ClientConfig::new(
            "ws://x/ws",
            vec![
                Subscription::Pattern("a.*".into()),
                Subscription::Channel("b".into()),
            ],
        );
        let mut conn = Connection::new(&config, 7);
        conn.to_send.clear(); // as if both were sent
        conn.in_flight.insert("sub0".into(), 0);
        conn.in_flight.insert("sub1".into(), 1);
        let delivery = r#"{"action":"message","pattern":"a.*","channel":"a.x","payload":1}"#;
        assert_eq!(conn.on_text(delivery).ok(), Some(Seen::Other));
        let ok0 = r#"{"action":"subscribe","pattern":"a.*","id":"sub0","status":true}"#;
        assert_eq!(conn.on_text(ok0).ok(), Some(Seen::Reply));
        // Rate limited: queued again, sending paused.
        let limited = r#"{"action":"subscribe","channel":"b","id":"sub1","status":false,"error":"rate limited"}"#;
        assert_eq!(conn.on_text(limited).ok(), Some(Seen::Reply));
        assert_eq!(conn.to_send, VecDeque::from([1]));
        assert!(conn.resume_sending_at.is_some());
        conn.in_flight.insert("sub1".into(), 1);
        let ok1 = r#"{"action":"subscribe","channel":"b","id":"sub1","status":true}"#;
        assert_eq!(conn.on_text(ok1).ok(), Some(Seen::LastReply));
        assert!(conn.subscribed);
        // A reply to nothing of ours, a gap notice, junk: forwarded.
        assert_eq!(conn.on_text(ok1).ok(), Some(Seen::Other));
        let resumed = r#"{"action":"resumed","patterns":["a.*"],"channels":[]}"#;
        assert_eq!(conn.on_text(resumed).ok(), Some(Seen::Other));
        assert_eq!(conn.on_text("not json").ok(), Some(Seen::Other));
    }

    #[test]
    fn a_permanent_refusal_is_fatal_and_broker_unavailable_is_not() {
        let config = ClientConfig::new("ws://x/ws", vec![Subscription::Pattern("".into())]);
        let mut conn = Connection::new(&config, 1);
        conn.in_flight.insert("sub0".into(), 0);
        let refused = r#"{"action":"subscribe","pattern":"","id":"sub0","status":false,"error":"invalid pattern: empty"}"#;
        assert!(matches!(
            conn.on_text(refused),
            Err(Drive::Fatal(ClientError::Refused { .. }))
        ));
        conn.in_flight.insert("sub0".into(), 0);
        let away = r#"{"action":"subscribe","pattern":"","id":"sub0","status":false,"error":"broker unavailable"}"#;
        assert!(matches!(
            conn.on_text(away),
            Err(Drive::Ended(Ended::BrokerUnavailable))
        ));
    }

    /// A stand-in server: confirms every subscribe, sends one delivery, then
    /// closes with 1012 on the first connection and stays open on the second.
    async fn fake_node(listener: TcpListener, connections: usize) {
        for n in 0..connections {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
            while let Some(Ok(msg)) = ws.next().await {
                let Message::Text(t) = msg else { continue };
                let mut v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
                v["status"] = true.into();
                ws.send(Message::Text(v.to_string().into())).await.unwrap();
                let delivery =
                    format!(r#"{{"action":"message","channel":"c","payload":{{"n":{n}}}}}"#);
                ws.send(Message::Text(delivery.into())).await.unwrap();
                if n == 0 {
                    let close = CloseFrame {
                        code: CloseCode::Restart,
                        reason: "draining".into(),
                    };
                    let _ = ws.close(Some(close)).await;
                }
                break;
            }
            if n + 1 == connections {
                // Hold the last connection open until the client closes it.
                while let Some(Ok(_)) = ws.next().await {}
            }
        }
    }

    #[tokio::test]
    async fn reconnects_after_a_close_and_resubscribes() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(fake_node(listener, 2));
        let config = ClientConfig::new(
            format!("ws://{addr}/ws"),
            vec![Subscription::Channel("c".into())],
        );
        let (tx, mut rx) = mpsc::channel(16);
        let (stop, stopped) = oneshot::channel::<()>();
        let client = tokio::spawn(run(config, tx, async {
            let _ = stopped.await;
        }));
        let mut seen = Vec::new();
        while seen.len() < 5 {
            let event = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .unwrap()
                .unwrap();
            seen.push(event);
        }
        assert_eq!(seen[0], Event::Subscribed { connection: 1 });
        assert_eq!(
            seen[1],
            Event::Text(r#"{"action":"message","channel":"c","payload":{"n":0}}"#.into())
        );
        assert_eq!(
            seen[2],
            Event::Disconnected {
                connection: 1,
                reason: Ended::Closed {
                    code: 1012,
                    reason: "draining".into()
                }
            }
        );
        assert_eq!(seen[3], Event::Subscribed { connection: 2 });
        assert_eq!(
            seen[4],
            Event::Text(r#"{"action":"message","channel":"c","payload":{"n":1}}"#.into())
        );
        stop.send(()).unwrap();
        let stats = tokio::time::timeout(Duration::from_secs(5), client)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(
            stats,
            Stats {
                connections: 2,
                reconnects: 1,
                failed_attempts: 0
            }
        );
    }

    #[tokio::test]
    async fn gives_up_after_the_configured_number_of_failed_attempts() {
        // A port that refuses connections: bound, then closed.
        let addr = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let mut config = ClientConfig::new(format!("ws://{addr}/ws"), vec![]);
        config.backoff_min = Duration::from_millis(1);
        config.backoff_max = Duration::from_millis(4);
        config.give_up_after = Some(3);
        let (tx, _rx) = mpsc::channel(1);
        let result = tokio::time::timeout(
            Duration::from_secs(10),
            run(config, tx, std::future::pending()),
        )
        .await
        .unwrap();
        assert!(
            matches!(result, Err(ClientError::GaveUp { attempts: 3, .. })),
            "{result:?}"
        );
    }

    #[tokio::test]
    async fn a_bad_url_is_fatal_at_once() {
        let (tx, _rx) = mpsc::channel(1);
        let config = ClientConfig::new("http://nope", vec![]);
        let result = tokio::time::timeout(
            Duration::from_secs(5),
            run(config, tx, std::future::pending()),
        )
        .await
        .unwrap();
        assert!(matches!(result, Err(ClientError::Url { .. })), "{result:?}");
    }
}
