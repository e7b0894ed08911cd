//! Presence on Redis (`docs/presence.md`): a Function library of two
//! functions, called over the node's own command connection
//! (`wsgate:<node>:presence`).
//!
//! Keys (standalone Redis, like history; the channel's length in the name
//! makes any bytes unambiguous):
//!
//! - `wsgate:presence:<len>:<C>`: a hash, client id -> `<node>\n<leave
//!   event>` ([`crate::presence::stored`]);
//! - `wsgate:presence:nodes`: a sorted set, node -> when its lease ends
//!   (Redis `TIME`, milliseconds);
//! - `wsgate:presence:node:<node>`: a set of the channels the node has
//!   members on, so that reaping a node touches only its channels.
//!
//! `wsgate_presence_sync` is the one round trip per node per period: it
//! renews the lease, applies the node's changes, publishes its events and
//! reaps up to 16 nodes whose lease ended (dropping their members and
//! publishing a leave for each). A read is `wsgate_presence_live` (the
//! nodes whose lease holds) with a plain `HVALS` of the channel, filtered
//! by the node, so a dead node's members are gone from answers the moment
//! its lease ends, reaped or not.

use bytes::{Bytes, BytesMut};

use super::commands::{CommandError, Commands};
use super::resp::{self, Value};
use crate::broker::BrokerError;
use crate::presence::{Batch, Op, Synced};

/// The library's name, with the crate version like history's.
pub(crate) fn library_name() -> String {
    format!(
        "wsgate_presence_{}",
        env!("CARGO_PKG_VERSION").replace(['.', '-'], "_")
    )
}

/// The library's Lua source.
pub(crate) fn library() -> String {
    format!("#!lua name={}\n{LIBRARY_BODY}", library_name())
}

const LIBRARY_BODY: &str = r#"
local MAGIC = '\255wsgate-p1:'
local NODES = 'wsgate:presence:nodes'

