//! The real `wsgate` binary as a child process: draining on SIGTERM (close
//! 1012), stopping at once on SIGINT (close 1001), configuration errors, and
//! the default (no Redis) setup.
//!
//! Children are started with every inherited `WSGATE_*` variable removed, so
//! the developer's environment cannot change what is tested. Every wait is
//! bounded; a child that outlives its bound is killed.

// Helpers outside `#[test]` fns panic on purpose too (a failed helper is a
// failed test); clippy's allow-expect-in-tests only covers test fns.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use tokio::task::JoinHandle;

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::os::unix::ffi::OsStrExt;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// The binary with a clean `WSGATE_*` environment, quiet logs, and `env`.
fn command<K: AsRef<OsStr>, V: AsRef<OsStr>>(env: &[(K, V)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wsgate"));
    for (k, _) in std::env::vars_os() {
        if k.as_bytes().starts_with(b"WSGATE_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("WSGATE_LOG", "warn").env_remove("RUST_BACKTRACE");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Spawns the binary on a free loopback port (plus `env`) and waits for `/readyz`.
async fn spawn(env: &[(&str, String)]) -> GatewayProcess {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let mut cmd = command(env);
    cmd.env("WSGATE_LISTEN", addr.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let child = cmd.spawn().expect("spawn wsgate");
    let gw = GatewayProcess { child, addr };
    wait_until("gateway process /readyz", WAIT, || async move {
        http(addr, "GET", "/readyz", None).await.0 == 200
    })
    .await;
    gw
}

/// Runs the binary to completion: (status, stdout, stderr). Killed (and the
/// test failed) if it is still running after 10 s.
fn run_to_exit<K: AsRef<OsStr>, V: AsRef<OsStr>>(env: &[(K, V)]) -> (ExitStatus, String, String) {
    run_cmd_to_exit(command(env))
}

/// [`run_to_exit`] of a prepared command (arguments, limits).
fn run_cmd_to_exit(mut cmd: Command) -> (ExitStatus, String, String) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn wsgate");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match child.try_wait().expect("try_wait") {
            Some(_) => break,
            None if Instant::now() > deadline => {
                let _ = child.kill();
                let out = child.wait_with_output().expect("wait");
                panic!(
                    "wsgate still running after 10 s (killed); stderr: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            None => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    let out = child.wait_with_output().expect("wait_with_output");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Reads every frame until the connection ends, so the close handshake is
/// answered (tungstenite replies to a close frame on the next read). Returns
/// the server's close code and reason, if one arrived.
/// One task per client, each reading until its connection closes.
fn spawn_readers(clients: Vec<Client>) -> Vec<JoinHandle<Option<(u16, String)>>> {
    clients
        .into_iter()
        .map(|c| tokio::spawn(read_until_closed(c)))
        .collect()
}

/// The close (code, reason) a reader task saw, within `WAIT`.
async fn joined(reader: JoinHandle<Option<(u16, String)>>) -> Option<(u16, String)> {
    tokio::time::timeout(WAIT, reader)
        .await
        .expect("reader hung")
        .expect("reader")
}

async fn read_until_closed(mut c: Client) -> Option<(u16, String)> {
    let mut close = None;
    loop {
        match tokio::time::timeout(WAIT, c.ws.next()).await {
            Ok(Some(Ok(Message::Close(frame)))) => {
                close = Some(
                    frame
                        .map(|f| (u16::from(f.code), f.reason.to_string()))
                        .unwrap_or((0, String::new())),
                );
            }
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(_)) | None) | Err(_) => return close,
        }
    }
}

/// POST /publish; (status, parsed body).
async fn publish(addr: SocketAddr, body: Value) -> (u16, Value) {
    let (status, text) = http(addr, "POST", "/publish", Some(&body.to_string())).await;
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

// ---------------------------------------------------------------- SIGTERM / SIGINT

/// SIGTERM drains: every socket is closed with 1012 ("service restart")
/// within `WSGATE_DRAIN_WINDOW_MS`, and the process exits 0 promptly once the
/// clients answered the close handshake. (Spread over the window, readiness
/// and refused upgrades during the drain: tests/faults.rs.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_every_client_with_1012_and_exits_0() {
    let window = Duration::from_millis(500);
    let mut gw = spawn(&[("WSGATE_DRAIN_WINDOW_MS", window.as_millis().to_string())]).await;
    let mut clients = Vec::new();
    for i in 0..20 {
        let mut c = gw.client().await;
        if i % 2 == 0 {
            c.psubscribe("term.*").await;
        } else {
            c.subscribe(&format!("term.{i}")).await;
        }
        clients.push(c);
    }
    // All live: a pattern publish reaches the ten pattern subscribers.
    assert_eq!(
        publish(gw.addr, json!({"channel":"term.0","payload":"hi"})).await,
        (200, json!({"receivers":1}))
    );
    for c in clients.iter_mut().step_by(2) {
        assert_eq!(
            c.recv().await,
            json!({"action":"message","pattern":"term.*","channel":"term.0","payload":"hi"})
        );
    }
    let readers: Vec<_> = spawn_readers(clients);

    let t = Instant::now();
    let status = gw.terminate().await;
    let took = t.elapsed();
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
    for (i, r) in readers.into_iter().enumerate() {
        let close = joined(r).await;
        assert_eq!(
            close,
            Some((1012, "service restart".to_owned())),
            "client {i}"
        );
    }
    // Answered handshakes end the shutdown once the window is over, far from
    // window + the 5 s default WSGATE_SHUTDOWN_TIMEOUT_MS.
    println!("SIGTERM to exit with 20 clients, {window:?} drain window: {took:?}");
    assert!(took < window + Duration::from_secs(3), "exit took {took:?}");
    assert_eq!(
        http(gw.addr, "GET", "/healthz", None).await.0,
        0,
        "nothing listens any more"
    );
}

/// SIGINT (Ctrl-C) stops at once: every socket is closed with 1001 ("server
/// shutting down") without waiting for the drain window, and the exit is 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_closes_every_client_with_1001_at_once_and_exits_0() {
    // A long drain window that SIGINT must not wait for.
    let mut gw = spawn(&[("WSGATE_DRAIN_WINDOW_MS", "30000".to_owned())]).await;
    let mut clients = Vec::new();
    for i in 0..10 {
        let mut c = gw.client().await;
        c.subscribe(&format!("int.{i}")).await;
        clients.push(c);
    }
    let readers: Vec<_> = spawn_readers(clients);
    let t = Instant::now();
    let status = gw.interrupt().await;
    let took = t.elapsed();
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
    for (i, r) in readers.into_iter().enumerate() {
        let close = joined(r).await;
        assert_eq!(
            close,
            Some((1001, "server shutting down".to_owned())),
            "client {i}"
        );
    }
    println!("SIGINT to exit with 10 clients: {took:?}");
    assert!(took < Duration::from_secs(3), "exit took {took:?}");
    assert_eq!(http(gw.addr, "GET", "/healthz", None).await.0, 0);
}

/// A client that never reads cannot hold the process: it exits 0 once the
/// drain window plus WSGATE_SHUTDOWN_TIMEOUT_MS has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_stalled_client_is_bounded_by_window_plus_shutdown_timeout() {
    let (window, grace) = (Duration::from_millis(300), Duration::from_millis(1000));
    let mut gw = spawn(&[
        ("WSGATE_DRAIN_WINDOW_MS", window.as_millis().to_string()),
        ("WSGATE_SHUTDOWN_TIMEOUT_MS", grace.as_millis().to_string()),
    ])
    .await;
    let mut stalled = gw.client().await;
    stalled.psubscribe("stall.*").await;
    let t = Instant::now();
    let status = gw.terminate().await;
    let took = t.elapsed();
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
    println!(
        "SIGTERM to exit with a stalled client, {window:?} window + {grace:?} timeout: {took:?}"
    );
    assert!(
        took >= window + grace - Duration::from_millis(100),
        "exited after {took:?}: did it wait for the session at all?"
    );
    assert!(
        took < window + grace + Duration::from_secs(3),
        "exit took {took:?}"
    );
    // The close frame was sent before the process gave up.
    assert_eq!(
        stalled.expect_close().await.map(|f| u16::from(f.code)),
        Some(1012)
    );
}

/// With Redis: SIGTERM also exits 0 and the node's pub/sub connection goes away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_redis_exits_0_and_leaves_redis_clean() {
    let redis = Redis::start().await;
    let mut gw = spawn(&[
        ("WSGATE_REDIS_URL", redis.url()),
        ("WSGATE_DRAIN_WINDOW_MS", "200".to_owned()),
    ])
    .await;
    let mut c = gw.client().await;
    c.psubscribe("bye.*").await;
    assert_eq!(redis.numpat().await, 1);
    let reader = tokio::spawn(read_until_closed(c));
    let status = gw.terminate().await;
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
    assert_eq!(
        joined(reader).await,
        Some((1012, "service restart".to_owned()))
    );
    wait_until("the pub/sub connection closed", WAIT, || async {
        redis.numpat().await == 0
    })
    .await;
    assert_eq!(redis.pubsub_clients().await, vec![]);
}

// ---------------------------------------------------------------- configuration

/// A bad value: exit code 2, nothing on stdout, exactly one stderr line
/// naming the variable (and echoing the value).
#[test]
fn bad_configuration_exits_2_with_one_line_naming_the_variable() {
    let listen = format!("127.0.0.1:{}", free_port());
    for (var, value) in [
        ("WSGATE_MAX_SUBSCRIPTIONS", "abc"),
        ("WSGATE_LOG_FORMAT", "xml"),
        ("WSGATE_LISTEN", "nowhere"),
        ("WSGATE_REDIS_URL", "http://127.0.0.1:1"),
        ("WSGATE_SUBSCRIBE_TIMEOUT_MS", "0"),
        ("WSGATE_SHUTDOWN_TIMEOUT_MS", "soon"),
        ("WSGATE_MAX_MESSAGE_BYTES", "-1"),
        ("WSGATE_WS_PATH", "ws"),
        ("WSGATE_LOG", "[[["),
    ] {
        // A valid listen address (unless that is the variable under test), so
        // a wrongly accepted value would start a server and hit the guard.
        let mut env = vec![("WSGATE_LISTEN", listen.as_str())];
        env.retain(|(k, _)| *k != var);
        env.push((var, value));
        let (status, stdout, stderr) = run_to_exit(&env);
        assert_eq!(
            status.code(),
            Some(2),
            "{var}={value}: {status:?}, stderr {stderr:?}"
        );
        assert_eq!(stdout, "", "{var}={value}: stdout");
        assert!(stderr.ends_with('\n'), "{var}={value}: {stderr:?}");
        assert_eq!(
            stderr.lines().count(),
            1,
            "{var}={value}: stderr must be one line: {stderr:?}"
        );
        assert!(stderr.contains(var), "{var}={value}: {stderr:?}");
        assert!(stderr.contains(value), "{var}={value}: {stderr:?}");
    }
}

/// A `WSGATE_*` value that is not UTF-8 is a bad value like any other:
/// exit 2 and one line naming the variable (config.rs documents
/// `ConfigError::Env` for "a value is not unicode").
#[test]
fn non_utf8_wsgate_value_is_a_config_error() {
    let bad = OsStr::from_bytes(b"\xff\xfe");
    let (status, stdout, stderr) = run_to_exit(&[(OsStr::new("WSGATE_LOG_FORMAT"), bad)]);
    assert_eq!(status.code(), Some(2), "{status:?}, stderr {stderr:?}");
    assert_eq!(stdout, "");
    assert_eq!(
        stderr.lines().count(),
        1,
        "stderr must be one line: {stderr:?}"
    );
    assert!(stderr.contains("WSGATE_LOG_FORMAT"), "{stderr:?}");
}

/// A non-UTF-8 value in a variable the gateway does not own must not stop it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_utf8_unrelated_variable_does_not_prevent_start() {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let mut cmd = command(&[("WSGATE_LISTEN", addr.to_string())]);
    cmd.env("UNRELATED_LATIN1", OsStr::from_bytes(b"caf\xe9"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let child = cmd.spawn().expect("spawn wsgate");
    let mut gw = GatewayProcess { child, addr };
    wait_ready_or_exit(&mut gw, " because of UNRELATED_LATIN1=caf\\xe9").await;
    assert_eq!(gw.terminate().await.code(), Some(0));
}

// ---------------------------------------------------------------- default setup

/// `cargo run` with nothing set (bar the port) uses the embedded broker: ready
/// at once, and a subscribe plus an HTTP publish deliver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_setup_works_without_redis() {
    let mut gw = spawn(&[]).await;
    assert_eq!(
        http(gw.addr, "GET", "/readyz", None).await,
        (200, r#"{"ready":true}"#.to_owned())
    );
    assert_eq!(http(gw.addr, "GET", "/healthz", None).await.0, 200);
    let mut c = gw.client().await;
    c.psubscribe("hello.*").await;
    c.subscribe("hello.world").await;
    assert_eq!(
        publish(gw.addr, json!({"channel":"hello.world","payload":{"n":1}})).await,
        (200, json!({"receivers":2}))
    );
    let mut got = vec![c.recv().await.to_string(), c.recv().await.to_string()];
    got.sort();
    let mut want = vec![
        json!({"action":"message","pattern":"hello.*","channel":"hello.world","payload":{"n":1}})
            .to_string(),
        json!({"action":"message","channel":"hello.world","payload":{"n":1}}).to_string(),
    ];
    want.sort();
    assert_eq!(got, want);
    assert_eq!(
        publish(gw.addr, json!({"channel":"elsewhere","payload":"x"})).await,
        (200, json!({"receivers":0}))
    );
    assert!(http(gw.addr, "GET", "/metrics", None)
        .await
        .1
        .contains("wsgate_connections 1"));
    // Ctrl-C: the default drain window (10 s) does not apply; close now.
    let reader = tokio::spawn(read_until_closed(c));
    assert_eq!(gw.interrupt().await.code(), Some(0));
    assert_eq!(joined(reader).await.map(|c| c.0), Some(1001));
}

// ---------------------------------------------------------------- issue 10: start-up hardening

/// Sets the child's open-file limits to (`soft`, `hard`) before it starts.
fn with_nofile(cmd: &mut Command, soft: u64, hard: u64) {
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec the closure only calls setrlimit, which
    // is async-signal-safe, and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: soft as libc::rlim_t,
                rlim_max: hard as libc::rlim_t,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Waits for `/readyz` of a child started by hand; panics (with the first
/// lines of its stderr, and `why` after its status) if it exits first.
async fn wait_ready_or_exit(gw: &mut GatewayProcess, why: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(status) = gw.child.try_wait().expect("try_wait") {
            let mut stderr = String::new();
            if let Some(mut e) = gw.child.stderr.take() {
                use std::io::Read as _;
                let _ = e.read_to_string(&mut stderr);
            }
            let first = stderr
                .lines()
                .filter(|l| !l.trim().is_empty())
                .take(2)
                .collect::<Vec<_>>()
                .join(" | ");
            panic!("wsgate exited with {status:?}{why}: {first}");
        }
        if http(gw.addr, "GET", "/readyz", None).await.0 == 200 {
            return;
        }
        assert!(Instant::now() < deadline, "no /readyz within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A misspelt variable stops start-up with exit 2 and the nearest known
/// name; before, `WSGATE_JWT_SECRETS` started an open node.
#[test]
fn a_misspelt_variable_exits_2_with_the_nearest_name() {
    let listen = format!("127.0.0.1:{}", free_port());
    for (var, value, nearest) in [
        (
            "WSGATE_JWT_SECRETS",
            "0123456789abcdef0123456789abcdef",
            "WSGATE_JWT_SECRET",
        ),
        ("WSGATE_APIKEY", "0123456789abcdef-key", "WSGATE_API_KEY"),
        ("WSGATE_MAX_CONECTIONS", "5", "WSGATE_MAX_CONNECTIONS"),
    ] {
        // A valid listen address: a wrongly accepted variable would start a
        // server, and run_to_exit's 10 s guard would fail the test.
        let (status, stdout, stderr) =
            run_to_exit(&[("WSGATE_LISTEN", listen.as_str()), (var, value)]);
        assert_eq!(
            status.code(),
            Some(2),
            "{var}: {status:?}, stderr {stderr:?}"
        );
        assert_eq!(stdout, "", "{var}");
        assert_eq!(
            stderr,
            format!("wsgate: {var} is not a wsgate variable: did you mean {nearest}?\n")
        );
        // The value never appears: it may be a secret.
        assert!(!stderr.contains(value), "{stderr}");
    }
}

/// The variables Kubernetes injects for a Service named `wsgate` do not
/// stop start-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_service_link_variables_do_not_stop_start_up() {
    let mut gw = spawn(&[
        ("WSGATE_SERVICE_HOST", "10.96.0.12".to_owned()),
        ("WSGATE_SERVICE_PORT", "80".to_owned()),
        ("WSGATE_SERVICE_PORT_HTTP", "80".to_owned()),
        ("WSGATE_PORT", "tcp://10.96.0.12:80".to_owned()),
        ("WSGATE_PORT_80_TCP", "tcp://10.96.0.12:80".to_owned()),
        ("WSGATE_PORT_80_TCP_PROTO", "tcp".to_owned()),
        ("WSGATE_PORT_80_TCP_PORT", "80".to_owned()),
        ("WSGATE_PORT_80_TCP_ADDR", "10.96.0.12".to_owned()),
    ])
    .await;
    assert_eq!(gw.terminate().await.code(), Some(0));
}

/// `--help` lists every variable with its default and `--version` prints
/// the version: exit 0, without listening (the port is held by the test, so
/// an attempt to listen would fail with exit 1, and serving would not exit).
/// Both work even with a bad configuration in the environment.
#[test]
fn help_and_version_exit_0_without_listening() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = held.local_addr().unwrap().to_string();
    let env = [
        ("WSGATE_LISTEN", listen.as_str()),
        ("WSGATE_LOG_FORMAT", "xml"),
    ];
    for flag in ["--help", "-h"] {
        let mut cmd = command(&env);
        cmd.arg(flag);
        let (status, stdout, stderr) = run_cmd_to_exit(cmd);
        assert_eq!(status.code(), Some(0), "{flag}: {stderr}");
        assert_eq!(stderr, "", "{flag}");
        assert!(stdout.starts_with("wsgate "), "{stdout}");
        for name in wsgate::config::known_variables() {
            assert!(
                stdout.contains(&format!("  {name} ")),
                "{flag}: {name} missing"
            );
        }
        let default_of = |name: &str| {
            stdout
                .lines()
                .find(|l| l.split_whitespace().next() == Some(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .map(str::to_owned)
        };
        assert_eq!(
            default_of("WSGATE_MAX_CONNECTIONS").as_deref(),
            Some("20000")
        );
        assert_eq!(default_of("WSGATE_LISTEN").as_deref(), Some("0.0.0.0:8080"));
        assert_eq!(
            default_of("WSGATE_HTTP_HEADER_TIMEOUT_MS").as_deref(),
            Some("10000")
        );
        assert_eq!(default_of("WSGATE_JWT_SECRET").as_deref(), Some("unset"));
    }
    for flag in ["--version", "-V"] {
        let mut cmd = command(&env);
        cmd.arg(flag);
        let (status, stdout, stderr) = run_cmd_to_exit(cmd);
        assert_eq!(status.code(), Some(0), "{flag}: {stderr}");
        assert_eq!(stdout, format!("wsgate {}\n", env!("CARGO_PKG_VERSION")));
        assert_eq!(stderr, "");
    }
    drop(held);
}

/// Any other argument: exit 2 and one line naming it.
#[test]
fn an_unknown_argument_exits_2() {
    let listen = format!("127.0.0.1:{}", free_port());
    for args in [
        &["--port", "9"][..],
        &["serve"],
        &["--help", "extra"],
        &["-x"],
    ] {
        let mut cmd = command(&[("WSGATE_LISTEN", listen.as_str())]);
        cmd.args(args);
        let (status, stdout, stderr) = run_cmd_to_exit(cmd);
        assert_eq!(status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stdout, "");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        let named = if args[0] == "--help" {
            args[1]
        } else {
            args[0]
        };
        assert!(stderr.contains(&format!("{named:?}")), "{args:?}: {stderr}");
    }
}

/// Under a soft limit of 100 and a hard limit of 400 the node raises its
/// soft limit to 400 and lowers its default caps to fit: 400 - 256 headroom
/// = 144 descriptors, a quarter (36) for pending connections, 108 for
/// WebSockets. 108 clients connect; the 109th is refused with 503, never by
/// running out of descriptors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_fd_limit_is_raised_and_the_default_caps_fit_in_it() {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut cmd = command(&[("WSGATE_LISTEN", addr.to_string())]);
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    with_nofile(&mut cmd, 100, 400);
    let mut gw = GatewayProcess {
        child: cmd.spawn().expect("spawn wsgate"),
        addr,
    };
    wait_ready_or_exit(&mut gw, "").await;
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", gw.pid())).unwrap();
    let files: Vec<&str> = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(&files[3..5], &["400", "400"], "{limits}");
    assert_eq!(
        metric_value(addr, "wsgate_max_connections").await,
        Some(108.0)
    );
    let mut clients = Vec::new();
    for _ in 0..108 {
        clients.push(gw.client().await);
    }
    let refused = Client::try_connect(addr, "/ws", &[]).await.err().unwrap();
    assert_eq!(refused.status, 503);
    assert_eq!(refused.error(), "too many connections on this node");
    // Every client is still served.
    let mut last = clients.pop().unwrap();
    assert_eq!(
        last.request(json!({"action":"ping"})).await["action"],
        json!("pong")
    );
    drop((last, clients));
    assert_eq!(gw.interrupt().await.code(), Some(0));
}

/// An explicit `WSGATE_MAX_CONNECTIONS` the limit cannot hold is refused
/// (exit 2, saying what fits) rather than lowered; one that fits is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_explicit_cap_beyond_the_fd_limit_exits_2() {
    let listen = format!("127.0.0.1:{}", free_port());
    let mut cmd = command(&[
        ("WSGATE_LISTEN", listen.as_str()),
        ("WSGATE_MAX_CONNECTIONS", "1000"),
    ]);
    with_nofile(&mut cmd, 400, 400);
    let (status, stdout, stderr) = run_cmd_to_exit(cmd);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert_eq!(stdout, "");
    assert_eq!(
        stderr,
        "wsgate: WSGATE_MAX_CONNECTIONS=1000 does not fit in the open-file limit of 400 \
         (needs WSGATE_MAX_CONNECTIONS + WSGATE_MAX_PENDING_CONNECTIONS + 256 descriptors; \
         at most 108 fits): lower it, or raise the hard limit (ulimit -Hn, systemd \
         LimitNOFILE=, docker --ulimit nofile=)\n"
    );

    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut cmd = command(&[
        ("WSGATE_LISTEN", addr.to_string()),
        ("WSGATE_MAX_CONNECTIONS", "100".to_owned()),
    ]);
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    with_nofile(&mut cmd, 400, 400);
    let mut gw = GatewayProcess {
        child: cmd.spawn().expect("spawn wsgate"),
        addr,
    };
    wait_ready_or_exit(&mut gw, "").await;
    assert_eq!(
        metric_value(addr, "wsgate_max_connections").await,
        Some(100.0)
    );
    assert_eq!(gw.interrupt().await.code(), Some(0));
}

/// With the defaults, the node starts under this machine's own limit (20,000
/// here: `cargo run --release` must keep working) with the cap that fits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_defaults_start_under_this_machines_fd_limit() {
    // The children inherit the hard limit; the soft one they raise themselves.
    let hard = wsgate::fdlimit::raise().unwrap().hard;
    let defaults = wsgate::Config::default();
    let want = wsgate::fdlimit::fit(
        hard,
        wsgate::fdlimit::Caps {
            connections: defaults.max_connections.get(),
            connections_set: false,
            pending: defaults.max_pending_connections.get(),
            pending_set: false,
        },
    )
    .unwrap();
    let mut gw = spawn(&[]).await;
    assert_eq!(
        metric_value(gw.addr, "wsgate_max_connections").await,
        Some(want.connections as f64)
    );
    assert_eq!(gw.interrupt().await.code(), Some(0));
}

/// Start-up logs one line saying which protections are on.
#[test]
fn start_up_logs_one_line_of_protections() {
    use std::io::BufRead as _;
    let protections = |env: &[(&str, &str)]| -> String {
        let listen = format!("127.0.0.1:{}", free_port());
        let mut all = vec![("WSGATE_LISTEN", listen.as_str()), ("WSGATE_LOG", "info")];
        all.extend_from_slice(env);
        let mut child = command(&all)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn wsgate");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if line.contains("protections:") {
                    let _ = tx.send(line);
                }
            }
        });
        let line = rx.recv_timeout(WAIT);
        let _ = child.kill();
        let _ = child.wait();
        let line = line.expect("no protections line within WAIT");
        line.split_once("protections: ").unwrap().1.to_owned()
    };
    let open = protections(&[]);
    assert!(
        open.starts_with(
            "auth=none (anyone may connect) api_key=off (publish is open) origins=any \
             require_origin=false acl=off authz=off max_connections="
        ),
        "{open}"
    );
    assert!(open.contains(" max_connections_per_ip=off "), "{open}");
    let closed = protections(&[
        ("WSGATE_JWT_SECRET", "0123456789abcdef0123456789abcdef"),
        ("WSGATE_API_KEY", "0123456789abcdef-key"),
        ("WSGATE_ALLOWED_ORIGINS", "https://app.example"),
        ("WSGATE_ALLOW", "news.*"),
        ("WSGATE_MAX_CONNECTIONS_PER_IP", "5"),
        ("WSGATE_MAX_CONNECTIONS", "1000"),
        ("WSGATE_CLIENT_PUBLISH", "chat.*,alerts"),
    ]);
    assert_eq!(
        closed,
        "auth=jwt HS256 api_key=on origins=https://app.example require_origin=false \
         acl=WSGATE_ALLOW=news.* authz=off max_connections=1000 max_pending_connections=1024 \
         max_connections_per_ip=5 new_connections_per_ip_per_sec=off trusted_proxies=0 \
         http_header_timeout_ms=10000 http_body_timeout_ms=10000 client_publish=chat.*,alerts"
    );
    assert!(open.ends_with(" client_publish=off"), "{open}");
    assert!(!closed.contains("0123456789abcdef"), "secrets never logged");
}
