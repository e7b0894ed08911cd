//! History on Redis: the Function library that appends and publishes in one
//! atomic step, and the reads of recovery and `GET /history`
//! (`docs/history.md`).
//!
//! Per history channel `C` two keys, named by `C`'s length so that any bytes
//! are unambiguous: `wsgate:history:<len>:<C>:meta`, a hash with the epoch
//! and the top offset, and `wsgate:history:<len>:<C>:stream`, a Stream whose
//! entry IDs are `<offset>-0` (so a read after offset `n` is one `XRANGE`).
//! Both expire `ttl` after the last publish, together, and a meta key that
//! is gone means a new epoch (its stream is deleted with it if it survived).
//!
//! Why a Function rather than a script: `redis-cli FCALL wsgate_publish 1
//! <channel> <payload>` is something a backend can call by name, and the
//! library's name carries the crate version, so nodes of two versions in a
//! rolling upgrade each keep their own. It is loaded with `FUNCTION LOAD
//! REPLACE` on every new publish connection (a Redis restarted without
//! persistence forgets it) and on a read that finds it missing.

use bytes::{Bytes, BytesMut};

use super::commands::{CommandError, Commands};
use super::resp::{self, Value};
use crate::broker::BrokerError;
use crate::history::{Entry, Query, Read, Rules};

/// The library's name: `wsgate_<version with _ for .>`, e.g. `wsgate_0_1_0`.
pub(crate) fn library_name() -> String {
    format!(
        "wsgate_{}",
        env!("CARGO_PKG_VERSION").replace(['.', '-'], "_")
    )
}

/// The library's Lua source. `rules` (`WSGATE_HISTORY`) are written into it
/// so that a bare `FCALL wsgate_publish 1 <channel> <payload>` finds the
/// channel's size and ttl; wsgate's own publishes pass them as arguments and
/// skip the matching. Every node of one version must have the same rules:
/// the last one to load the library decides what a bare `FCALL` uses.
pub(crate) fn library(rules: &Rules) -> String {
    let mut table = String::new();
    for rule in rules.iter() {
        table.push_str(&format!(
            "  {{{}, {}, {}}},\n",
            lua_string(&rule.glob),
            rule.size,
            rule.ttl.as_millis()
        ));
    }
    format!(
        "#!lua name={name}\n\
         local RULES = {{\n{table}}}\n\
         {LIBRARY_BODY}",
        name = library_name(),
    )
}

/// A Lua string literal of any bytes (decimal escapes: no quoting rule to get wrong).
fn lua_string(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 4 + 2);
    s.push('"');
    for b in bytes {
        s.push_str(&format!("\\{b}"));
    }
    s.push('"');
    s
}

/// Everything of the library after its rules table. `glob` is Redis's
/// `stringmatchlen` (`*`, `?`, `[...]` with `^` and ranges, `\` escapes),
/// used only by a bare `FCALL`.
const LIBRARY_BODY: &str = r#"
local MAGIC = '\255wsgate-h1:'

local function keys_of(channel)
  local base = 'wsgate:history:' .. #channel .. ':' .. channel
  return base .. ':stream', base .. ':meta'
end

local function new_epoch(old)
  local t = redis.call('TIME')
  local e = string.format('%x%05x', tonumber(t[1]), tonumber(t[2]))
  if e == old then e = e .. 'z' end
  return e
end

local function glob(p, pi, s, si)
  local plen, slen = #p, #s
  while pi <= plen do
    local c = p:byte(pi)
    if c == 42 then
      while pi < plen and p:byte(pi + 1) == 42 do pi = pi + 1 end
      if pi == plen then return true end
      for k = si, slen + 1 do
        if glob(p, pi + 1, s, k) then return true end
      end
      return false
    elseif si > slen then
      return false
    elseif c == 63 then
      si = si + 1
    elseif c == 91 then
      local ch = s:byte(si)
      pi = pi + 1
      local neg = p:byte(pi) == 94
      if neg then pi = pi + 1 end
      local hit = false
      while true do
        if pi > plen then pi = plen break end
        local d = p:byte(pi)
        if d == 92 and pi + 1 <= plen then
          pi = pi + 1
          if p:byte(pi) == ch then hit = true end
        elseif d == 93 then
          break
        elseif pi + 2 <= plen and p:byte(pi + 1) == 45 then
          local a, b = d, p:byte(pi + 2)
          if a > b then a, b = b, a end
          if ch >= a and ch <= b then hit = true end
          pi = pi + 2
        elseif d == ch then
          hit = true
        end
        pi = pi + 1
      end
      if neg then hit = not hit end
      if not hit then return false end
      si = si + 1
    else
      if c == 92 and pi < plen then pi = pi + 1 end
      if p:byte(pi) ~= s:byte(si) then return false end
      si = si + 1
    end
    pi = pi + 1
  end
  return si > slen
