//! A raw HTTP/1.1 client of the server-sent events endpoint, for byte-level
//! checks: it sends the request, reads the head, and then gives the body's
//! events exactly as they came (de-chunked), one `...\n\n` at a time.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::WAIT;

/// An open (or refused) event stream.
pub struct SseStream {
    pub stream: TcpStream,
    pub status: u16,
    /// The response head, lower-cased header names.
    pub head: String,
    raw: Vec<u8>,
    body: Vec<u8>,
    chunked: bool,
    ended: bool,
}

impl SseStream {
    /// `GET path` with extra headers; returns once the head is read.
    pub async fn open(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> SseStream {
        Self::open_with(addr, "GET", path, headers, None).await
    }

    /// The same with the socket's receive buffer set small first (a client
    /// that stops reading fills up quickly).
    pub async fn open_with(
        addr: SocketAddr,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        recv_buffer: Option<usize>,
    ) -> SseStream {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        if let Some(n) = recv_buffer {
            socket.set_recv_buffer_size(n as u32).expect("SO_RCVBUF");
        }
        let mut stream = tokio::time::timeout(WAIT, socket.connect(addr))
            .await
            .expect("connect timed out")
            .expect("connect");
        let extra: String = headers
            .iter()
            .map(|(k, v)| format!("{k}: {v}\r\n"))
            .collect();
        let req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}\r\n");
        stream.write_all(req.as_bytes()).await.expect("write");
        let mut s = SseStream {
            stream,
            status: 0,
            head: String::new(),
            raw: Vec::new(),
            body: Vec::new(),
            chunked: false,
            ended: false,
        };
        loop {
            if let Some(at) = s.raw.windows(4).position(|w| w == b"\r\n\r\n") {
                s.head = String::from_utf8_lossy(&s.raw[..at]).to_ascii_lowercase();
                s.raw.drain(..at + 4);
                break;
            }
            assert!(s.read_more().await, "no response head");
        }
        s.status = s
            .head
            .split(' ')
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        s.chunked = s.head.contains("transfer-encoding: chunked");
        s
    }

    /// A header's value (name in lower case).
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k == name).then(|| v.trim().to_owned())
        })
    }

    async fn read_more(&mut self) -> bool {
        let mut chunk = [0u8; 16 * 1024];
        match tokio::time::timeout(WAIT, self.stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => {
                self.raw.extend_from_slice(&chunk[..n]);
                true
            }
            _ => false,
        }
    }

    /// Moves complete chunks from `raw` to `body`.
    fn dechunk(&mut self) {
        if !self.chunked {
            self.body.append(&mut self.raw);
            return;
        }
        while let Some(eol) = self.raw.windows(2).position(|w| w == b"\r\n") {
            let size = std::str::from_utf8(&self.raw[..eol])
                .ok()
                .and_then(|s| usize::from_str_radix(s.trim(), 16).ok())
                .expect("chunk size");
            if size == 0 {
                self.ended = true;
                self.raw.clear();
                return;
            }
            if self.raw.len() < eol + 2 + size + 2 {
                return;
            }
            self.body
                .extend_from_slice(&self.raw[eol + 2..eol + 2 + size]);
            self.raw.drain(..eol + 2 + size + 2);
        }
    }

    /// The next event (everything up to and including a blank line), as
    /// sent; `None` once the stream ended.
    pub async fn next_event(&mut self) -> Option<String> {
        loop {
            self.dechunk();
            if let Some(at) = self.body.windows(2).position(|w| w == b"\n\n") {
                let event: Vec<u8> = self.body.drain(..at + 2).collect();
                return Some(String::from_utf8(event).expect("UTF-8 event"));
            }
            if self.ended || !self.read_more().await {
                return None;
            }
        }
    }

    /// The next event that is not a heartbeat.
    pub async fn next_non_heartbeat(&mut self) -> Option<String> {
        loop {
            let e = self.next_event().await?;
            if e != ": ping\n\n" {
                return Some(e);
            }
        }
    }

    /// The whole body of a refusal (not chunked: `Content-Length`).
    pub async fn body_text(&mut self) -> String {
        let len: usize = self
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        while self.raw.len() < len && self.read_more().await {}
        String::from_utf8_lossy(&self.raw).into_owned()
    }

    /// Everything until the stream ends (at most `bound`), heartbeats
    /// dropped.
    pub async fn rest(&mut self, bound: Duration) -> Vec<String> {
        let mut events = Vec::new();
        let _ = tokio::time::timeout(bound, async {
            while let Some(e) = self.next_non_heartbeat().await {
                events.push(e);
            }
        })
        .await;
        events
    }
}

/// `event: subscribe` with the native answer.
pub fn subscribed(kind: &str, name: &str) -> String {
    format!(
        "event: subscribe\ndata: {{\"action\":\"subscribe\",\"{kind}\":\"{name}\",\"status\":true}}\n\n"
    )
}

/// `event: subscribe` refusing with `error`.
pub fn refused(kind: &str, name: &str, error: &str) -> String {
    format!(
        "event: subscribe\ndata: {{\"action\":\"subscribe\",\"{kind}\":\"{name}\",\"status\":false,\"error\":\"{error}\"}}\n\n"
    )
}
