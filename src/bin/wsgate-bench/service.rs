//! `calls`' service side: echo instances of service `bench` on node A's
//! `/services` endpoint (the wire of `docs/services.md`). Each instance
//! registers [`REGISTER`], then answers every
//! `{"type":"message","id":..,"payload":..}` with
//! `{"type":"reply","id":..,"payload":<the same text>}`, writing the replies
//! to whatever arrived together in one flush. It also records how long each
//! call took to reach it (from the send time in the payload): the first leg
//! of a call, so that a slow leg can be told from a slow return.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{FutureExt, SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::{oneshot, watch};
use tokio_tungstenite::tungstenite::Message;

use crate::hist::Sharded;
use crate::net::{self, Gateway, Ws};
use crate::sys::unix_nanos;

/// The service the bench registers and calls.
pub(crate) const SERVICE: &str = "bench";
/// Its one method.
pub(crate) const METHOD: &str = "echo";
/// What each instance sends first.
pub(crate) const REGISTER: &str =
    r#"{"type":"register","name":"bench","version":"1","methods":["echo"]}"#;

/// The fields of a gateway frame an echo instance looks at (the rest,
/// `destination`, `consumer`, `responder`, are ignored).
#[derive(Deserialize)]
struct Incoming<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    payload: Option<&'a RawValue>,
    #[serde(borrow)]
    message: Option<Cow<'a, str>>,
}

/// What one gateway frame asks of an echo instance.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Frame {
    /// A call: this reply answers it; the call's send time, if its payload
    /// carries one.
    Call(String, Option<u64>),
    /// The register was taken.
    Registered,
    /// The gateway refused something: its text.
    Error(String),
    /// Anything else (events, broadcasts, a frame that is not JSON).
    Other,
}

/// Reads one gateway frame.
pub(crate) fn read(text: &str) -> Frame {
    let Ok(m) = serde_json::from_str::<Incoming<'_>>(text) else {
        return Frame::Other;
    };
    match m.kind.as_ref() {
        "message" => {
            let id = m.id.map_or("null", RawValue::get);
            let payload = m.payload.map_or("null", RawValue::get);
            let sent = net::sent_nanos(payload.as_bytes());
            Frame::Call(
                format!("{{\"type\":\"reply\",\"id\":{id},\"payload\":{payload}}}"),
                sent,
            )
        }
        "registered" => Frame::Registered,
        "error" => Frame::Error(m.message.map_or_else(|| text.to_owned(), Cow::into_owned)),
        _ => Frame::Other,
    }
}

/// What one instance did, returned when its task ends.
#[derive(Debug, Default)]
pub(crate) struct InstanceOut {
    /// Calls answered.
    pub(crate) answered: u64,
    /// `{"type":"error"}` frames received after registering.
    pub(crate) error_frames: u64,
    /// The first of those, and why the instance ended early, if it did.
    pub(crate) errors: Vec<String>,
}

impl InstanceOut {
    fn note(&mut self, e: String) {
        if self.errors.len() < 3 {
            self.errors.push(e);
        }
    }
}

/// One instance's settings.
pub(crate) struct Instance {
    pub(crate) gateway: Gateway,
    pub(crate) source: std::net::Ipv4Addr,
    pub(crate) key: Option<String>,
    pub(crate) read_buffer: usize,
    pub(crate) timeout: Duration,
    /// First leg latencies (caller's send to this instance's receipt), µs.
    pub(crate) leg: Arc<Sharded>,
}

/// Connects, registers (the outcome goes to `registered`), then echoes
/// until `stop` turns true or the connection ends.
pub(crate) async fn run(
    inst: Instance,
    registered: oneshot::Sender<Result<(), String>>,
    mut stop: watch::Receiver<bool>,
) -> InstanceOut {
    let mut out = InstanceOut::default();
    let mut ws = match tokio::time::timeout(inst.timeout, register(&inst)).await {
        Ok(Ok(ws)) => {
            let _ = registered.send(Ok(()));
            ws
        }
        Ok(Err(e)) => {
            let _ = registered.send(Err(e));
            return out;
        }
        Err(_) => {
            let _ = registered.send(Err(format!("not registered within {:?}", inst.timeout)));
            return out;
        }
    };
    let r: Result<(), String> = async {
        loop {
            let m = tokio::select! {
                m = ws.next() => m,
                _ = stop.wait_for(|s| *s) => return Ok(()),
            };
            handle(&mut ws, m, &inst, &mut out).await?;
            // Answer whatever else is already buffered, then write once.
            while let Some(m) = ws.next().now_or_never() {
                handle(&mut ws, m, &inst, &mut out).await?;
            }
            ws.flush().await.map_err(|e| format!("send: {e}"))?;
        }
    }
    .await;
    if let Err(e) = r {
        out.note(e);
    }
    // Bounded: a gateway that does not answer the close is left behind.
    let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
    out
}