local function hkey(c) return 'wsgate:presence:' .. #c .. ':' .. c end
local function nkey(n) return 'wsgate:presence:node:' .. n end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Drops every member of node n; with announce, publishes a leave for each.
local function drop_node(n, announce)
  local prefix = n .. '\n'
  for _, c in ipairs(redis.call('SMEMBERS', nkey(n))) do
    local k = hkey(c)
    local all = redis.call('HGETALL', k)
    for i = 1, #all, 2 do
      local v = all[i + 1]
      if string.sub(v, 1, #prefix) == prefix then
        redis.call('HDEL', k, all[i])
        if announce then
          redis.call('PUBLISH', c, MAGIC .. string.sub(v, #prefix + 1))
        end
      end
    end
  end
  redis.call('DEL', nkey(n))
  redis.call('ZREM', NODES, n)
end

-- ARGV: node, lease_ms, reset (0/1), #ops, ops..., then channel/event pairs.
-- An op: 'j' channel client stored | 'l' channel client | 'L' (the node's last there).
local function sync(keys, args)
  local node, lease, reset = args[1], tonumber(args[2]), args[3] == '1'
  local now = now_ms()
  if not reset then
    local score = redis.call('ZSCORE', NODES, node)
    if not score or tonumber(score) < now then
      return 1
    end
  else
    drop_node(node, false)
  end
  redis.call('ZADD', NODES, now + lease, node)
  local i = 5
  for _ = 1, tonumber(args[4]) do
    local op, c, client = args[i], args[i + 1], args[i + 2]
    if op == 'j' then
      redis.call('HSET', hkey(c), client, args[i + 3])
      redis.call('SADD', nkey(node), c)
      i = i + 4
    else
      redis.call('HDEL', hkey(c), client)
      if op == 'L' then redis.call('SREM', nkey(node), c) end
      i = i + 3
    end
  end
  while i < #args do
    redis.call('PUBLISH', args[i], args[i + 1])
    i = i + 2
  end
  for _, dead in ipairs(redis.call('ZRANGEBYSCORE', NODES, '-inf', '(' .. now, 'LIMIT', 0, 16)) do
    drop_node(dead, true)
  end
  return 0
end

-- The nodes whose lease holds now, by Redis's clock (O(nodes)): a read
-- pairs it with a plain HVALS of the channel's hash, so no member passes
-- through Lua.
local function live(keys, args)
  return redis.call('ZRANGEBYSCORE', NODES, now_ms(), '+inf')
end

redis.register_function('wsgate_presence_sync', sync)
redis.register_function{function_name = 'wsgate_presence_live', callback = live, flags = {'no-writes'}}
"#;

/// Presence calls over the node's presence connection.
#[derive(Clone)]
pub(crate) struct Store {
    commands: Commands,
    /// `FUNCTION LOAD REPLACE <library>`, sent when Redis lacks it.
    load: Bytes,
}

impl Store {
    /// A store over `commands`.
    pub(crate) fn new(commands: Commands) -> Store {
        let mut load = BytesMut::new();
        resp::encode_command(
            &mut load,
            [&b"FUNCTION"[..], b"LOAD", b"REPLACE", library().as_bytes()].into_iter(),
        );
        Store {
            commands,
            load: load.freeze(),
        }
    }

    /// One batch, one `FCALL`.
    pub(crate) async fn sync(&self, batch: &Batch) -> Result<Synced, BrokerError> {
        let lease = batch.lease.as_millis().max(1).to_string();
        let count = batch.ops.len().to_string();
        let mut args: Vec<&[u8]> =
            Vec::with_capacity(8 + batch.ops.len() * 4 + batch.events.len() * 2);
        args.extend_from_slice(&[
            b"FCALL",
            b"wsgate_presence_sync",
            b"0",
            batch.node.as_bytes(),
            lease.as_bytes(),
            if batch.reset { b"1" } else { b"0" },
            count.as_bytes(),
        ]);
        for op in &batch.ops {
            match op {
                Op::Join {
                    channel,
                    client,
                    stored,
                } => args.extend_from_slice(&[b"j", channel, client.as_bytes(), stored]),
                Op::Leave {
                    channel,
                    client,
                    last,
                } => args.extend_from_slice(&[
                    if *last { b"L" } else { b"l" },
                    channel,
                    client.as_bytes(),
                ]),
            }
        }
        for (channel, event) in &batch.events {
            args.extend_from_slice(&[channel, event]);
        }
        let mut cmd = BytesMut::new();
        resp::encode_command(&mut cmd, args.into_iter());
        match self.call_loaded(cmd.freeze()).await? {
            Value::Integer(0) => Ok(Synced::Done),
            Value::Integer(1) => Ok(Synced::Lost),
            other => Err(unexpected("wsgate_presence_sync", other)),
        }
    }

    /// The live members of `channel` (their leave events): `FCALL_RO
    /// wsgate_presence_live` (the nodes whose lease holds) and `HVALS` of
    /// the channel's hash, pipelined (one round trip), filtered here. An
    /// earlier version walked the hash in Lua, which cost Redis about as
    /// much CPU per member as the whole answer cost the node
    /// (`docs/benchmarks.md`, Presence); `HVALS` is Redis's own loop.
    pub(crate) async fn read(&self, channel: &[u8]) -> Result<Vec<Bytes>, BrokerError> {
        let mut live = BytesMut::new();
        resp::encode_command(
            &mut live,
            [&b"FCALL_RO"[..], b"wsgate_presence_live", b"0"].into_iter(),
        );
        let mut key = format!("wsgate:presence:{}:", channel.len()).into_bytes();
        key.extend_from_slice(channel);
        let mut vals = BytesMut::new();
        resp::encode_command(&mut vals, [&b"HVALS"[..], &key].into_iter());
        let (live, vals) = tokio::join!(self.call_loaded(live.freeze()), self.call(vals.freeze()));
        let live = match live? {
            Value::Array(rows) => rows
                .into_iter()
                .filter_map(|v| match v {
                    Value::Bulk(b) => Some(b),
                    _ => None,
                })
                .collect::<std::collections::HashSet<Bytes>>(),
            other => return Err(unexpected("wsgate_presence_live", other)),
        };
        match vals? {
            Value::Array(rows) => Ok(rows
                .into_iter()
                .filter_map(|v| match v {
                    Value::Bulk(b) => {
                        let nl = b.iter().position(|c| *c == b'\n')?;
                        live.contains(&b[..nl]).then(|| b.slice(nl + 1..))
                    }
                    _ => None,
                })
                .collect()),
            other => Err(unexpected("HVALS", other)),
        }
    }

    /// Calls `cmd`, loading the library first if Redis lacks it (a Redis
    /// restarted without persistence forgets functions).
    async fn call_loaded(&self, cmd: Bytes) -> Result<Value, BrokerError> {
        let reply = self.call(cmd.clone()).await?;
        let missing =
            matches!(&reply, Value::Error(e) if e.windows(18).any(|w| w == b"Function not found"));
        if !missing {
            return Ok(reply);
        }
        if let Value::Error(e) = self.call(self.load.clone()).await? {
            return Err(BrokerError::Refused(
                String::from_utf8_lossy(&e).into_owned(),
            ));
        }
        self.call(cmd).await
    }

    async fn call(&self, cmd: Bytes) -> Result<Value, BrokerError> {
        self.commands
            .call(cmd)
            .await
            .map_err(|CommandError::Unavailable| BrokerError::Unavailable)
    }
}

fn unexpected(what: &str, reply: Value) -> BrokerError {
    match reply {
        Value::Error(e) => BrokerError::Refused(String::from_utf8_lossy(&e).into_owned()),
        other => BrokerError::Refused(format!("unexpected {what} reply: {other:?}")),
    }
}
