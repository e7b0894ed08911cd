//! Configuration: one struct, read from the environment once.
//!
//! Every variable carries the `WSGATE_` prefix. [`Config::from_env`] reads them
//! with envy as plain strings and validates each into a typed value, so a bad
//! value produces one line naming the variable and what it accepts (`main`
//! prints it and exits with code 2). Nothing else in the crate reads the
//! environment; defaults live in [`Config::default`] and nowhere else.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::time::Duration;

use serde::Deserialize;

/// A configuration value that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A variable holds a value outside what it accepts.
    #[error("{var}={value:?} is invalid: expected {accepted}")]
    Invalid {
        /// The full variable name, e.g. `WSGATE_LISTEN`.
        var: &'static str,
        /// The rejected value as given.
        value: String,
        /// A human description of the accepted values.
        accepted: &'static str,
    },
    /// A variable's value is not valid unicode.
    #[error("{0}={1:?} is invalid: expected UTF-8 text")]
    NotUnicode(String, String),
    /// envy could not map the variables (not expected: every field is a string).
    #[error("cannot read WSGATE_* environment: {0}")]
    Env(#[from] envy::Error),
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines (the default).
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// The whole gateway configuration, validated.
#[derive(Debug, Clone)]
pub struct Config {
    /// `WSGATE_LISTEN`: address the HTTP/WebSocket server binds. Default `0.0.0.0:8080`.
    pub listen: SocketAddr,
    /// `WSGATE_REDIS_URL`: `redis://[user:password@]host[:port][/db]`. Unset means the
    /// embedded in-process broker (single node, no Redis needed).
    pub redis_url: Option<String>,
    /// `WSGATE_WS_PATH`: path of the WebSocket endpoint. Default `/ws`.
    pub ws_path: String,
    /// `WSGATE_MAX_MESSAGE_BYTES`: largest client frame and largest HTTP publish body,
    /// in bytes. Default 65536. Larger frames close the socket with 1009.
    pub max_message_bytes: NonZeroUsize,
    /// `WSGATE_MAX_SUBSCRIPTIONS`: subscriptions one connection may hold. Default 256.
    pub max_subscriptions: NonZeroUsize,
    /// `WSGATE_MAX_PATTERN_BYTES`: longest pattern or channel name, in bytes. Default 256.
    pub max_pattern_bytes: NonZeroUsize,
    /// `WSGATE_CLIENT_QUEUE_BYTES`: outbound bytes a connection may have queued before
    /// it is closed as a slow consumer (code 4008). Default 1048576 (1 MiB).
    pub client_queue_bytes: NonZeroUsize,
    /// `WSGATE_WS_READ_BUFFER_BYTES`: read buffer per WebSocket, in bytes. Default 1024.
    /// It is allocated (and zero-filled) per socket, so it dominates idle memory
    /// (measured: ~5.3 KB per subscribed socket plus this); clients send small
    /// requests, and larger frames still work (read in several chunks).
    pub ws_read_buffer_bytes: NonZeroUsize,
    /// `WSGATE_SUBSCRIBE_TIMEOUT_MS`: how long a subscribe waits for the broker to
    /// confirm before it is refused with `broker unavailable`. Default 5000 ms.
    pub subscribe_timeout: Duration,
    /// `WSGATE_SHUTDOWN_TIMEOUT_MS`: grace after the drain window (or after an
    /// immediate stop) for sockets to finish closing before the process exits
    /// anyway. Default 5000 ms.
    pub shutdown_timeout: Duration,
    /// `WSGATE_DRAIN_WINDOW_MS`: on SIGTERM, sockets are closed with 1012 spread
    /// evenly over this window so clients do not reconnect as a herd. Default 10000 ms.
    pub drain_window: Duration,
    /// `WSGATE_MAX_CONNECTIONS`: WebSocket connections per node; further upgrades
    /// are refused with 503. Default 20000.
    pub max_connections: NonZeroUsize,
    /// `WSGATE_SUBSCRIBE_RATE`: subscribes per second per connection (token bucket,
    /// burst of the same size); excess gets `rate limited`. Default 100.
    pub subscribe_rate: NonZeroUsize,
    /// `WSGATE_PING_INTERVAL_MS`: how often the server pings each socket. Default 25000 ms.
    pub ping_interval: Duration,
    /// `WSGATE_PONG_TIMEOUT_MS`: a socket with no traffic at all (no frame, no pong)
    /// for this long is closed with 4009. Default 60000 ms.
    pub pong_timeout: Duration,
    /// `WSGATE_REDIS_PROBE_INTERVAL_MS`: how often the pub/sub connection is probed
    /// with PING. Default 1000 ms.
    pub redis_probe_interval: Duration,
    /// `WSGATE_REDIS_PROBE_TIMEOUT_MS`: a probe unanswered for this long (or a connect
    /// or write taking this long) counts as a dead connection, which is replaced.
    /// Detection time is at most interval + timeout. Default 3000 ms.
    pub redis_probe_timeout: Duration,
    /// `WSGATE_REDIS_BACKOFF_MAX_MS`: cap of the reconnect backoff (exponential from
    /// 50 ms, with jitter; retries never stop). Default 1000 ms.
    pub redis_backoff_max: Duration,
    /// `WSGATE_LOG`: tracing filter, e.g. `info` or `wsgate=debug`. Default `info`.
    pub log: String,
    /// `WSGATE_LOG_FORMAT`: `text` or `json`. Default `text`.
    pub log_format: LogFormat,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            redis_url: None,
            ws_path: "/ws".to_owned(),
            max_message_bytes: nz(65536),
            max_subscriptions: nz(256),
            max_pattern_bytes: nz(256),
            client_queue_bytes: nz(1024 * 1024),
            ws_read_buffer_bytes: nz(1024),
            subscribe_timeout: Duration::from_millis(5000),
            shutdown_timeout: Duration::from_millis(5000),
            drain_window: Duration::from_millis(10_000),
            max_connections: nz(20_000),
            subscribe_rate: nz(100),
            ping_interval: Duration::from_millis(25_000),
            pong_timeout: Duration::from_millis(60_000),
            redis_probe_interval: Duration::from_millis(1000),
            redis_probe_timeout: Duration::from_millis(3000),
            redis_backoff_max: Duration::from_millis(1000),
            log: "info".to_owned(),
            log_format: LogFormat::Text,
        }
    }
}