async fn register(inst: &Instance) -> Result<Ws, String> {
    let mut ws = net::connect_bearer(
        &inst.gateway,
        inst.source,
        inst.read_buffer,
        inst.key.as_deref(),
    )
    .await?;
    ws.send(Message::Text(REGISTER.into()))
        .await
        .map_err(|e| format!("send register: {e}"))?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => match read(t.as_str()) {
                Frame::Registered => return Ok(ws),
                Frame::Error(e) => return Err(format!("register refused: {e}")),
                _ => {}
            },
            Some(Ok(Message::Close(f))) => return Err(format!("closed by the gateway: {f:?}")),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(format!("read: {e}")),
            None => return Err("connection ended before registered".into()),
        }
    }
}

async fn handle(
    ws: &mut Ws,
    m: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
    inst: &Instance,
    out: &mut InstanceOut,
) -> Result<(), String> {
    let t = match m {
        Some(Ok(Message::Text(t))) => t,
        Some(Ok(Message::Close(f))) => return Err(format!("closed by the gateway: {f:?}")),
        Some(Ok(_)) => return Ok(()),
        Some(Err(e)) => return Err(format!("read: {e}")),
        None => return Err("connection ended".into()),
    };
    match read(t.as_str()) {
        Frame::Call(reply, sent) => {
            if let Some(sent) = sent {
                inst.leg.record(unix_nanos().saturating_sub(sent) / 1000);
            }
            out.answered += 1;
            ws.feed(Message::Text(reply.into()))
                .await
                .map_err(|e| format!("send: {e}"))
        }
        Frame::Error(e) => {
            out.error_frames += 1;
            out.note(e);
            Ok(())
        }
        Frame::Registered | Frame::Other => Ok(()),
    }
}

/// Starts `n` instances; returns their tasks once every one registered (or
/// the first error, the rest left to `stop`).
pub(crate) async fn start(
    n: usize,
    make: impl Fn(usize) -> Instance,
    stop: &watch::Receiver<bool>,
    deadline: Instant,
) -> Result<Vec<tokio::task::JoinHandle<InstanceOut>>, String> {
    let mut tasks = Vec::with_capacity(n);
    let mut waits = Vec::with_capacity(n);
    for i in 0..n {
        let (tx, rx) = oneshot::channel();
        tasks.push(tokio::spawn(run(make(i), tx, stop.clone())));
        waits.push(rx);
    }
    for (i, rx) in waits.into_iter().enumerate() {
        match tokio::time::timeout_at(deadline.into(), rx).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => return Err(format!("service instance {i}: {e}")),
            Ok(Err(_)) => return Err(format!("service instance {i}: task ended")),
            Err(_) => return Err(format!("service instance {i}: not registered in time")),
        }
    }
    Ok(tasks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echoes_id_and_payload_text() {
        let call = r#"{"type":"message","id":"g-17","destination":"bench:echo","consumer":null,"responder":"n1","payload":{"t":1712345678901234567,"s":3,"p":"x y"}}"#;
        assert_eq!(
            read(call),
            Frame::Call(
                r#"{"type":"reply","id":"g-17","payload":{"t":1712345678901234567,"s":3,"p":"x y"}}"#
                    .to_owned(),
                Some(1_712_345_678_901_234_567)
            )
        );
        // The payload's text is kept as sent, spacing and escapes included.
        let odd = r#"{"payload": [1, "a\"b"], "id":"\u0041", "type":"message"}"#;
        assert_eq!(
            read(odd),
            Frame::Call(
                r#"{"type":"reply","id":"\u0041","payload":[1, "a\"b"]}"#.to_owned(),
                None
            )
        );
        assert_eq!(
            read(r#"{"type":"message","id":"1"}"#),
            Frame::Call(
                r#"{"type":"reply","id":"1","payload":null}"#.to_owned(),
                None
            )
        );
    }

    #[test]
    fn other_frames() {
        assert_eq!(
            read(
                r#"{"type":"registered","name":"bench","version":"1","instance":"i1","node":"n"}"#
            ),
            Frame::Registered
        );
        assert_eq!(
            read(r#"{"type":"error","id":"5","message":"unknown call"}"#),
            Frame::Error("unknown call".into())
        );
        assert_eq!(read(r#"{"type":"event","event":"online"}"#), Frame::Other);
        assert_eq!(read("not json"), Frame::Other);
        let v: serde_json::Value = serde_json::from_str(REGISTER).unwrap_or_default();
        assert_eq!(v["name"], SERVICE);
        assert_eq!(v["methods"][0], METHOD);
    }
}
