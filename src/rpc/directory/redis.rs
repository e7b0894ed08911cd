//! The directory in Redis: per service, a sorted set of instance ids scored
//! by lease expiry (Redis's own clock, `TIME`, so the nodes' clocks do not
//! matter) and a hash of their descriptions; the set of service names.
//!
//! ```text
//! wsgate:services                  SET   names with instances
//! wsgate:services:<name>           ZSET  instance id -> lease expiry (ms)
//! wsgate:services:<name>:info      HASH  instance id -> Instance JSON
//! ```
//!
//! Every change is one Lua script, so it is atomic: whichever script finds
//! a service empty before adding publishes `online`, whichever leaves it
//! empty publishes `offline`, exactly once per transition however many
//! nodes race. Each node renews its own instances in one script per period
//! (a third of the lease), which also reaps every expired instance of the
//! cluster (publishing `disconnect`, and `offline` for a service left
//! empty): a node that dies takes its instances with it within one lease.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;

use super::{DirectoryError, Instance};
use crate::broker::redis::commands::{CommandOptions, Commands};
use crate::broker::redis::resp::{self, Value};
use crate::broker::redis::{RedisConfigError, Security};

/// Reaps the expired instances of service `name` at `now`, publishing their
/// events; shared by every script below.
const REAP: &str = "
local function reap(name, now)
  local z = 'wsgate:services:' .. name
  local h = z .. ':info'
  local dead = redis.call('ZRANGEBYSCORE', z, '-inf', now)
  for _, id in ipairs(dead) do
    local info = redis.call('HGET', h, id)
    redis.call('ZREM', z, id)
    redis.call('HDEL', h, id)
    if info then
      redis.call('PUBLISH', '/wsgate/services/disconnect', info)
      if redis.call('ZCARD', z) == 0 then
        redis.call('PUBLISH', '/wsgate/services/offline', info)
      end
    end
  end
  if redis.call('ZCARD', z) == 0 then
    redis.call('SREM', 'wsgate:services', name)
    redis.call('DEL', h)
  end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
";

/// `ARGV`: name, instance id, instance JSON, lease ms.
const REGISTER: &str = "
reap(ARGV[1], now)
local z = 'wsgate:services:' .. ARGV[1]
local before = redis.call('ZCARD', z)
redis.call('ZADD', z, now + tonumber(ARGV[4]), ARGV[2])
redis.call('HSET', z .. ':info', ARGV[2], ARGV[3])
redis.call('SADD', 'wsgate:services', ARGV[1])
redis.call('PUBLISH', '/wsgate/services/connect', ARGV[3])
if before == 0 then
  redis.call('PUBLISH', '/wsgate/services/online', ARGV[3])
end
return before
";

/// `ARGV`: name, instance id.
const DEREGISTER: &str = "
local z = 'wsgate:services:' .. ARGV[1]
local h = z .. ':info'
local info = redis.call('HGET', h, ARGV[2])
if redis.call('ZREM', z, ARGV[2]) == 0 then
  return 0
end
redis.call('HDEL', h, ARGV[2])
if info then
  redis.call('PUBLISH', '/wsgate/services/disconnect', info)
end
if redis.call('ZCARD', z) == 0 then
  redis.call('SREM', 'wsgate:services', ARGV[1])
  redis.call('DEL', h)
  if info then
    redis.call('PUBLISH', '/wsgate/services/offline', info)
  end
end
return 1
";

/// `ARGV`: lease ms, then name and instance id pairs. Returns the 1-based
/// pair numbers the directory no longer had.
const RENEW: &str = "
local missing = {}
local lease = tonumber(ARGV[1])
for i = 2, #ARGV, 2 do
  local z = 'wsgate:services:' .. ARGV[i]
  if redis.call('ZADD', z, 'XX', 'CH', now + lease, ARGV[i + 1]) == 0
     and not redis.call('ZSCORE', z, ARGV[i + 1]) then
    table.insert(missing, i / 2)
  end
end
for _, name in ipairs(redis.call('SMEMBERS', 'wsgate:services')) do
  reap(name, now)
end
return missing
";