end

local function rule_of(channel)
  for _, r in ipairs(RULES) do
    if glob(r[1], 1, channel, 1) then return r end
  end
  return nil
end

local function epoch_of(stream, meta, ttl)
  local epoch = redis.call('HGET', meta, 'epoch')
  if not epoch then
    epoch = new_epoch(nil)
    redis.call('DEL', stream)
    redis.call('HSET', meta, 'epoch', epoch, 'top', 0)
    redis.call('PEXPIRE', meta, ttl)
  end
  return epoch
end

-- KEYS[1] channel; ARGV payload [, size, ttl_ms [, idempotency key, its ttl_ms]]
local function publish(keys, args)
  local channel, payload = keys[1], args[1]
  if channel == nil or payload == nil then
    return redis.error_reply('ERR usage: FCALL wsgate_publish 1 <channel> <payload>')
  end
  local size, ttl = tonumber(args[2]), tonumber(args[3])
  if size == nil or ttl == nil then
    local rule = rule_of(channel)
    if rule == nil then return redis.call('PUBLISH', channel, payload) end
    size, ttl = rule[2], rule[3]
  end
  local once = args[4]
  if once then
    if not redis.call('SET', once, '', 'NX', 'PX', args[5]) then
      return tonumber(redis.call('GET', once))
    end
  end
  local stream, meta = keys_of(channel)
  local epoch = epoch_of(stream, meta, ttl)
  local offset = redis.call('HINCRBY', meta, 'top', 1)
  redis.call('XADD', stream, 'MAXLEN', '~', size, offset .. '-0', 'd', payload)
  redis.call('PEXPIRE', stream, ttl)
  redis.call('PEXPIRE', meta, ttl)
  local n = redis.pcall('PUBLISH', channel, MAGIC .. offset .. ':' .. epoch .. ':' .. payload)
  if type(n) == 'table' and n.err then
    if once then redis.call('DEL', once) end
    return n
  end
  if once then redis.call('SET', once, n, 'PX', args[5]) end
  return n
end