/// Constant non-zero defaults; `max(1)` keeps this total without a panic path.
const fn nz(n: usize) -> NonZeroUsize {
    match NonZeroUsize::new(n) {
        Some(v) => v,
        None => NonZeroUsize::MIN,
    }
}

/// The environment as envy sees it: every field an optional string, so that
/// validation (and its error message) is ours rather than serde's.
#[derive(Deserialize, Default)]
struct RawConfig {
    listen: Option<String>,
    redis_url: Option<String>,
    ws_path: Option<String>,
    max_message_bytes: Option<String>,
    max_subscriptions: Option<String>,
    max_pattern_bytes: Option<String>,
    client_queue_bytes: Option<String>,
    ws_read_buffer_bytes: Option<String>,
    subscribe_timeout_ms: Option<String>,
    shutdown_timeout_ms: Option<String>,
    drain_window_ms: Option<String>,
    max_connections: Option<String>,
    subscribe_rate: Option<String>,
    ping_interval_ms: Option<String>,
    pong_timeout_ms: Option<String>,
    redis_probe_interval_ms: Option<String>,
    redis_probe_timeout_ms: Option<String>,
    redis_backoff_max_ms: Option<String>,
    log: Option<String>,
    log_format: Option<String>,
}

impl Config {
    /// Reads and validates every `WSGATE_*` variable of the process environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        // `std::env::vars()` panics on a value that is not unicode, anywhere in
        // the environment; read raw, keep ours, and refuse a bad one of ours.
        let mut vars = Vec::new();
        for (key, value) in std::env::vars_os() {
            let Some(key) = key.to_str().filter(|k| k.starts_with("WSGATE_")) else {
                continue;
            };
            match value.into_string() {
                Ok(value) => vars.push((key.to_owned(), value)),
                Err(raw) => {
                    return Err(ConfigError::NotUnicode(
                        key.to_owned(),
                        raw.to_string_lossy().into_owned(),
                    ))
                }
            }
        }
        Self::from_vars(vars)
    }

    /// Same as [`Config::from_env`] over explicit pairs (names with the prefix),
    /// so tests can check validation without touching the process environment.
    pub fn from_vars<I>(vars: I) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        Self::from_raw(envy::prefixed("WSGATE_").from_iter::<_, RawConfig>(vars)?)
    }

    fn from_raw(raw: RawConfig) -> Result<Config, ConfigError> {
        let d = Config::default();
        Ok(Config {
            listen: parse_or(
                raw.listen,
                d.listen,
                "WSGATE_LISTEN",
                |v| v.parse().ok(),
                "a socket address such as 0.0.0.0:8080 or 127.0.0.1:9000",
            )?,
            redis_url: match raw.redis_url.filter(|v| !v.is_empty()) {
                None => None,
                Some(url) if url.starts_with("redis://") => Some(url),
                Some(url) => {
                    return Err(invalid("WSGATE_REDIS_URL", url,
                        "a URL of the form redis://[user:password@]host[:port][/db], or unset for the embedded broker"));
                }
            },
            ws_path: parse_or(
                raw.ws_path,
                d.ws_path,
                "WSGATE_WS_PATH",
                |v| {
                    (v.starts_with('/') && v.len() > 1 && !v.contains(['?', '#', ' ']))
                        .then(|| v.to_owned())
                },
                "an absolute path such as /ws (not / itself, no query)",
            )?,
            max_message_bytes: bytes_or(
                raw.max_message_bytes,
                d.max_message_bytes,
                "WSGATE_MAX_MESSAGE_BYTES",
            )?,
            max_subscriptions: bytes_or(
                raw.max_subscriptions,
                d.max_subscriptions,
                "WSGATE_MAX_SUBSCRIPTIONS",
            )?,
            max_pattern_bytes: bytes_or(
                raw.max_pattern_bytes,
                d.max_pattern_bytes,
                "WSGATE_MAX_PATTERN_BYTES",
            )?,
            client_queue_bytes: bytes_or(
                raw.client_queue_bytes,
                d.client_queue_bytes,
                "WSGATE_CLIENT_QUEUE_BYTES",
            )?,
            ws_read_buffer_bytes: bytes_or(
                raw.ws_read_buffer_bytes,
                d.ws_read_buffer_bytes,
                "WSGATE_WS_READ_BUFFER_BYTES",
            )?,
            subscribe_timeout: millis_or(
                raw.subscribe_timeout_ms,
                d.subscribe_timeout,
                "WSGATE_SUBSCRIBE_TIMEOUT_MS",
            )?,
            shutdown_timeout: millis_or(
                raw.shutdown_timeout_ms,
                d.shutdown_timeout,
                "WSGATE_SHUTDOWN_TIMEOUT_MS",
            )?,
            drain_window: parse_or(
                raw.drain_window_ms,
                d.drain_window,
                "WSGATE_DRAIN_WINDOW_MS",
                |v| v.parse::<u64>().ok().map(Duration::from_millis),
                "a whole number of milliseconds (0 closes every socket at once)",
            )?,
            max_connections: bytes_or(
                raw.max_connections,
                d.max_connections,
                "WSGATE_MAX_CONNECTIONS",
            )?,
            subscribe_rate: bytes_or(
                raw.subscribe_rate,
                d.subscribe_rate,
                "WSGATE_SUBSCRIBE_RATE",
            )?,
            ping_interval: millis_or(
                raw.ping_interval_ms,
                d.ping_interval,
                "WSGATE_PING_INTERVAL_MS",
            )?,
            pong_timeout: millis_or(
                raw.pong_timeout_ms,
                d.pong_timeout,
                "WSGATE_PONG_TIMEOUT_MS",
            )?,
            redis_probe_interval: millis_or(
                raw.redis_probe_interval_ms,
                d.redis_probe_interval,
                "WSGATE_REDIS_PROBE_INTERVAL_MS",
            )?,
            redis_probe_timeout: millis_or(
                raw.redis_probe_timeout_ms,
                d.redis_probe_timeout,
                "WSGATE_REDIS_PROBE_TIMEOUT_MS",
            )?,
            redis_backoff_max: millis_or(
                raw.redis_backoff_max_ms,
                d.redis_backoff_max,
                "WSGATE_REDIS_BACKOFF_MAX_MS",
            )?,
            log: parse_or(
                raw.log,
                d.log,
                "WSGATE_LOG",
                |v| {
                    tracing_subscriber::EnvFilter::try_new(v)
                        .ok()
                        .map(|_| v.to_owned())
                },
                "a tracing filter such as info, debug or wsgate=debug,warn",
            )?,
            log_format: parse_or(
                raw.log_format,
                d.log_format,
                "WSGATE_LOG_FORMAT",
                |v| match v {
                    "text" => Some(LogFormat::Text),
                    "json" => Some(LogFormat::Json),
                    _ => None,
                },
                "text or json",
            )?,
        })
    }
}

