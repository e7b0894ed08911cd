//! Opening a connection to Redis, shared by every connection a node has
//! (pub/sub, publish, history, the `PUBSUB NUMPAT` poll, the Bayeux handoff
//! store and the service directory): which URLs are accepted
//! ([`Target::parse`]: `redis://`, `rediss://`, `redis+sentinel://`,
//! `rediss+sentinel://`), where the server is *now* (asked again on every
//! connect: Sentinel or DNS may have moved it), the byte stream (TCP or
//! TLS, [`super::stream`]) and the handshake each connection starts with
//! ([`Handshake`]: `AUTH`, `SELECT`, `CLIENT SETNAME`, then whatever the
//! connection's role needs, then `ROLE` behind Sentinel), so that a URL
//! form or a handshake step is added in one place for all of them.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::resp::{self, Value};
use super::sentinel::{self, Moved, Sentinel};
use super::stream::{Stream, Tls};
use super::RedisConfigError;

/// What a Redis URL alone cannot say: the sentinels' own password and the
/// TLS files (`WSGATE_REDIS_SENTINEL_PASSWORD`, `WSGATE_REDIS_CA_FILE`,
/// `WSGATE_REDIS_CERT_FILE`, `WSGATE_REDIS_KEY_FILE`), the same for every
/// connection of the node.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Security {
    /// `AUTH` on the sentinels (not on the master: that is the URL's).
    pub sentinel_password: Option<String>,
    /// PEM CA bundle that `rediss://` servers' certificates must chain to.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain, with [`Security::key_file`].
    pub cert_file: Option<PathBuf>,
    /// PEM private key of [`Security::cert_file`].
    pub key_file: Option<PathBuf>,
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Security")
            .field(
                "sentinel_password",
                &self.sentinel_password.as_ref().map(|_| "***"),
            )
            .field("ca_file", &self.ca_file)
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .finish()
    }
}

/// Where the server is: named by the URL, or asked of Sentinel.
#[derive(Debug, Clone)]
enum Locate {
    /// `redis[s]://host:port` (DNS resolved again on every connect).
    Direct { host: String, port: u16 },
    /// `redis[s]+sentinel://...`: asked on every connect.
    Sentinel(Arc<Sentinel>),
    /// Any node of a Redis Cluster ([`Nodes`]): classic pub/sub is
    /// broadcast cluster-wide, so whichever answers will do.
    Any(Arc<Nodes>),
}

/// The nodes a cluster connection may use, kept current by the slot map's
/// refreshes (masters first, then replicas, then the seeds), and where the
/// last connect got through, so that the next one tries there first and a
/// dead node is passed over.
#[derive(Debug)]
pub(crate) struct Nodes {
    list: std::sync::Mutex<Vec<(String, u16)>>,
    next: std::sync::atomic::AtomicUsize,
}

