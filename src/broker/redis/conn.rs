//! Opening a connection to Redis, shared by every connection a node has
//! (pub/sub, publish, and the Bayeux handoff store): which URLs are accepted
//! ([`Target::parse`]) and the handshake each connection starts with
//! ([`Handshake`]: `AUTH`, `SELECT`, `CLIENT SETNAME`, then whatever the
//! connection's role needs), so that a URL form or a handshake step is
//! added in one place for all of them.

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::resp::{self, Value};
use super::RedisConfigError;

/// Where a node's Redis is and how to log in, from `WSGATE_REDIS_URL`.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    /// Redis host (resolved again on every connect: a failover moves DNS).
    pub(crate) host: String,
    /// Redis port.
    pub(crate) port: u16,
    /// `AUTH [user] password`, from the URL.
    pub(crate) auth: Option<(Option<String>, String)>,
    /// The database of the URL's path (`/3`); 0 by default.
    pub(crate) db: i64,
}

impl Target {
    /// Parses `url` the way every connection of the node reads it:
    /// `redis://[user:password@]host[:port][/db]`, plain TCP only (no TLS,
    /// no Unix socket). Also returns redis-rs's client for the same URL, for
    /// the one connection that uses redis-rs (the `PUBSUB NUMPAT` poll).
    pub(crate) fn parse(url: &str) -> Result<(Target, redis::Client), RedisConfigError> {
        let client = redis::Client::open(url)?;
        let info = client.get_connection_info();
        let (host, port) = match info.addr() {
            redis::ConnectionAddr::Tcp(host, port) => (host.clone(), *port),
            _ => return Err(RedisConfigError::Unsupported),
        };
        let settings = info.redis_settings();
        let auth = settings.password().map(|password| {
            let user = settings.username().map(str::to_owned);
            (user, password.to_owned())
        });
        let target = Target {
            host,
            port,
            auth,
            db: settings.db(),
        };
        Ok((target, client))
    }

    /// `host:port`, for log spans.
    pub(crate) fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// The commands a new connection sends before anything else, pipelined in
/// one write, and the name of each (for error messages).
pub(crate) struct Handshake {
    cmd: BytesMut,
    steps: Vec<&'static str>,
}

impl Handshake {
    /// `AUTH` (when the URL has a password), `SELECT` (when `select` and the
    /// URL names a database other than 0: keys live in it; pub/sub ignores
    /// databases) and `CLIENT SETNAME client_name`, so an operator sees in
    /// `CLIENT LIST` which node and which role each connection is.
    pub(crate) fn new(target: &Target, client_name: &str, select: bool) -> Handshake {
        let mut h = Handshake {
            cmd: BytesMut::new(),
            steps: Vec::new(),
        };
        if let Some((user, password)) = &target.auth {
            let mut args: Vec<&[u8]> = vec![b"AUTH"];
            args.extend(user.as_deref().map(str::as_bytes));
            args.push(password.as_bytes());
            h.push("AUTH", &args);
        }
        if select && target.db != 0 {
            let db = target.db.to_string();
            h.push("SELECT", &[b"SELECT", db.as_bytes()]);
        }
        h.push(
            "CLIENT SETNAME",
            &[b"CLIENT", b"SETNAME", client_name.as_bytes()],
        );
        h
    }

    /// Appends one more command, named `step`.
    pub(crate) fn push(&mut self, step: &'static str, args: &[&[u8]]) {
        resp::encode_command(&mut self.cmd, args.iter().copied());
        self.steps.push(step);
    }

    /// Connects to `target`, writes every command and reads one reply per
    /// command: each step's name with its reply, in order, for the caller
    /// to judge (a refused `CLIENT SETNAME` matters less than a refused
    /// `AUTH`). No timeout of its own: the caller bounds it (a frozen Redis
    /// still accepts TCP connections through the kernel; its replies are what
    /// prove it alive).
    pub(crate) async fn run(
        self,
        target: &Target,
    ) -> Result<(TcpStream, Vec<(&'static str, Value)>), String> {
        let addr = (target.host.clone(), target.port);
        let mut stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        stream
            .write_all(&self.cmd)
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = BytesMut::with_capacity(256);
        let mut replies = Vec::with_capacity(self.steps.len());
        while replies.len() < self.steps.len() {
            if stream.read_buf(&mut buf).await.map_err(|e| e.to_string())? == 0 {
                return Err("connection closed during handshake".to_owned());
            }
            while let Some(v) = resp::parse(&mut buf).map_err(|e| e.to_string())? {
                replies.push(v);
            }
        }
        if replies.len() > self.steps.len() {
            return Err("more replies than commands during handshake".to_owned());
        }
        Ok((stream, self.steps.into_iter().zip(replies).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_url_forms_the_node_accepts() {
        let (t, _) = Target::parse("redis://user:pw@127.0.0.1:6390/3").unwrap();
        assert_eq!((t.host.as_str(), t.port, t.db), ("127.0.0.1", 6390, 3));
        assert_eq!(t.auth, Some((Some("user".to_owned()), "pw".to_owned())));
        let (t, _) = Target::parse("redis://localhost").unwrap();
        assert_eq!((t.port, t.db, t.auth), (6379, 0, None));
        assert!(matches!(
            Target::parse("redis+unix:///tmp/redis.sock"),
            Err(RedisConfigError::Unsupported)
        ));
        assert!(Target::parse("http://x").is_err());
    }

    #[test]
    fn handshake_selects_only_when_asked_and_needed() {
        let (t, _) = Target::parse("redis://:pw@127.0.0.1:1/2").unwrap();
        let h = Handshake::new(&t, "wsgate:n:role", true);
        assert_eq!(h.steps, ["AUTH", "SELECT", "CLIENT SETNAME"]);
        assert_eq!(
            &h.cmd[..],
            &b"*2\r\n$4\r\nAUTH\r\n$2\r\npw\r\n*2\r\n$6\r\nSELECT\r\n$1\r\n2\r\n\
               *3\r\n$6\r\nCLIENT\r\n$7\r\nSETNAME\r\n$13\r\nwsgate:n:role\r\n"[..]
        );
        assert_eq!(
            Handshake::new(&t, "x", false).steps,
            ["AUTH", "CLIENT SETNAME"]
        );
        let (t, _) = Target::parse("redis://127.0.0.1:1").unwrap();
        assert_eq!(Handshake::new(&t, "x", true).steps, ["CLIENT SETNAME"]);
    }
}