fn invalid(var: &'static str, value: String, accepted: &'static str) -> ConfigError {
    ConfigError::Invalid {
        var,
        value,
        accepted,
    }
}

/// An unset (or empty) variable takes the default; a set one must parse.
fn parse_or<T>(
    raw: Option<String>,
    default: T,
    var: &'static str,
    parse: impl FnOnce(&str) -> Option<T>,
    accepted: &'static str,
) -> Result<T, ConfigError> {
    match raw.filter(|v| !v.is_empty()) {
        None => Ok(default),
        Some(v) => parse(v.trim()).ok_or_else(|| invalid(var, v, accepted)),
    }
}

fn bytes_or(
    raw: Option<String>,
    default: NonZeroUsize,
    var: &'static str,
) -> Result<NonZeroUsize, ConfigError> {
    parse_or(
        raw,
        default,
        var,
        |v| v.parse().ok(),
        "a whole number greater than 0",
    )
}

fn millis_or(
    raw: Option<String>,
    default: Duration,
    var: &'static str,
) -> Result<Duration, ConfigError> {
    parse_or(
        raw,
        default,
        var,
        |v| {
            v.parse::<u64>()
                .ok()
                .filter(|ms| *ms > 0)
                .map(Duration::from_millis)
        },
        "a whole number of milliseconds greater than 0",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_vars(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn defaults_apply_when_nothing_is_set() {
        let c = vars(&[]).unwrap();
        assert_eq!(c.listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(c.redis_url, None);
        assert_eq!(c.ws_path, "/ws");
        assert_eq!(c.max_message_bytes.get(), 65536);
        assert_eq!(c.max_subscriptions.get(), 256);
        assert_eq!(c.max_pattern_bytes.get(), 256);
        assert_eq!(c.client_queue_bytes.get(), 1 << 20);
        assert_eq!(c.log_format, LogFormat::Text);
    }

    #[test]
    fn values_are_parsed() {
        let c = vars(&[
            ("WSGATE_LISTEN", "127.0.0.1:9"),
            ("WSGATE_REDIS_URL", "redis://127.0.0.1:7000/0"),
            ("WSGATE_MAX_SUBSCRIPTIONS", "3"),
            ("WSGATE_LOG_FORMAT", "json"),
            ("WSGATE_SUBSCRIBE_TIMEOUT_MS", "250"),
        ])
        .unwrap();
        assert_eq!(c.listen, "127.0.0.1:9".parse().unwrap());
        assert_eq!(c.redis_url.as_deref(), Some("redis://127.0.0.1:7000/0"));
        assert_eq!(c.max_subscriptions.get(), 3);
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.subscribe_timeout, Duration::from_millis(250));
    }

    #[test]
    fn a_bad_value_names_the_variable_and_the_accepted_values() {
        for (var, value, expect) in [
            ("WSGATE_LISTEN", "nowhere", "socket address"),
            ("WSGATE_MAX_MESSAGE_BYTES", "0", "greater than 0"),
            ("WSGATE_MAX_SUBSCRIPTIONS", "-4", "whole number"),
            ("WSGATE_LOG_FORMAT", "xml", "text or json"),
            ("WSGATE_REDIS_URL", "http://x", "redis://"),
            ("WSGATE_WS_PATH", "ws", "absolute path"),
            ("WSGATE_LOG", "[[[", "tracing filter"),
        ] {
            let err = vars(&[(var, value)]).unwrap_err().to_string();
            assert!(err.starts_with(var), "{err}");
            assert!(err.contains(expect), "{err}");
            assert!(!err.contains('\n'), "{err}");
        }
    }
}