impl Nodes {
    /// The seed nodes, until the first refresh.
    pub(crate) fn new(seeds: Vec<(String, u16)>) -> Nodes {
        Nodes {
            list: std::sync::Mutex::new(seeds),
            next: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// Every candidate: the masters known, then their replicas, then the
    /// seeds (as the last [`Nodes::set`] gave them).
    pub(crate) fn list(&self) -> Vec<(String, u16)> {
        self.list.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the candidates (the start index is kept on the same node
    /// when it is still listed).
    pub(crate) fn set(&self, nodes: Vec<(String, u16)>) {
        let mut list = self.list.lock().unwrap_or_else(|p| p.into_inner());
        let at = self.next.load(std::sync::atomic::Ordering::Relaxed);
        let current = list.get(at).cloned();
        let keep = current
            .and_then(|c| nodes.iter().position(|n| *n == c))
            .unwrap_or(0);
        *list = nodes;
        self.next.store(keep, std::sync::atomic::Ordering::Relaxed);
    }

    /// Every candidate, from where the last connect got through.
    fn ordered(&self) -> Vec<(usize, (String, u16))> {
        let list = self.list.lock().unwrap_or_else(|p| p.into_inner());
        let n = list.len();
        let start = self.next.load(std::sync::atomic::Ordering::Relaxed);
        (0..n)
            .map(|i| (start + i) % n)
            .filter_map(|i| list.get(i).map(|node| (i, node.clone())))
            .collect()
    }
}

/// Where a node's Redis is and how to log in, from `WSGATE_REDIS_URL`.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    locate: Locate,
    /// `AUTH [user] password`, from the URL.
    pub(crate) auth: Option<(Option<String>, String)>,
    /// The database of the URL's path (`/3`); 0 by default.
    pub(crate) db: i64,
    /// `rediss://`: TLS on every connection (sentinels included).
    tls: Option<Tls>,
}

impl Target {
    /// Parses `url` the way every connection of the node reads it:
    /// `redis[s]://[user:password@]host[:port][/db]` or
    /// `redis[s]+sentinel://[user:password@]host:port[,host:port...]/master[/db]`
    /// (the credentials are the master's; the sentinels' password is
    /// [`Security::sentinel_password`]; a sentinel without a port is on
    /// 26379). No Unix sockets. TLS files are loaded here: a bad one
    /// refuses the start.
    pub(crate) fn parse(url: &str, security: &Security) -> Result<Target, RedisConfigError> {
        let (scheme, rest) = url.split_once("://").ok_or(RedisConfigError::Unsupported)?;
        let (tls, sentinel) = match scheme {
            "redis" => (false, false),
            "rediss" => (true, false),
            "redis+sentinel" => (false, true),
            "rediss+sentinel" => (true, true),
            _ => return Err(RedisConfigError::Unsupported),
        };
        let tls = if tls {
            let tls = Tls::load(
                security.ca_file.as_deref(),
                security.cert_file.as_deref(),
                security.key_file.as_deref(),
            )
            .map_err(RedisConfigError::Tls)?;
            Some(tls)
        } else {
            None
        };
        if !sentinel {
            // redis-rs parses the rest (percent-decoding, defaults) as it did.
            let info = redis::Client::open(format!("redis://{rest}"))?
                .get_connection_info()
                .clone();
            let (host, port) = match info.addr() {
                redis::ConnectionAddr::Tcp(host, port) => (host.clone(), *port),
                _ => return Err(RedisConfigError::Unsupported),
            };
            let (auth, db) = auth_and_db(&info);
            return Ok(Target {
                locate: Locate::Direct { host, port },
                auth,
                db,
                tls,
            });
        }
        let bad =
            |why: &str| RedisConfigError::Sentinel(format!("{why} in {scheme}://{}", redact(rest)));
        let (authority, path) = rest.split_once('/').ok_or_else(|| bad("no /master name"))?;
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let mut nodes = Vec::new();
        for node in hosts.split(',') {
            let (host, port) = match node.rsplit_once(':') {
                Some((h, p)) => (h, p.parse().map_err(|_| bad("a bad sentinel port"))?),
                None => (node, 26379),
            };
            if host.is_empty() {
                return Err(bad("an empty sentinel host"));
            }
            nodes.push((host.trim_matches(['[', ']']).to_owned(), port));
        }
        let (master, db) = match path.split_once('/') {
            Some((m, db)) => (m, db),
            None => (path, ""),
        };
        if master.is_empty() {
            return Err(bad("no master name"));
        }
        // Credentials and database through redis-rs, as for a single Redis.
        let userinfo = userinfo.map(|u| format!("{u}@")).unwrap_or_default();
        let info = redis::Client::open(format!("redis://{userinfo}localhost/{db}"))?
            .get_connection_info()
            .clone();
        let (auth, db) = auth_and_db(&info);
        let sentinel = Sentinel::new(
            nodes,
            master.to_owned(),
            security.sentinel_password.clone(),
            tls.clone(),
        );
        Ok(Target {
            locate: Locate::Sentinel(Arc::new(sentinel)),
            auth,
            db,
            tls,
        })
    }

    /// A target on `host:port` with `like`'s credentials and TLS (a node of
    /// the cluster `like` was made for).
    pub(crate) fn node(like: &Target, host: &str, port: u16) -> Target {
        Target {
            locate: Locate::Direct {
                host: host.to_owned(),
                port,
            },
            ..like.clone()
        }
    }

    /// A target on whichever of `nodes` answers, with `like`'s credentials
    /// and TLS.
    pub(crate) fn any(like: &Target, nodes: Arc<Nodes>) -> Target {
        Target {
            locate: Locate::Any(nodes),
            ..like.clone()
        }
    }

    /// What log spans show: `host:port`, or the sentinels and master name.
    pub(crate) fn addr(&self) -> String {
        match &self.locate {
            Locate::Any(_) => "any cluster node".to_owned(),
            Locate::Direct { host, port } => format!("{host}:{port}"),
            Locate::Sentinel(s) => {
                let nodes: Vec<String> = s.nodes.iter().map(|(h, p)| format!("{h}:{p}")).collect();
                format!("sentinel {} master {}", nodes.join(","), s.master)
            }
        }
    }
}

/// The URL's `AUTH` credentials and database.
fn auth_and_db(info: &redis::ConnectionInfo) -> (Option<(Option<String>, String)>, i64) {
    let settings = info.redis_settings();
    let auth = settings.password().map(|password| {
        let user = settings.username().map(str::to_owned);
        (user, password.to_owned())
    });
    (auth, settings.db())
}

/// `rest` of a URL without its password, for error messages.
fn redact(rest: &str) -> String {
    match rest.split_once('@') {
        Some((_, after)) => format!("***@{after}"),
        None => rest.to_owned(),
    }
}

/// One connection, handshake done.
pub(crate) struct Connected {
    /// The stream, ready for the connection's own commands.
    pub(crate) stream: Stream,
    /// Each handshake step's name with its reply, in order.
    pub(crate) replies: Vec<(&'static str, Value)>,
    /// Resolves when Sentinel announces another master: the connection
    /// should then end and connect again.
    pub(crate) moved: Moved,
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

    /// Connects to `target` (asking Sentinel first when the URL names
    /// sentinels), writes every command and reads one reply per command:
    /// each step's name with its reply, in order, for the caller to judge (a
    /// refused `CLIENT SETNAME` matters less than a refused `AUTH`). Behind
    /// Sentinel a last `ROLE` must say master, or the connect fails. No
    /// timeout of its own: the caller bounds it (a frozen Redis still
    /// accepts TCP connections through the kernel; its replies are what
    /// prove it alive).
    pub(crate) async fn run(mut self, target: &Target) -> Result<Connected, String> {
        let ((host, port), moved) = match &target.locate {
            Locate::Direct { host, port } => ((host.clone(), *port), Moved::never()),
            Locate::Sentinel(s) => {
                self.push("ROLE", &[b"ROLE"]);
                s.resolve().await?
            }
            Locate::Any(nodes) => {
                // Boxed: this future is awaited inside deep ones (the
                // HTTP routes' futures reach the compiler's depth limit).
                let (cmd, steps) = (self.cmd, self.steps);
                return Box::pin(connect_any(nodes.clone(), target.tls.clone(), cmd, steps)).await;
            }
        };
        let mut stream = Stream::connect(&host, port, target.tls.as_ref()).await?;
        let replies = exchange(&mut stream, &self.cmd, self.steps.len()).await?;
        let mut replies: Vec<_> = self.steps.into_iter().zip(replies).collect();
        if let Locate::Sentinel(_) = target.locate {
            if let Some((_, role)) = replies.pop() {
                sentinel::is_master(&role).map_err(|e| format!("{host}:{port}: {e}"))?;
            }
        }
        Ok(Connected {
            stream,
            replies,
            moved,
        })
    }
}

/// Connects to the first of `nodes` that accepts (from where the last
/// connect got through) and runs the handshake `cmd` there.
async fn connect_any(
    nodes: Arc<Nodes>,
    tls: Option<Tls>,
    cmd: BytesMut,
    steps: Vec<&'static str>,
) -> Result<Connected, String> {
    let mut last = "no cluster node known".to_owned();
    for (i, (host, port)) in nodes.ordered() {
        // Advanced before the try: a caller that times out here starts on
        // the next node.
        nodes
            .next
            .store(i + 1, std::sync::atomic::Ordering::Relaxed);
        let mut stream = match Stream::connect(&host, port, tls.as_ref()).await {
            Ok(stream) => stream,
            Err(e) => {
                last = format!("{host}:{port}: {e}");
                continue;
            }
        };
        // A node that accepts TCP but fails the handshake (frozen, loading,
        // refusing this ACL user) is passed over like one that refuses:
        // the start index stays on the next node.
        match exchange(&mut stream, &cmd, steps.len()).await {
            Ok(replies) if !replies.iter().any(|r| matches!(r, Value::Error(_))) => {
                nodes.next.store(i, std::sync::atomic::Ordering::Relaxed);
                return Ok(Connected {
                    stream,
                    replies: steps.into_iter().zip(replies).collect(),
                    moved: Moved::never(),
                });
            }
            Ok(replies) => {
                let why = replies.iter().find_map(|r| match r {
                    Value::Error(e) => Some(String::from_utf8_lossy(e).into_owned()),
                    _ => None,
                });
                last = format!("{host}:{port}: {}", why.unwrap_or_default());
            }
            Err(e) => last = format!("{host}:{port}: {e}"),
        }
    }
    Err(last)
}

/// Writes `cmd` (complete RESP, `expected` commands) and reads exactly
/// `expected` replies. Unbounded: callers bound it.
pub(crate) async fn exchange(
    stream: &mut Stream,
    cmd: &[u8],
    expected: usize,
) -> Result<Vec<Value>, String> {
    stream.write_all(cmd).await.map_err(|e| e.to_string())?;
    stream.flush().await.map_err(|e| e.to_string())?;
    let mut buf = BytesMut::with_capacity(256);
    let mut replies = Vec::with_capacity(expected);
    while replies.len() < expected {
        if stream.read_buf(&mut buf).await.map_err(|e| e.to_string())? == 0 {
            return Err("connection closed during handshake".to_owned());
        }
        while let Some(v) = resp::parse(&mut buf).map_err(|e| e.to_string())? {
            replies.push(v);
        }
    }
    if replies.len() > expected {
        return Err("more replies than commands during handshake".to_owned());
    }
    Ok(replies)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> Result<Target, RedisConfigError> {
        Target::parse(url, &Security::default())
    }

    #[test]
    fn parses_the_url_forms_the_node_accepts() {
        let t = parse("redis://user:pw@127.0.0.1:6390/3").unwrap();
        assert_eq!((t.addr().as_str(), t.db), ("127.0.0.1:6390", 3));
        assert_eq!(t.auth, Some((Some("user".to_owned()), "pw".to_owned())));
        let t = parse("redis://localhost").unwrap();
        assert_eq!(
            (t.addr().as_str(), t.db, t.auth),
            ("localhost:6379", 0, None)
        );
        assert!(matches!(
            parse("redis+unix:///tmp/redis.sock"),
            Err(RedisConfigError::Unsupported)
        ));
        assert!(parse("http://x").is_err());
        // rediss:// without a CA file is refused with the variable named.
        match parse("rediss://127.0.0.1:1") {
            Err(RedisConfigError::Tls(e)) => assert!(e.contains("WSGATE_REDIS_CA_FILE"), "{e}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn parses_sentinel_urls() {
        let t = parse("redis+sentinel://u:p%40w@h1:26379,h2:26380,h3/mymaster/2").unwrap();
        assert_eq!(
            t.addr(),
            "sentinel h1:26379,h2:26380,h3:26379 master mymaster"
        );
        assert_eq!(t.auth, Some((Some("u".to_owned()), "p@w".to_owned())));
        assert_eq!(t.db, 2);
        let t = parse("redis+sentinel://h1:5000/m").unwrap();
        assert_eq!(
            (t.addr().as_str(), t.db, t.auth),
            ("sentinel h1:5000 master m", 0, None)
        );
        for bad in [
            "redis+sentinel://h1:5000",
            "redis+sentinel://h1:5000/",
            "redis+sentinel://h1:x/m",
        ] {
            assert!(
                matches!(parse(bad), Err(RedisConfigError::Sentinel(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn handshake_selects_only_when_asked_and_needed() {
        let t = parse("redis://:pw@127.0.0.1:1/2").unwrap();
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
        let t = parse("redis://127.0.0.1:1").unwrap();
        assert_eq!(Handshake::new(&t, "x", true).steps, ["CLIENT SETNAME"]);
    }
}
