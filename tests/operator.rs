//! The operator API end to end (`POST /disconnect`, `POST /unsubscribe`):
//! real gateways on a real `redis-server`, clients with tokens for `alice`
//! and `bob` in several dialects. The order acts on every connection of
//! the user on every node, and only on theirs; the answer counts them.
//!
//! Close frames, notices and bodies are compared byte for byte with
//! `docs/protocol.md` and `docs/services.md`; "no more deliveries" is proven
//! by a marker published after, never by silence.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::Value;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use wsgate::auth::JwtKey;
use wsgate::Config;

const SECRET: &str = "wsgate-operator-test-secret-0123456789";
const KEY: &str = "operator-test-publish-key";

/// An HS256 token for `sub`, valid for an hour, that may subscribe to
/// anything.
fn token(sub: &str) -> String {
    let claims = serde_json::json!({
        "sub": sub,
        "exp": jsonwebtoken::get_current_timestamp() + 3600,
        "subscribe": ["*", "/**"],
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// JWT authentication on, the publish API behind [`KEY`].
fn config(redis: &Redis) -> Config {
    let mut c = test_config(Some(redis.url()));
    c.jwt_key = Some(JwtKey::secret(SECRET).unwrap());
    c.api_key = Config::from_vars([("WSGATE_API_KEY".to_owned(), KEY.to_owned())])
        .unwrap()
        .api_key;
    c
}

/// A client of `path` connected with `user`'s token.
async fn connect(gw: &Gateway, path: &str, user: &str) -> Client {
    let bearer = format!("Bearer {}", token(user));
    Client::try_connect(gw.addr, path, &[("authorization", &bearer)])
        .await
        .unwrap_or_else(|r| panic!("upgrade refused: {r:?}"))
}

/// `POST <path>` with the key: (status, body).
async fn order(gw: &Gateway, path: &str, body: &str) -> (u16, String) {
    let bearer = format!("Bearer {KEY}");
    http_with(
        gw.addr,
        "POST",
        path,
        &[("authorization", &bearer)],
        Some(body),
    )
    .await
}

/// Asserts the server closed `c` with 4010 and the operator's reason, and
/// completes the close handshake, up to the end of the stream (the session
/// lets go of the socket, and of a Bayeux clientId, then).
async fn expect_disconnected(c: &mut Client, who: &str) {
    let frame = c
        .expect_close()
        .await
        .unwrap_or_else(|| panic!("{who}: no close frame"));
    assert_eq!(
        (frame.code, frame.reason.as_str()),
        (CloseCode::from(4010), "disconnected by the server"),
        "{who}"
    );
    let _ = c.ws.close(None).await;
    while c.next_message().await.is_some() {}
}

/// Asserts `c` answers a ping: still connected and served.
async fn expect_alive(c: &mut Client, who: &str) {
    c.send_text(r#"{"action":"ping","id":"p"}"#).await;
    assert_eq!(
        c.recv_text().await,
        r#"{"action":"pong","id":"p"}"#,
        "{who}"
    );
}

/// A Bayeux handshake over a WebSocket with `user`'s token in `ext`, and
/// a subscribe (the first message after the handshake, which claims the
/// clientId for this node): the clientId.
async fn bayeux(gw: &Gateway, user: &str) -> (Client, String) {
    let mut c = Client::connect(gw.addr, "/bayeux").await;
    c.send_text(&format!(
        r#"[{{"channel":"/meta/handshake","version":"1.0","supportedConnectionTypes":["websocket"],"id":"1","ext":{{"token":"{}"}}}}]"#,
        token(user)
    ))
    .await;
    let reply: Value = serde_json::from_str(&c.recv_text().await).unwrap();
    assert_eq!(reply[0]["successful"], true, "{reply}");
    let cid = reply[0]["clientId"].as_str().unwrap().to_owned();
    c.send_text(&format!(
        r#"[{{"channel":"/meta/subscribe","clientId":"{cid}","subscription":"/news","id":"2"}}]"#
    ))
    .await;
    assert_eq!(
        c.recv_text().await,
        format!(
            r#"[{{"channel":"/meta/subscribe","id":"2","successful":true,"clientId":"{cid}","subscription":"/news"}}]"#
        )
    );
    (c, cid)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_api_is_behind_the_publish_key_and_says_what_is_wrong() {
    let redis = Redis::start().await;
    let mut c = config(&redis);
    c.max_publish_bytes = std::num::NonZeroUsize::new(64).unwrap();
    let gw = Gateway::start(c).await;
    for path in ["/disconnect", "/unsubscribe"] {
        let unkeyed = http(gw.addr, "POST", path, Some(r#"{"user":"alice"}"#)).await;
        assert_eq!(
            unkeyed,
            (
                401,
                r#"{"error":"a valid API key is required: Authorization: Bearer <key>"}"#
                    .to_owned()
            ),
            "{path}"
        );
        let get = http(gw.addr, "GET", path, None).await;
        assert_eq!(
            get,
            (
                405,
                r#"{"error":"method not allowed: use POST"}"#.to_owned()
            ),
            "{path}"
        );
        let big = format!(r#"{{"user":"{}"}}"#, "a".repeat(64));
        assert_eq!(
            order(&gw, path, &big).await,
            (413, r#"{"error":"body larger than 64 bytes"}"#.to_owned()),
            "{path}"
        );
    }
    let d = r#"expected {\"user\": string}"#;
    let u = r#"expected {\"user\": string, \"channel\" or \"pattern\": string}"#;
    for (path, body, error) in [
        (
            "/disconnect",
            "{}",
            format!("invalid body: missing field `user` at line 1 column 2: {d}"),
        ),
        (
            "/disconnect",
            r#"{"user":""}"#,
            format!(r#"\"user\" must not be empty: {d}"#),
        ),
        (
            "/unsubscribe",
            r#"{"user":"alice"}"#,
            format!(r#"give one of \"channel\" or \"pattern\": {u}"#),
        ),
        (
            "/unsubscribe",
            r#"{"user":"alice","channel":""}"#,
            "invalid channel: empty".to_owned(),
        ),
    ] {
        assert_eq!(
            order(&gw, path, body).await,
            (400, format!(r#"{{"error":"{error}"}}"#)),
            "{path} {body}"
        );
    }
    // Nobody of that name: acted on nothing.
    assert_eq!(
        order(&gw, "/disconnect", r#"{"user":"nobody"}"#).await,
        (200, r#"{"disconnected":0}"#.to_owned())
    );
    assert_eq!(
        order(&gw, "/unsubscribe", r#"{"user":"nobody","pattern":"*"}"#).await,
        (200, r#"{"unsubscribed":0}"#.to_owned())
    );
    gw.stop().await;
}

/// Every connection of alice closes with 4010 (native, SocketStream, a
/// Bayeux WebSocket, whose session ends: its clientId is unknown after),
/// bob's stays, and the count says 4.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_closes_every_connection_of_the_user_and_only_theirs() {
    let redis = Redis::start().await;
    let gw = Gateway::start(config(&redis)).await;
    let mut alice1 = connect(&gw, "/ws", "alice").await;
    alice1.subscribe("news").await;
    let mut alice2 = connect(&gw, "/ws", "alice").await;
    expect_alive(&mut alice2, "alice2").await;
    let mut alice_ss = connect(&gw, "/socketstream", "alice").await;
    alice_ss
        .send_text(r#"1|1|{"m":"wsgate.subscribe","p":["news"]}"#)
        .await;
    assert_eq!(alice_ss.recv_text().await, r#"1|1|{"p":[true]}"#);
    let (mut alice_bx, cid) = bayeux(&gw, "alice").await;
    let mut bob = connect(&gw, "/ws", "bob").await;
    bob.subscribe("news").await;

    assert_eq!(
        order(&gw, "/disconnect", r#"{"user":"alice"}"#).await,
        (200, r#"{"disconnected":4}"#.to_owned())
    );
    expect_disconnected(&mut alice1, "alice on /ws").await;
    expect_disconnected(&mut alice2, "alice's second /ws").await;
    expect_disconnected(&mut alice_ss, "alice on /socketstream").await;
    expect_disconnected(&mut alice_bx, "alice on /bayeux").await;
    // The Bayeux session ended with its socket: once the close handshake
    // is over (the session lets go of its clientId then), it is unknown.
    let connect = format!(
        r#"[{{"channel":"/meta/connect","clientId":"{cid}","connectionType":"long-polling","id":"3"}}]"#
    );
    let unknown = format!(
        r#"[{{"channel":"/meta/connect","id":"3","successful":false,"error":"402:{cid}:Unknown client","advice":{{"reconnect":"handshake","interval":0}}}}]"#
    );
    let (addr, connect, unknown) = (gw.addr, &connect, &unknown);
    wait_until("the Bayeux clientId is unknown", WAIT, || async move {
        http(addr, "POST", "/bayeux", Some(connect)).await == (200, unknown.clone())
    })
    .await;
    // bob is untouched, and still receives.
    expect_alive(&mut bob, "bob").await;
    redis.publish("news", b"1").await;
    assert_eq!(
        bob.recv_text().await,
        r#"{"action":"message","channel":"news","payload":1}"#
    );
    // Their sessions are gone from the registry: nothing left to act on.
    assert_eq!(
        order(&gw, "/disconnect", r#"{"user":"alice"}"#).await,
        (200, r#"{"disconnected":0}"#.to_owned())
    );
    drop((alice1, alice2, alice_ss, alice_bx, bob));
    gw.stop().await;
}

/// alice's subscriptions to the channel end, each told `unsubscribed` in
/// its dialect; nothing more is delivered to them; her other
/// subscriptions, and bob's, hold; the count says how many held it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribe_ends_that_subscription_of_the_user_and_only_it() {
    let redis = Redis::start().await;
    let gw = Gateway::start(config(&redis)).await;
    let mut alice1 = connect(&gw, "/ws", "alice").await;
    alice1.subscribe("news").await;
    alice1.psubscribe("news.*").await;
    let mut alice2 = connect(&gw, "/ws", "alice").await;
    alice2.subscribe("news").await;
    alice2.subscribe("marker").await;
    let mut alice3 = connect(&gw, "/ws", "alice").await;
    alice3.subscribe("marker").await;
    let mut alice_ss = connect(&gw, "/socketstream", "alice").await;
    alice_ss
        .send_text(r#"1|1|{"m":"wsgate.subscribe","p":["news"]}"#)
        .await;
    assert_eq!(alice_ss.recv_text().await, r#"1|1|{"p":[true]}"#);
    let mut bob = connect(&gw, "/ws", "bob").await;
    bob.subscribe("news").await;

    assert_eq!(
        order(&gw, "/unsubscribe", r#"{"user":"alice","channel":"news"}"#).await,
        (200, r#"{"unsubscribed":3}"#.to_owned()),
        "alice1, alice2 and the SocketStream client held it; alice3 did not"
    );
    let told =
        r#"{"action":"unsubscribed","channel":"news","reason":"unsubscribed by the server"}"#;
    assert_eq!(alice1.recv_text().await, told);
    assert_eq!(alice2.recv_text().await, told);
    assert_eq!(
        alice_ss.recv_text().await,
        r#"2|{"e":"wsgate:unsubscribed","p":["news","unsubscribed by the server"]}"#
    );
    // news reaches bob only; the markers come next for alice.
    redis.publish("news", b"2").await;
    redis.publish("news.x", b"3").await;
    redis.publish("marker", b"4").await;
    assert_eq!(
        bob.recv_text().await,
        r#"{"action":"message","channel":"news","payload":2}"#
    );
    assert_eq!(
        alice1.recv_text().await,
        r#"{"action":"message","pattern":"news.*","channel":"news.x","payload":3}"#
    );
    assert_eq!(
        alice2.recv_text().await,
        r#"{"action":"message","channel":"marker","payload":4}"#
    );
    assert_eq!(
        alice3.recv_text().await,
        r#"{"action":"message","channel":"marker","payload":4}"#
    );
    // The pattern, by name.
    assert_eq!(
        order(
            &gw,
            "/unsubscribe",
            r#"{"user":"alice","pattern":"news.*"}"#
        )
        .await,
        (200, r#"{"unsubscribed":1}"#.to_owned())
    );
    assert_eq!(
        alice1.recv_text().await,
        r#"{"action":"unsubscribed","pattern":"news.*","reason":"unsubscribed by the server"}"#
    );
    // Held by nobody any more.
    assert_eq!(
        order(&gw, "/unsubscribe", r#"{"user":"alice","channel":"news"}"#).await,
        (200, r#"{"unsubscribed":0}"#.to_owned())
    );
    // Every connection still open.
    for (c, who) in [
        (&mut alice1, "alice1"),
        (&mut alice2, "alice2"),
        (&mut bob, "bob"),
    ] {
        expect_alive(c, who).await;
    }
    drop((alice1, alice2, alice3, alice_ss, bob));
    gw.stop().await;
}

/// Two nodes: an order given to either acts on the user's connections on
/// both, and the counts are summed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_act_on_every_node_and_count_the_sum() {
    let redis = Redis::start().await;
    let mut ca = config(&redis);
    ca.node_id = "operator-a".into();
    let mut cb = config(&redis);
    cb.node_id = "operator-b".into();
    let a = Gateway::start(ca).await;
    let b = Gateway::start(cb).await;
    let mut alice_a = connect(&a, "/ws", "alice").await;
    alice_a.subscribe("news").await;
    let mut alice_b = connect(&b, "/ws", "alice").await;
    alice_b.subscribe("news").await;
    let mut alice_b2 = connect(&b, "/socketstream", "alice").await;
    alice_b2
        .send_text(r#"1|1|{"m":"wsgate.subscribe","p":["news"]}"#)
        .await;
    assert_eq!(alice_b2.recv_text().await, r#"1|1|{"p":[true]}"#);
    let mut bob_a = connect(&a, "/ws", "bob").await;
    bob_a.subscribe("news").await;
    let mut bob_b = connect(&b, "/ws", "bob").await;
    bob_b.subscribe("news").await;

    // Given to A, acted on B too.
    assert_eq!(
        order(&a, "/unsubscribe", r#"{"user":"alice","channel":"news"}"#).await,
        (200, r#"{"unsubscribed":3}"#.to_owned())
    );
    let told =
        r#"{"action":"unsubscribed","channel":"news","reason":"unsubscribed by the server"}"#;
    assert_eq!(alice_a.recv_text().await, told);
    assert_eq!(alice_b.recv_text().await, told);
    assert_eq!(
        alice_b2.recv_text().await,
        r#"2|{"e":"wsgate:unsubscribed","p":["news","unsubscribed by the server"]}"#
    );
    // Given to B, acted on A too.
    assert_eq!(
        order(&b, "/disconnect", r#"{"user":"alice"}"#).await,
        (200, r#"{"disconnected":3}"#.to_owned())
    );
    expect_disconnected(&mut alice_a, "alice on A").await;
    expect_disconnected(&mut alice_b, "alice on B").await;
    expect_disconnected(&mut alice_b2, "alice's SocketStream on B").await;
    // bob's hold on both nodes.
    redis.publish("news", b"5").await;
    for (c, who) in [(&mut bob_a, "bob on A"), (&mut bob_b, "bob on B")] {
        assert_eq!(
            c.recv_text().await,
            r#"{"action":"message","channel":"news","payload":5}"#,
            "{who}"
        );
    }
    drop((alice_a, alice_b, alice_b2, bob_a, bob_b));
    a.stop().await;
    b.stop().await;
}