/// `ARGV`: a service name, or nothing for all. Returns the live instances'
/// JSON.
const LIST: &str = "
local names = {}
if #ARGV > 0 then names = {ARGV[1]} else names = redis.call('SMEMBERS', 'wsgate:services') end
local out = {}
for _, name in ipairs(names) do
  local z = 'wsgate:services:' .. name
  local ids = redis.call('ZRANGEBYSCORE', z, '(' .. now, '+inf')
  if #ids > 0 then
    for _, info in ipairs(redis.call('HMGET', z .. ':info', unpack(ids))) do
      if info then table.insert(out, info) end
    end
  end
end
return out
";

/// A directory reply larger than this is not one wsgate's scripts make.
const MAX_REPLY_BYTES: usize = 64 << 20;

/// See the module docs.
#[derive(Clone)]
pub struct RedisDirectory {
    commands: Commands,
    lease: Duration,
}

impl RedisDirectory {
    /// Opens the node's directory connection (`wsgate:<node>:services`).
    pub fn start(
        url: &str,
        node_id: &str,
        lease: Duration,
        timeout: Duration,
        backoff_max: Duration,
        security: &Security,
    ) -> Result<RedisDirectory, RedisConfigError> {
        let commands = Commands::start(
            url,
            CommandOptions {
                name: format!("wsgate:{node_id}:services"),
                timeout,
                backoff_max,
                max_reply_bytes: MAX_REPLY_BYTES,
                security: security.clone(),
            },
        )?;
        Ok(RedisDirectory { commands, lease })
    }

    pub(super) fn close(&self) {
        self.commands.close();
    }

    async fn eval(&self, script: &str, args: &[&[u8]]) -> Result<Value, DirectoryError> {
        let body = format!("{REAP}{script}");
        let mut command = BytesMut::new();
        let mut parts: Vec<&[u8]> = vec![b"EVAL", body.as_bytes(), b"0"];
        parts.extend_from_slice(args);
        resp::encode_command(&mut command, parts.into_iter());
        match self.commands.call(command.freeze()).await {
            Ok(Value::Error(e)) => Err(DirectoryError(String::from_utf8_lossy(&e).into_owned())),
            Ok(value) => Ok(value),
            Err(e) => Err(DirectoryError(e.to_string())),
        }
    }

    pub(super) async fn register(&self, instance: &Instance) -> Result<(), DirectoryError> {
        let json = instance.to_json();
        let lease = self.lease.as_millis().to_string();
        self.eval(
            REGISTER,
            &[
                instance.service.as_bytes(),
                instance.instance.as_bytes(),
                json.as_bytes(),
                lease.as_bytes(),
            ],
        )
        .await
        .map(drop)
    }

    pub(super) async fn deregister(&self, instance: &Instance) -> Result<(), DirectoryError> {
        self.eval(
            DEREGISTER,
            &[instance.service.as_bytes(), instance.instance.as_bytes()],
        )
        .await
        .map(drop)
    }

    pub(super) async fn renew(
        &self,
        instances: &[Arc<Instance>],
    ) -> Result<Vec<usize>, DirectoryError> {
        let lease = self.lease.as_millis().to_string();
        let mut args: Vec<&[u8]> = vec![lease.as_bytes()];
        for i in instances {
            args.push(i.service.as_bytes());
            args.push(i.instance.as_bytes());
        }
        match self.eval(RENEW, &args).await? {
            Value::Array(items) => Ok(items
                .into_iter()
                .filter_map(|v| match v {
                    Value::Integer(n) => usize::try_from(n).ok()?.checked_sub(1),
                    _ => None,
                })
                .collect()),
            other => Err(DirectoryError(format!("unexpected reply {other:?}"))),
        }
    }

    pub(super) async fn list(
        &self,
        service: Option<&str>,
    ) -> Result<Vec<Instance>, DirectoryError> {
        let args: Vec<&[u8]> = service.map(str::as_bytes).into_iter().collect();
        match self.eval(LIST, &args).await? {
            Value::Array(items) => Ok(items
                .into_iter()
                .filter_map(|v| match v {
                    Value::Bulk(json) => serde_json::from_slice(&json).ok(),
                    _ => None,
                })
                .collect()),
            other => Err(DirectoryError(format!("unexpected reply {other:?}"))),
        }
    }
}
