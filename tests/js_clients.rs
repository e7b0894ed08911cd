//! The JS interop harness on its own, without a gateway: `tests/common/node.rs`
//! installs the pinned npm clients (`tests/js/package.json`) and runs
//! `tests/js/faye_client.js` and `tests/js/cometd_client.js`, which load
//! their libraries, check their arguments and always end by themselves.
//! The Bayeux interop tests proper drive the same scripts against wsgate.

mod common;

use common::node::{self, Script};
use common::{free_port, WAIT};

const SCRIPTS: [&str; 2] = ["faye_client.js", "cometd_client.js"];

/// `--help` exits 0 with the usage: the script and every module it imports
/// (faye; cometd and cometd-nodejs-client; ws) loaded.
#[tokio::test]
async fn scripts_load_their_clients_and_print_usage() {
    for script in SCRIPTS {
        let (status, events) = node::run(script, &["--help"], &[], WAIT).await;
        assert!(status.success(), "{script}: {status} {events:?}");
        assert_eq!(events[0]["event"], "unparsed", "{script}: {events:?}");
        assert_eq!(
            events[0]["line"], "usage: node SCRIPT --url URL --transport websocket|long-polling",
            "{script}"
        );
    }
}

/// A wrong invocation exits 64 (EX_USAGE) without a single event.
#[tokio::test]
async fn bad_arguments_are_refused() {
    for script in SCRIPTS {
        for args in [
            &["--transport", "websocket"][..],
            &[
                "--url",
                "http://127.0.0.1:9/bayeux",
                "--transport",
                "eventsource",
            ],
            &[
                "--url",
                "http://127.0.0.1:9/bayeux",
                "--transport",
                "websocket",
                "--bogus",
            ],
        ] {
            let (status, events) = node::run(script, args, &[], WAIT).await;
            assert_eq!(status.code(), Some(64), "{script} {args:?}");
            assert!(events.is_empty(), "{script} {args:?}: {events:?}");
        }
    }
}

/// With nothing listening, a client retries its handshake, and the script
/// still ends by itself at `--max-ms`, saying so (exit status 2).
#[tokio::test]
async fn a_client_with_no_server_gives_up_at_max_ms() {
    let url = format!("http://127.0.0.1:{}/bayeux", free_port());
    for script in SCRIPTS {
        for transport in ["websocket", "long-polling"] {
            let args = ["--url", &url, "--transport", transport, "--max-ms", "1500"];
            let mut s = Script::spawn(script, &args);
            let gave_up = s.expect("error").await;
            assert_eq!(
                gave_up["error"], "gave up after 1500 ms",
                "{script} {transport}"
            );
            assert!(
                !s.history().iter().any(|e| e["event"] == "ready"),
                "{script} {transport}: ready without a server: {:?}",
                s.history()
            );
            let (status, _) = s.finish(WAIT).await;
            assert_eq!(status.code(), Some(2), "{script} {transport}");
        }
    }
}

/// Commands that make no sense are reported as error events, not crashes.
#[tokio::test]
async fn bad_commands_are_reported() {
    let url = format!("http://127.0.0.1:{}/bayeux", free_port());
    let mut s = Script::spawn(
        "faye_client.js",
        &[
            "--url",
            &url,
            "--transport",
            "long-polling",
            "--max-ms",
            "5000",
        ],
    );
    s.send(serde_json::json!({"cmd": "fly"})).await;
    let e = s.expect("error").await;
    assert_eq!(e["error"], r#"unknown command {"cmd":"fly"}"#);
    s.send(serde_json::json!({"cmd": "unsubscribe", "channel": "/nope"}))
        .await;
    let e = s.expect("error").await;
    assert_eq!(e["error"], "not subscribed to /nope");
    // Dropping the Script kills the child.
}
