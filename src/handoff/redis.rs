//! The Redis handoff store: `SET ... NX` and `GETDEL` on the node's
//! handoff command connection ([`Commands`], named `wsgate:<node_id>:handoff`),
//! every call bounded by [`HandoffOptions::timeout`].

use std::time::Duration;

use bytes::{Bytes, BytesMut};

use super::{key, HandoffError, HANDOFF_TIMEOUT, MAX_RECORD_BYTES};
use crate::broker::redis::commands::{CommandOptions, Commands};
use crate::broker::redis::resp::{self, Value};
use crate::broker::redis::{RedisConfigError, Security};

/// How the Redis store connects and how long calls may take.
#[derive(Debug, Clone)]
pub struct HandoffOptions {
    /// `WSGATE_NODE_ID`: the connection is named `wsgate:<node_id>:handoff`.
    pub node_id: String,
    /// Bound on every call, on a connect with its handshake, on a write and
    /// on a reply ([`HANDOFF_TIMEOUT`] by default): a handshake must not
    /// hang on a frozen Redis.
    pub timeout: Duration,
    /// Reconnect backoff cap (`WSGATE_REDIS_BACKOFF_MAX_MS`, as the broker).
    pub backoff_max: Duration,
    /// The sentinels' password and the TLS files (as the broker's).
    pub security: Security,
}

impl HandoffOptions {
    /// Defaults for node `node_id`: [`HANDOFF_TIMEOUT`], a 1 s backoff cap
    /// (the `WSGATE_REDIS_BACKOFF_MAX_MS` default).
    pub fn new(node_id: &str) -> HandoffOptions {
        HandoffOptions {
            node_id: node_id.to_owned(),
            timeout: HANDOFF_TIMEOUT,
            backoff_max: Duration::from_secs(1),
            security: Security::default(),
        }
    }
}

/// Handle to the handoff connection; clones share it.
#[derive(Clone)]
pub struct RedisHandoff {
    commands: Commands,
}

impl RedisHandoff {
    /// Parses `url` (the broker's URL forms) and starts the connection task,
    /// which connects at once in the background.
    pub fn start(url: &str, options: HandoffOptions) -> Result<RedisHandoff, RedisConfigError> {
        let commands = Commands::start(
            url,
            CommandOptions {
                name: format!("wsgate:{}:handoff", options.node_id),
                timeout: options.timeout,
                backoff_max: options.backoff_max,
                // A record wsgate wrote, with room for the reply's framing.
                max_reply_bytes: MAX_RECORD_BYTES + 1024,
                security: options.security,
            },
        )?;
        Ok(RedisHandoff { commands })
    }

    /// `SET <key> <record> PX <ttl> NX`.
    pub(super) async fn offer(
        &self,
        client_id: &str,
        record: Bytes,
        ttl: Duration,
    ) -> Result<(), HandoffError> {
        let ttl_ms = ttl.as_millis().max(1).to_string();
        let mut command = BytesMut::new();
        let key = key(client_id);
        resp::encode_command(
            &mut command,
            [
                &b"SET"[..],
                key.as_bytes(),
                &record,
                b"PX",
                ttl_ms.as_bytes(),
                b"NX",
            ]
            .into_iter(),
        );
        match self.call(command.freeze()).await? {
            Value::Simple(ok) if ok.eq_ignore_ascii_case(b"OK") => Ok(()),
            Value::Null => Err(HandoffError::Exists),
            other => Err(refused(other)),
        }
    }

    /// `GETDEL <key>`.
    pub(super) async fn take(&self, client_id: &str) -> Result<Option<Bytes>, HandoffError> {
        let mut command = BytesMut::new();
        let key = key(client_id);
        resp::encode_command(&mut command, [&b"GETDEL"[..], key.as_bytes()].into_iter());
        match self.call(command.freeze()).await? {
            Value::Bulk(record) => Ok(Some(record)),
            Value::Null => Ok(None),
            other => Err(refused(other)),
        }
    }

    /// Stops the connection: in-flight and later calls answer `Unavailable`.
    pub(super) fn close(&self) {
        self.commands.close();
    }

    async fn call(&self, command: Bytes) -> Result<Value, HandoffError> {
        self.commands
            .call(command)
            .await
            .map_err(|_| HandoffError::Unavailable)
    }
}

/// What an unexpected reply means to the caller.
fn refused(reply: Value) -> HandoffError {
    match reply {
        Value::Error(e) => HandoffError::Refused(String::from_utf8_lossy(&e).into_owned()),
        other => HandoffError::Refused(format!("unexpected reply {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unexpected_replies_are_refusals() {
        assert_eq!(
            refused(Value::Error(Bytes::from_static(
                b"ERR unknown command 'GETDEL'"
            ))),
            HandoffError::Refused("ERR unknown command 'GETDEL'".into())
        );
        assert!(matches!(
            refused(Value::Integer(1)),
            HandoffError::Refused(_)
        ));
    }

    #[tokio::test]
    async fn nothing_listening_is_unavailable_within_the_timeout() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap();
        let options = HandoffOptions {
            timeout: Duration::from_millis(200),
            ..HandoffOptions::new("t")
        };
        let h = RedisHandoff::start(&format!("redis://127.0.0.1:{port}"), options).unwrap();
        let started = std::time::Instant::now();
        assert_eq!(h.take("c").await, Err(HandoffError::Unavailable));
        assert!(started.elapsed() < Duration::from_millis(500));
        h.close();
        assert_eq!(h.take("c").await, Err(HandoffError::Unavailable));
    }
}