-- KEYS[1] channel; ARGV mode ('latest' | 'after'), offset, epoch, limit, ttl_ms
-- -> {epoch, top, {offset, payload, ...}}
local function read(keys, args)
  local stream, meta = keys_of(keys[1])
  local limit = tonumber(args[4]) or 100
  local epoch = epoch_of(stream, meta, tonumber(args[5]) or 300000)
  local top = tonumber(redis.call('HGET', meta, 'top')) or 0
  local rows
  if args[1] == 'after' then
    local since = tonumber(args[2]) or 0
    if args[3] == epoch and since > top then
      epoch = new_epoch(epoch)
      redis.call('HSET', meta, 'epoch', epoch)
    end
    if args[3] ~= epoch or since >= top then return {epoch, top, {}} end
    rows = redis.call('XRANGE', stream, tostring(since + 1), '+', 'COUNT', limit)
  else
    rows = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', limit)
    local n = #rows
    for i = 1, math.floor(n / 2) do rows[i], rows[n - i + 1] = rows[n - i + 1], rows[i] end
  end
  local out = {}
  for _, row in ipairs(rows) do
    out[#out + 1] = tonumber(string.match(row[1], '^(%d+)'))
    out[#out + 1] = row[2][2]
  end
  return {epoch, top, out}
end

redis.register_function('wsgate_publish', publish)
redis.register_function('wsgate_read', read)
"#;

/// The `FCALL wsgate_publish` a wsgate publish of `payload` to a history
/// channel sends (size and ttl given: no matching in Lua), appended to
/// `out`; with an idempotency key, its Redis key and ttl.
pub(crate) fn encode_publish(
    out: &mut BytesMut,
    channel: &[u8],
    payload: &[u8],
    size: &[u8],
    ttl_ms: &[u8],
    once: Option<(&[u8], &[u8])>,
) {
    let mut args: Vec<&[u8]> = vec![
        b"FCALL",
        b"wsgate_publish",
        b"1",
        channel,
        payload,
        size,
        ttl_ms,
    ];
    if let Some((key, ttl)) = once {
        args.push(key);
        args.push(ttl);
    }
    resp::encode_command(out, args.into_iter());
}

/// Reads history over the node's history connection.
#[derive(Clone)]
pub(crate) struct Reader {
    commands: Commands,
    /// `FUNCTION LOAD REPLACE <library>`, sent when Redis lost the library.
    load: Bytes,
}

impl Reader {
    /// A reader over `commands` that loads `library` when needed.
    pub(crate) fn new(commands: Commands, library: &str) -> Reader {
        let mut load = BytesMut::new();
        resp::encode_command(
            &mut load,
            [&b"FUNCTION"[..], b"LOAD", b"REPLACE", library.as_bytes()].into_iter(),
        );
        Reader {
            commands,
            load: load.freeze(),
        }
    }

    /// Reads `channel`'s history as `query` says; `ttl` is the channel's,
    /// for a history the read creates.
    pub(crate) async fn read(
        &self,
        channel: &[u8],
        query: &Query,
        ttl_ms: u128,
    ) -> Result<Read, BrokerError> {
        let (mode, offset, epoch, limit): (&[u8], String, &[u8], usize) = match query {
            Query::Latest { limit } => (b"latest", String::new(), b"", *limit),
            Query::After {
                offset,
                epoch,
                limit,
            } => (b"after", offset.to_string(), epoch, *limit),
        };
        let (limit, ttl) = (limit.to_string(), ttl_ms.max(1).to_string());
        let mut cmd = BytesMut::new();
        resp::encode_command(
            &mut cmd,
            [
                &b"FCALL"[..],
                b"wsgate_read",
                b"1",
                channel,
                mode,
                offset.as_bytes(),
                epoch,
                limit.as_bytes(),
                ttl.as_bytes(),
            ]
            .into_iter(),
        );
        let cmd = cmd.freeze();
        let mut reply = self.call(cmd.clone()).await?;
        if matches!(&reply, Value::Error(e) if e.windows(18).any(|w| w == b"Function not found")) {
            match self.call(self.load.clone()).await? {
                Value::Error(e) => {
                    return Err(BrokerError::Refused(
                        String::from_utf8_lossy(&e).into_owned(),
                    ))
                }
                _ => reply = self.call(cmd).await?,
            }
        }
        parse_read(reply)
    }

    async fn call(&self, cmd: Bytes) -> Result<Value, BrokerError> {
        self.commands
            .call(cmd)
            .await
            .map_err(|CommandError::Unavailable| BrokerError::Unavailable)
    }
}

/// `{epoch, top, {offset, payload, ...}}` into a [`Read`].
fn parse_read(reply: Value) -> Result<Read, BrokerError> {
    let bad = |what: &str| BrokerError::Refused(format!("unexpected wsgate_read reply: {what}"));
    let parts = match reply {
        Value::Array(parts) => parts,
        Value::Error(e) => {
            return Err(BrokerError::Refused(
                String::from_utf8_lossy(&e).into_owned(),
            ))
        }
        other => return Err(bad(&format!("{other:?}"))),
    };
    let mut parts = parts.into_iter();
    let (Some(Value::Bulk(epoch)), Some(Value::Integer(top)), Some(Value::Array(rows))) =
        (parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("shape"));
    };
    let mut entries = Vec::with_capacity(rows.len() / 2);
    let mut rows = rows.into_iter();
    while let (Some(Value::Integer(offset)), Some(Value::Bulk(payload))) =
        (rows.next(), rows.next())
    {
        entries.push(Entry {
            offset: u64::try_from(offset).map_err(|_| bad("offset"))?,
            payload,
        });
    }
    Ok(Read {
        epoch,
        top: u64::try_from(top).map_err(|_| bad("top"))?,
        entries,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_library_is_named_for_the_version_and_holds_the_rules() {
        assert_eq!(library_name(), "wsgate_0_1_0");
        let rules = Rules::parse("news.*:100:300s").unwrap();
        let src = library(&rules);
        assert!(src.starts_with("#!lua name=wsgate_0_1_0\n"), "{src}");
        assert!(
            src.contains("{\"\\110\\101\\119\\115\\46\\42\", 100, 300000}"),
            "{src}"
        );
    }
}
