//! Security end to end: JWT on connect, per-token ACLs attacked with every
//! trick we know, expiry and refresh, the server-wide allow list, the publish
//! API key, origins, and per-address limits through trusted proxies.
//!
//! The ACL suite runs over a real gateway and a private redis-server: every
//! subscription the gateway accepts is really `PSUBSCRIBE`d, then channels
//! inside and outside the token's ACL are published to with Redis `PUBLISH`,
//! followed by a marker. Everything received before the marker is compared
//! with what Redis's own semantics predict, and every delivered channel must
//! be matched by an ACL entry. "Not delivered" is always proven by the
//! marker, never by timed silence; every wait is bounded.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::num::NonZeroUsize;
use std::time::Duration;

use base64::Engine as _;
use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use wsgate::auth::JwtKey;
use wsgate::Config;

const SECRET: &str = "wsgate-test-secret-0123456789abcdef";
const AUDIENCE: &str = "wsgate";
const ISSUER: &str = "https://idp.example";

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn encode(header: &Header, claims: &Value, key: &EncodingKey) -> String {
    jsonwebtoken::encode(header, claims, key).unwrap()
}

/// HS256 with the gateway's secret.
fn hs256(claims: &Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
}

/// HS256 over an arbitrary payload text (JSON serde would never produce).
fn hs256_raw(payload: &str) -> String {
    let message = format!(
        "{}.{}",
        b64(br#"{"alg":"HS256","typ":"JWT"}"#),
        b64(payload.as_bytes())
    );
    let key = EncodingKey::from_secret(SECRET.as_bytes());
    let sig = jsonwebtoken::crypto::sign(message.as_bytes(), &key, Algorithm::HS256).unwrap();
    format!("{message}.{sig}")
}

/// Claims valid for an hour, with audience and issuer, for `sub`.
fn claims(sub: &str, acl: &[&str]) -> Value {
    json!({"sub": sub, "exp": now() + 3600, "aud": AUDIENCE, "iss": ISSUER, "subscribe": acl})
}

fn token(sub: &str, acl: &[&str]) -> String {
    hs256(&claims(sub, acl))
}

/// A config with JWT auth (HS256, audience and issuer checked).
fn jwt_config(redis_url: Option<String>) -> Config {
    Config {
        jwt_key: Some(JwtKey::secret(SECRET).unwrap()),
        jwt_audiences: vec![AUDIENCE.into()],
        jwt_issuers: vec![ISSUER.into()],
        ..test_config(redis_url)
    }
}

async fn connect_with(gw: &Gateway, token: &str) -> Client {
    let bearer = format!("Bearer {token}");
    Client::try_connect(gw.addr, "/ws", &[("authorization", &bearer)])
        .await
        .unwrap_or_else(|r| panic!("upgrade refused: {r:?}"))
}

/// The value of one metric line (`name{labels} value`), 0 if absent.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

fn refused_series(reason: &str) -> String {
    format!("wsgate_refused_total{{reason=\"{reason}\"}} ")
}

// ---------------------------------------------------------------- ACL suite

/// What a subscribe attempt must get.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// Confirmed.
    Allowed,
    /// Refused with exactly this error.
    Denied(&'static str),
    /// Refused with an error starting with this.
    DeniedLike(&'static str),
}

use Expect::{Allowed, Denied, DeniedLike};

/// One token and the subscriptions thrown at it.
struct Scenario {
    acl: &'static [&'static str],
    attempts: Vec<(&'static str, String, Expect)>,
}

fn p(name: &str, expect: Expect) -> (&'static str, String, Expect) {
    ("pattern", name.to_owned(), expect)
}

fn c(name: &str, expect: Expect) -> (&'static str, String, Expect) {
    ("channel", name.to_owned(), expect)
}

const NOT_ALLOWED: Expect = Denied("not allowed");

/// Channels published to in every scenario: inside some ACLs, outside
/// others, many of them look-alikes of allowed names.
fn probe_channels() -> Vec<String> {
    [
        "news.sport",
        "news.sport.x",
        "news.sport ",
        "news.a",
        "news.",
        "news",
        "newsX",
        "news-a",
        "NEWS.a",
        "nеws.a",  // Cyrillic е
        "news．a", // full-width dot
        "news\\.x",
        "news*",
        "news.[x]",
        "secret",
        "secret.news.a",
        "a.news.a",
        "user.7",
        "user.77",
        "user.x",
        "x.public",
        "x.public.y",
        "admin",
        "*",
        "?",
        "\u{0}",
        "a\u{7f}",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn scenarios() -> Vec<Scenario> {
    let overlong = format!("news.{}*", "a".repeat(300));
    vec![
        Scenario {
            acl: &["news.*"],
            attempts: vec![
                p("*", NOT_ALLOWED),
                p("**", NOT_ALLOWED),
                p("?", NOT_ALLOWED),
                p("?*", NOT_ALLOWED),
                p("[a-z]*", NOT_ALLOWED),
                p("[^x]ews.*", NOT_ALLOWED),
                p("[n]ews.*", NOT_ALLOWED),
                p("n?ws.*", NOT_ALLOWED),
                p("news*", NOT_ALLOWED),
                p("news?*", NOT_ALLOWED),
                p("news[.]*", NOT_ALLOWED),
                p("news\\.*", NOT_ALLOWED),
                p("news\\*", NOT_ALLOWED),
                p("*news.*", NOT_ALLOWED),
                p("*.*", NOT_ALLOWED),
                p("nеws.*", NOT_ALLOWED),
                p("news．*", NOT_ALLOWED),
                p("NEWS.*", NOT_ALLOWED),
                p("news", NOT_ALLOWED),
                p("", Denied("invalid pattern: empty")),
                p(
                    "news.\u{1}*",
                    Denied("invalid pattern: control characters are not allowed"),
                ),
                p(
                    "news.\u{0}",
                    Denied("invalid pattern: control characters are not allowed"),
                ),
                p(&overlong, DeniedLike("pattern too long")),
                c("", Denied("invalid channel: empty")),
                c("secret", NOT_ALLOWED),
                c("news", NOT_ALLOWED),
                c("*", NOT_ALLOWED),
                c("nеws.a", NOT_ALLOWED),
                // Inside: these may be held, and must still deliver only inside.
                p("news.*", Allowed),
                p("news.[!-~]*", Allowed),
                p("news.sport.*", Allowed),
                p("news.?", Allowed),
                p("news.\\*", Allowed),
                p("news.", Allowed),
                c("news.sport", Allowed),
                c("news.", Allowed),
                c("news.*", Allowed),
            ],
        },
        Scenario {
            acl: &["news.sport"],
            attempts: vec![
                p("news.*", NOT_ALLOWED),
                p("news.sport*", NOT_ALLOWED),
                p("news.spor?", NOT_ALLOWED),
                p("news.spor[t]", NOT_ALLOWED),
                p("news.sport\\", NOT_ALLOWED),
                p("*", NOT_ALLOWED),
                c("news.sport ", NOT_ALLOWED),
                c("news.sports", NOT_ALLOWED),
                c("news.a", NOT_ALLOWED),
                p("news.sport", Allowed),
                c("news.sport", Allowed),
            ],
        },
        Scenario {
            // A token without the claim may subscribe to nothing.
            acl: &[],
            attempts: vec![
                p("*", NOT_ALLOWED),
                p("news.*", NOT_ALLOWED),
                c("news.sport", NOT_ALLOWED),
                c("marker", NOT_ALLOWED),
            ],
        },
        Scenario {
            acl: &["user.[0-9]", "*.public"],
            attempts: vec![
                p("user.[0-9]*", NOT_ALLOWED),
                p("user.*", NOT_ALLOWED),
                p("user.?", NOT_ALLOWED),
                p("user.[0-9][0-9]", NOT_ALLOWED),
                p("a*.public", NOT_ALLOWED),
                p("*.public*", NOT_ALLOWED),
                p("*", NOT_ALLOWED),
                c("user.77", NOT_ALLOWED),
                p("user.[0-9]", Allowed),
                p("*.public", Allowed),
                c("user.7", Allowed),
                c("x.public", Allowed),
                p("x.public", Allowed),
            ],
        },
        Scenario {
            // A `\` entry is a pattern like any other; `news\*` means the
            // literal channel `news*`, and grants no prefix.
            acl: &["news\\*"],
            attempts: vec![
                p("news\\*", Allowed),
                c("news*", Allowed),
                p("news*", NOT_ALLOWED),
                p("news\\**", NOT_ALLOWED),
                c("news.a", NOT_ALLOWED),
            ],
        },
    ]
}

/// Does the ACL (as Redis globs) cover `channel`? The independent oracle:
/// Redis semantics of each entry, nothing of the gateway's rule.
fn acl_covers(acl: &[&str], channel: &str) -> bool {
    acl.iter()
        .any(|e| wsgate::pattern::matches(e.as_bytes(), channel.as_bytes()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_attacks_never_deliver_outside_the_acl() {
    let redis = Redis::start().await;
    let gw = Gateway::start(jwt_config(Some(redis.url()))).await;
    let probes = probe_channels();
    for (n, scenario) in scenarios().into_iter().enumerate() {
        wait_until("previous scenario's patterns gone", WAIT, || async {
            redis.numpat().await == 0
        })
        .await;
        let mut acl: Vec<&str> = scenario.acl.to_vec();
        let with_marker = !acl.is_empty();
        if with_marker {
            acl.push("marker");
        }
        let mut c = claims(&format!("user{n}"), &acl);
        if acl.is_empty() {
            // No claim at all, not an empty one.
            c.as_object_mut().unwrap().remove("subscribe");
        }
        let mut client = connect_with(&gw, &hs256(&c)).await;
        if with_marker {
            client.subscribe("marker").await;
        }
        let mut held: Vec<(&str, String)> = Vec::new();
        for (kind, name, expect) in &scenario.attempts {
            let reply = client
                .request(json!({"action":"subscribe", *kind: name}))
                .await;
            let what = format!("scenario {n} {:?}: {kind} {name:?}", scenario.acl);
            match expect {
                Allowed => {
                    assert_eq!(
                        reply,
                        json!({"action":"subscribe", *kind: name, "status": true}),
                        "{what}"
                    );
                    held.push((kind, name.clone()));
                }
                Denied(error) => assert_eq!(
                    reply,
                    json!({"action":"subscribe", *kind: name, "status": false, "error": error}),
                    "{what}"
                ),
                DeniedLike(prefix) => {
                    assert_eq!(reply["status"], json!(false), "{what}");
                    let error = reply["error"].as_str().unwrap_or_default();
                    assert!(error.starts_with(prefix), "{what}: {reply}");
                }
            }
        }
        // The node holds exactly the accepted patterns: nothing refused
        // leaked. Redis holds what they coalesce to (each costly pattern as
        // its literal prefix's cover; see src/broker/redis/cover.rs).
        let accepted: Vec<&str> = held
            .iter()
            .filter(|(k, _)| *k == "pattern")
            .map(|(_, name)| name.as_str())
            .collect();
        assert_eq!(
            metric_value(gw.addr, "wsgate_broker_subscriptions{kind=\"pattern\"}").await,
            Some(accepted.len() as f64),
            "scenario {n}: patterns held by the node"
        );
        let in_redis: std::collections::BTreeSet<Vec<u8>> = accepted
            .iter()
            .map(|p| {
                if wsgate::pattern_cost::is_cheap(p.as_bytes()) {
                    p.as_bytes().to_vec()
                } else {
                    [wsgate::pattern_cost::literal_prefix(p.as_bytes()), b"*"].concat()
                }
            })
            .collect();
        assert_eq!(
            redis.numpat().await,
            in_redis.len() as i64,
            "scenario {n}: PUBSUB NUMPAT"
        );
        if !with_marker {
            continue;
        }
        for (i, channel) in probes.iter().enumerate() {
            redis.publish(channel, i.to_string().as_bytes()).await;
        }
        redis.publish("marker", b"\"end\"").await;
        let mut got = Vec::new();
        loop {
            let frame = client.recv().await;
            assert_eq!(frame["action"], "message", "scenario {n}: {frame}");
            let channel = frame["channel"].as_str().unwrap().to_owned();
            if channel == "marker" && frame.get("pattern").is_none() {
                break;
            }
            assert!(
                acl_covers(&acl, &channel),
                "scenario {n}: delivery from {channel:?}, outside the ACL {acl:?}: {frame}"
            );
            let topic = match frame.get("pattern") {
                Some(p) => ("pattern", p.as_str().unwrap().to_owned()),
                None => ("channel", channel.clone()),
            };
            got.push((topic, channel));
        }
        // And exactly what Redis semantics predict for what is held.
        let mut want = Vec::new();
        for channel in &probes {
            for (kind, name) in &held {
                let hit = match *kind {
                    "pattern" => wsgate::pattern::matches(name.as_bytes(), channel.as_bytes()),
                    _ => name == channel,
                };
                if hit {
                    want.push(((*kind, name.clone()), channel.clone()));
                }
            }
        }
        got.sort();
        want.sort();
        assert_eq!(got, want, "scenario {n}: deliveries");
        assert!(
            !got.is_empty(),
            "scenario {n}: nothing was delivered at all"
        );
    }
    let metrics = gw.metrics().await;
    assert!(metric(&metrics, &refused_series("not_allowed")) >= 40.0);
}

/// One client's wide subscription never leaks to a narrow client on the
/// same node (the hub shares the Redis subscription, not the deliveries).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wide_token_does_not_widen_another_client() {
    let redis = Redis::start().await;
    let gw = Gateway::start(jwt_config(Some(redis.url()))).await;
    let mut wide = connect_with(&gw, &token("admin", &["*"])).await;
    let mut narrow = connect_with(&gw, &token("reader", &["news.sport"])).await;
    wide.psubscribe("*").await;
    narrow.subscribe("news.sport").await;
    let reply = narrow
        .request(json!({"action":"subscribe","pattern":"*"}))
        .await;
    assert_eq!(reply["error"], "not allowed");
    redis.publish("secret", b"1").await;
    redis.publish("news.sport", b"2").await;
    let first = narrow.recv().await;
    assert_eq!(
        first,
        json!({"action":"message","channel":"news.sport","payload":2})
    );
    assert_eq!(wide.recv().await["channel"], "secret");
    assert_eq!(wide.recv().await["channel"], "news.sport");
}

/// The ACL sees exactly the name the subscription is made with: JSON escapes
/// are decoded first, and a key given twice resolves once, for both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_level_tricks_are_decoded_before_the_acl() {
    let redis = Redis::start().await;
    let gw = Gateway::start(jwt_config(Some(redis.url()))).await;
    let mut client = connect_with(&gw, &token("u", &["news.*"])).await;
    for (raw, reply) in [
        (
            r#"{"action":"subscribe","pattern":"\u002a"}"#,
            json!({"action":"subscribe","pattern":"*","status":false,"error":"not allowed"}),
        ),
        (
            r#"{"action":"subscribe","pattern":"news.sport","pattern":"*"}"#,
            json!({"action":"subscribe","pattern":"*","status":false,"error":"not allowed"}),
        ),
        (
            r#"{"action":"subscribe","pattern":"news\u002e*"}"#,
            json!({"action":"subscribe","pattern":"news.*","status":true}),
        ),
        (
            r#"{"action":"subscribe","channel":"news.a","pattern":"*"}"#,
            json!({"action":"error","error":"give either \"pattern\" or \"channel\", not both"}),
        ),
        (
            r#"{"action":"subscribe","pattern":["*"]}"#,
            json!({"action":"error","error":"\"pattern\" must be a string"}),
        ),
    ] {
        client.send_text(raw).await;
        assert_eq!(client.recv().await, reply, "{raw}");
    }
    assert_eq!(redis.numpat().await, 1);
}

// ---------------------------------------------------------------- tokens

/// A refused upgrade: what, path, headers, expected `error`.
type BadToken = (
    &'static str,
    String,
    Vec<(&'static str, String)>,
    &'static str,
);

/// Every way a token can be wrong is refused before the upgrade, with 401,
/// a short reason, and the RFC 6750 challenge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_refused_before_the_upgrade() {
    let gw = Gateway::start(jwt_config(None)).await;
    let exp = now() + 3600;
    let good = token("u", &["a"]);
    let other_key = encode(
        &Header::new(Algorithm::HS256),
        &claims("u", &["a"]),
        &EncodingKey::from_secret(b"another-secret-0123456789abcdef-x"),
    );
    let alg_none = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(claims("u", &["*"]).to_string().as_bytes())
    );
    let alg_none_upper = format!(
        "{}.{}.",
        b64(br#"{"alg":"NONE","typ":"JWT"}"#),
        b64(claims("u", &["*"]).to_string().as_bytes())
    );
    // Widening attack: the signature of a narrow token on a wider payload.
    let parts: Vec<&str> = good.split('.').collect();
    let widened = format!(
        "{}.{}.{}",
        parts[0],
        b64(claims("u", &["*"]).to_string().as_bytes()),
        parts[2]
    );
    let stripped = format!("{}.{}.", parts[0], parts[1]);
    let hs512 = encode(
        &Header::new(Algorithm::HS512),
        &claims("u", &["a"]),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    );
    let mut crit = Header::new(Algorithm::HS256);
    crit.crit = Some(vec!["exp".into()]);
    let crit = encode(
        &crit,
        &claims("u", &["a"]),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    );
    let full = |extra: Value| {
        let mut c = claims("u", &["a"]);
        for (k, v) in extra.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        hs256(&c)
    };
    let duplicate = hs256_raw(&format!(
        r#"{{"sub":"u","exp":{exp},"aud":"{AUDIENCE}","iss":"{ISSUER}","subscribe":["a"],"subscribe":["*"]}}"#
    ));
    let duplicate_sub = hs256_raw(&format!(
        r#"{{"sub":"u","sub":"admin","exp":{exp},"aud":"{AUDIENCE}","iss":"{ISSUER}"}}"#
    ));
    let bearer = |t: &str| format!("Bearer {t}");
    let overlong = format!(
        "{}.{}.{}",
        "a".repeat(20_000),
        "b".repeat(20_000),
        "c".repeat(20_000)
    );
    let cases: Vec<BadToken> = vec![
        ("no token", "/ws".into(), vec![], "missing token"),
        (
            "empty query token",
            "/ws?token=".into(),
            vec![],
            "missing token",
        ),
        (
            "not a JWT",
            "/ws".into(),
            vec![("authorization", bearer("garbage"))],
            "invalid token: malformed",
        ),
        (
            "overlong",
            "/ws".into(),
            vec![("authorization", bearer(&overlong))],
            "invalid token: malformed",
        ),
        (
            "alg none",
            "/ws".into(),
            vec![("authorization", bearer(&alg_none))],
            "invalid token: malformed",
        ),
        (
            "alg NONE",
            "/ws".into(),
            vec![("authorization", bearer(&alg_none_upper))],
            "invalid token: malformed",
        ),
        (
            "signature stripped",
            "/ws".into(),
            vec![("authorization", bearer(&stripped))],
            "invalid token: bad signature",
        ),
        (
            "other key",
            "/ws".into(),
            vec![("authorization", bearer(&other_key))],
            "invalid token: bad signature",
        ),
        (
            "payload widened",
            "/ws".into(),
            vec![("authorization", bearer(&widened))],
            "invalid token: bad signature",
        ),
        (
            "HS512",
            "/ws".into(),
            vec![("authorization", bearer(&hs512))],
            "invalid token: algorithm not accepted",
        ),
        (
            "crit header",
            "/ws".into(),
            vec![("authorization", bearer(&crit))],
            "invalid token: unsupported critical header",
        ),
        (
            "expired",
            "/ws".into(),
            vec![("authorization", bearer(&full(json!({"exp": now() - 10}))))],
            "token expired",
        ),
        (
            "exp missing",
            "/ws".into(),
            vec![("authorization", bearer(&full(json!({"exp": null}))))],
            "invalid token: missing or invalid claim exp",
        ),
        (
            "exp a string",
            "/ws".into(),
            vec![("authorization", bearer(&full(json!({"exp": "tomorrow"}))))],
            "invalid token: missing or invalid claim exp",
        ),
        (
            "not yet valid",
            "/ws".into(),
            vec![("authorization", bearer(&full(json!({"nbf": now() + 600}))))],
            "token not yet valid",
        ),
        (
            "wrong audience",
            "/ws".into(),
            vec![("authorization", bearer(&full(json!({"aud": "other"}))))],
            "invalid token: wrong audience",
        ),
        (
            "no audience",
            "/ws".into(),
            vec![("authorization", bearer(&full(json!({"aud": null}))))],
            "invalid token: wrong audience",
        ),
        (
            "wrong issuer",
            "/ws".into(),
            vec![(
                "authorization",
                bearer(&full(json!({"iss": "https://evil.example"}))),
            )],
            "invalid token: wrong issuer",
        ),
        (
            "no issuer",
            "/ws".into(),
            vec![("authorization", bearer(&full(json!({"iss": null}))))],
            "invalid token: wrong issuer",
        ),
        (
            "no subject",
            "/ws".into(),
            vec![("authorization", bearer(&full(json!({"sub": null}))))],
            "invalid token: missing or invalid claim sub",
        ),
        (
            "subscribe not a list",
            "/ws".into(),
            vec![("authorization", bearer(&full(json!({"subscribe": "*"}))))],
            "invalid token: missing or invalid claim subscribe",
        ),
        (
            "subscribe with a non-string",
            "/ws".into(),
            vec![(
                "authorization",
                bearer(&full(json!({"subscribe": ["a", ["*"]]}))),
            )],
            "invalid token: missing or invalid claim subscribe",
        ),
        (
            "duplicate subscribe claim",
            "/ws".into(),
            vec![("authorization", bearer(&duplicate))],
            "invalid token: duplicate claim",
        ),
        (
            "duplicate sub claim",
            "/ws".into(),
            vec![("authorization", bearer(&duplicate_sub))],
            "invalid token: duplicate claim",
        ),
        (
            "header and query",
            format!("/ws?token={good}"),
            vec![("authorization", bearer(&good))],
            "token given more than once",
        ),
        (
            "query twice",
            format!("/ws?token={good}&token={good}"),
            vec![],
            "token given more than once",
        ),
        (
            "Basic scheme",
            "/ws".into(),
            vec![("authorization", format!("Basic {good}"))],
            "Authorization header must be: Bearer <token>",
        ),
        (
            "two Authorization headers",
            "/ws".into(),
            vec![
                ("authorization", bearer(&good)),
                ("authorization", bearer(&good)),
            ],
            "token given more than once",
        ),
    ];
    for (what, path, headers, error) in &cases {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let refused = Client::try_connect(gw.addr, path, &headers)
            .await
            .err()
            .unwrap_or_else(|| panic!("{what}: upgrade accepted"));
        assert_eq!(refused.status, 401, "{what}: {refused:?}");
        assert_eq!(refused.error(), *error, "{what}");
        let challenge = refused
            .headers
            .get("www-authenticate")
            .unwrap()
            .to_str()
            .unwrap();
        assert!(challenge.starts_with("Bearer"), "{what}: {challenge}");
    }
    let metrics = gw.metrics().await;
    assert_eq!(
        metric(&metrics, &refused_series("unauthorized")),
        cases.len() as f64
    );
    assert_eq!(metric(&metrics, "wsgate_connections "), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_may_come_from_the_header_or_the_query() {
    let gw = Gateway::start(jwt_config(None)).await;
    let t = token("u", &["a"]);
    let mut by_header = connect_with(&gw, &t).await;
    by_header.subscribe("a").await;
    let mut by_query = Client::try_connect(gw.addr, &format!("/ws?v=1&token={t}"), &[])
        .await
        .unwrap();
    by_query.subscribe("a").await;
    // Percent-encoded, as a browser's URLSearchParams may produce.
    let encoded = t.replace('.', "%2E");
    let mut by_encoded = Client::try_connect(gw.addr, &format!("/ws?token={encoded}"), &[])
        .await
        .unwrap();
    by_encoded.subscribe("a").await;
    let reply = by_query
        .request(json!({"action":"subscribe","channel":"b"}))
        .await;
    assert_eq!(reply["error"], "not allowed");
}

fn key_file(name: &str) -> String {
    format!("{}/tests/keys/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_keys_accept_only_their_own_algorithm() {
    let rsa_private = std::fs::read(key_file("rsa_private.pem")).unwrap();
    let ec_private = std::fs::read(key_file("ec_private.pem")).unwrap();
    let rsa_public = std::fs::read(key_file("rsa_public.pem")).unwrap();
    let claims = claims("u", &["a"]);
    let rs256 = encode(
        &Header::new(Algorithm::RS256),
        &claims,
        &EncodingKey::from_rsa_pem(&rsa_private).unwrap(),
    );
    let es256 = encode(
        &Header::new(Algorithm::ES256),
        &claims,
        &EncodingKey::from_ec_pem(&ec_private).unwrap(),
    );
    // The attacker's own key, announced in the header (jwk, jku, kid): the
    // gateway uses only its configured key.
    let attacker =
        EncodingKey::from_ec_pem(&std::fs::read(key_file("ec_attacker_private.pem")).unwrap())
            .unwrap();
    let mut header = Header::new(Algorithm::ES256);
    header.jwk =
        Some(jsonwebtoken::jwk::Jwk::from_encoding_key(&attacker, Algorithm::ES256).unwrap());
    header.jku = Some("https://evil.example/jwks.json".into());
    header.kid = Some("attacker".into());
    let self_signed = encode(&header, &claims, &attacker);
    // Algorithm confusion: HS256 "signed" with the public key as secret.
    let confused = encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(&rsa_public),
    );
    // The key is read from a file path, as an operator would configure it.
    for (file, accepted, refused) in [
        ("rsa_public.pem", &rs256, [&es256, &confused]),
        ("ec_public.pem", &es256, [&rs256, &confused]),
    ] {
        let config = Config::from_vars([
            ("WSGATE_JWT_PUBLIC_KEY".to_owned(), key_file(file)),
            ("WSGATE_JWT_AUDIENCE".to_owned(), AUDIENCE.to_owned()),
        ])
        .unwrap();
        let gw = Gateway::start(Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            ..config
        })
        .await;
        let mut ok = connect_with(&gw, accepted).await;
        ok.subscribe("a").await;
        for t in refused {
            let bearer = format!("Bearer {t}");
            let r = Client::try_connect(gw.addr, "/ws", &[("authorization", &bearer)])
                .await
                .err()
                .unwrap_or_else(|| panic!("{file}: accepted a foreign token"));
            assert_eq!(r.status, 401);
            assert_eq!(r.error(), "invalid token: algorithm not accepted", "{file}");
        }
        if file == "ec_public.pem" {
            let bearer = format!("Bearer {self_signed}");
            let r = Client::try_connect(gw.addr, "/ws", &[("authorization", &bearer)])
                .await
                .err()
                .expect("accepted a token signed with the key in its own header");
            assert_eq!(r.error(), "invalid token: bad signature");
        }
    }
}

/// The socket is closed with 4001 when the token expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_closes_the_socket_with_4001() {
    let gw = Gateway::start(jwt_config(None)).await;
    let mut c = claims("u", &["a"]);
    c["exp"] = json!(now() + 2);
    let mut client = connect_with(&gw, &hs256(&c)).await;
    client.subscribe("a").await;
    let frame = client.expect_close().await.expect("a close frame");
    assert_eq!(u16::from(frame.code), 4001);
    assert_eq!(frame.reason, "token expired");
    let metrics = gw.metrics().await;
    assert_eq!(metric(&metrics, &refused_series("token_expired")), 1.0);
}

/// `refresh` extends the connection past the old `exp`; the new token's ACL
/// replaces the old one, ending what it no longer allows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_extends_the_connection_and_narrows_the_acl() {
    let gw = Gateway::start(jwt_config(None)).await;
    let old_exp = now() + 3;
    let mut c = claims("u", &["news.*", "alerts"]);
    c["exp"] = json!(old_exp);
    let mut client = connect_with(&gw, &hs256(&c)).await;
    client.psubscribe("news.*").await;
    client.subscribe("alerts").await;

    // Refusals keep the connection and the old token.
    let refusals = [
        (
            token("someone-else", &["*"]),
            "token is for another subject",
        ),
        ("garbage".to_owned(), "invalid token: malformed"),
        (
            hs256(&json!({"sub":"u","exp":now() - 5,"aud":AUDIENCE,"iss":ISSUER})),
            "token expired",
        ),
    ];
    for (t, error) in refusals {
        let reply = client
            .request(json!({"action":"refresh","token":t,"id":"r0"}))
            .await;
        assert_eq!(
            reply,
            json!({"action":"refresh","id":"r0","status":false,"error":error})
        );
    }

    let reply = client
        .request(json!({"action":"refresh","token":token("u", &["news.*"]),"id":"r1"}))
        .await;
    assert_eq!(reply, json!({"action":"refresh","id":"r1","status":true}));
    assert_eq!(
        client.recv().await,
        json!({"action":"unsubscribed","channel":"alerts","reason":"not allowed"})
    );
    let reply = client
        .request(json!({"action":"subscribe","channel":"alerts"}))
        .await;
    assert_eq!(reply["error"], "not allowed");

    // Past the old expiry (the property under test is time passing), the
    // connection is still served: a ping is answered, not a 4001 close.
    let past = std::time::UNIX_EPOCH + Duration::from_secs(old_exp + 1);
    if let Ok(left) = past.duration_since(std::time::SystemTime::now()) {
        tokio::time::sleep(left).await;
    }
    let pong = client.request(json!({"action":"ping","id":"p"})).await;
    assert_eq!(pong, json!({"action":"pong","id":"p"}));
    // And "alerts" no longer delivers; "news.*" still does (marker).
    gw.publish(json!({"channel":"alerts","payload":1})).await;
    gw.publish(json!({"channel":"news.a","payload":2})).await;
    assert_eq!(
        client.recv().await,
        json!({"action":"message","pattern":"news.*","channel":"news.a","payload":2})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_without_authentication_is_refused() {
    let gw = Gateway::start(test_config(None)).await;
    let mut client = gw.client().await;
    let reply = client
        .request(json!({"action":"refresh","token":"x"}))
        .await;
    assert_eq!(
        reply,
        json!({"action":"refresh","status":false,"error":"authentication is not enabled"})
    );
}

// ---------------------------------------------------------------- allow list

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_allow_list_applies_with_and_without_tokens() {
    let allow = Some(vec!["news.*".to_owned(), "alerts".to_owned()]);
    let open = Gateway::start(Config {
        allow: allow.clone(),
        ..test_config(None)
    })
    .await;
    let mut anon = open.client().await;
    for (kind, name, ok) in [
        ("pattern", "*", false),
        ("pattern", "news*", false),
        ("channel", "secret", false),
        ("pattern", "news.*", true),
        ("pattern", "news.sport.*", true),
        ("channel", "news.a", true),
        ("channel", "alerts", true),
    ] {
        let reply = anon
            .request(json!({"action":"subscribe", kind: name}))
            .await;
        assert_eq!(reply["status"], json!(ok), "{kind} {name}: {reply}");
    }
    open.publish(json!({"channel":"secret","payload":0})).await;
    open.publish(json!({"channel":"alerts","payload":1})).await;
    assert_eq!(anon.recv().await["channel"], "alerts");

    // With tokens, both lists must allow.
    let both = Gateway::start(Config {
        allow,
        ..jwt_config(None)
    })
    .await;
    let mut client = connect_with(&both, &token("u", &["*"])).await;
    let reply = client
        .request(json!({"action":"subscribe","pattern":"*"}))
        .await;
    assert_eq!(reply["error"], "not allowed");
    client.psubscribe("news.*").await;
}

// ---------------------------------------------------------------- publish API

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_publish_api_needs_the_key() {
    let key = "publish-key-0123456789";
    let gw = Gateway::start(Config {
        api_key: Config::from_vars([("WSGATE_API_KEY".to_owned(), key.to_owned())])
            .unwrap()
            .api_key,
        ..test_config(None)
    })
    .await;
    let body = r#"{"channel":"a","payload":1}"#;
    let right = format!("Bearer {key}");
    let longer = format!("Bearer {key}x");
    let shorter = format!("Bearer {}", &key[..key.len() - 1]);
    let basic = format!("Basic {key}");
    for (headers, status) in [
        (vec![], 401),
        (vec![("authorization", "Bearer wrong-key-0123456789")], 401),
        (vec![("authorization", longer.as_str())], 401),
        (vec![("authorization", shorter.as_str())], 401),
        (vec![("authorization", basic.as_str())], 401),
        (vec![("authorization", key)], 401),
        (
            vec![
                ("authorization", right.as_str()),
                ("authorization", right.as_str()),
            ],
            401,
        ),
        (vec![("authorization", right.as_str())], 200),
    ] {
        let (got, text) = http_with(gw.addr, "POST", "/publish", &headers, Some(body)).await;
        assert_eq!(got, status, "{headers:?}: {text}");
        if status == 401 {
            let v: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(
                v["error"],
                "a valid API key is required: Authorization: Bearer <key>"
            );
        }
    }
    // Refused before the body is read: announce a large body, send none,
    // and the 401 still comes (not a 413, and no wait for the body).
    let answer = async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        let head = "POST /publish HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n";
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut buf = vec![0; 1024];
        let n = stream.read(&mut buf).await.unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let answer = tokio::time::timeout(WAIT, answer).await.expect("no answer");
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    let metrics = gw.metrics().await;
    assert_eq!(metric(&metrics, &refused_series("api_key")), 8.0);
    // Other routes are not affected.
    assert_eq!(http(gw.addr, "GET", "/healthz", None).await.0, 200);
}

// ---------------------------------------------------------------- origins

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origins_are_checked_before_the_upgrade() {
    let origins = Some(vec!["https://app.example".to_owned()]);
    let gw = Gateway::start(Config {
        allowed_origins: origins.clone(),
        ..test_config(None)
    })
    .await;
    for (headers, ok) in [
        (vec![("origin", "https://app.example")], true),
        (vec![("origin", "https://APP.example")], true),
        (vec![], true),
        (vec![("origin", "https://evil.example")], false),
        (vec![("origin", "https://app.example.evil.example")], false),
        (vec![("origin", "http://app.example")], false),
        (vec![("origin", "null")], false),
        (
            vec![
                ("origin", "https://app.example"),
                ("origin", "https://evil.example"),
            ],
            false,
        ),
    ] {
        match Client::try_connect(gw.addr, "/ws", &headers).await {
            Ok(_) => assert!(ok, "{headers:?} accepted"),
            Err(r) => {
                assert!(!ok, "{headers:?} refused: {r:?}");
                assert_eq!(r.status, 403);
                assert_eq!(r.error(), "origin not allowed");
            }
        }
    }
    let strict = Gateway::start(Config {
        allowed_origins: origins,
        require_origin: true,
        ..test_config(None)
    })
    .await;
    let r = Client::try_connect(strict.addr, "/ws", &[])
        .await
        .err()
        .unwrap();
    assert_eq!(r.status, 403);
    assert!(
        Client::try_connect(strict.addr, "/ws", &[("origin", "https://app.example")])
            .await
            .is_ok()
    );
    // The origin is checked before the token: no token verification for
    // foreign pages.
    let jwt = Gateway::start(Config {
        allowed_origins: Some(vec!["https://app.example".to_owned()]),
        ..jwt_config(None)
    })
    .await;
    let r = Client::try_connect(jwt.addr, "/ws", &[("origin", "https://evil.example")])
        .await
        .err()
        .unwrap();
    assert_eq!(r.status, 403);
}

// ---------------------------------------------------------------- per-address limits

fn nz(n: usize) -> Option<NonZeroUsize> {
    NonZeroUsize::new(n)
}

async fn connect_from(gw: &Gateway, xff: &str) -> Result<Client, Refused> {
    let headers: Vec<(&str, &str)> = if xff.is_empty() {
        vec![]
    } else {
        vec![("x-forwarded-for", xff)]
    };
    Client::try_connect(gw.addr, "/ws", &headers).await
}

fn assert_429(r: Result<Client, Refused>, error: &str) {
    let r = r.err().expect("expected a 429");
    assert_eq!(r.status, 429, "{r:?}");
    assert_eq!(r.error(), error);
    assert_eq!(r.headers.get("retry-after").unwrap(), "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_address_are_limited_and_released() {
    let gw = Gateway::start(Config {
        max_connections_per_ip: nz(2),
        ..test_config(None)
    })
    .await;
    let a = connect_from(&gw, "").await.unwrap();
    let _b = connect_from(&gw, "").await.unwrap();
    assert_429(
        connect_from(&gw, "").await,
        "too many connections from your address",
    );
    // Without a trusted proxy, X-Forwarded-For is the client's own claim.
    assert_429(
        connect_from(&gw, "203.0.113.1").await,
        "too many connections from your address",
    );
    drop(a);
    let addr = gw.addr;
    wait_until("a place is free again", WAIT, || async move {
        Client::try_connect(addr, "/ws", &[]).await.is_ok()
    })
    .await;
    // /metrics is a connection from the same address too (not-yet-upgraded
    // connections count toward the limit): ask once a place is free.
    let series = refused_series("ip_connections");
    let series = series.trim_end();
    wait_until("the refusals counted", WAIT, || async move {
        metric_value(addr, series).await.is_some_and(|n| n >= 2.0)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_addresses_count_only_behind_trusted_proxies() {
    let gw = Gateway::start(Config {
        max_connections_per_ip: nz(1),
        trusted_proxies: vec![wsgate::forwarded::Network::parse("127.0.0.1").unwrap()],
        ..test_config(None)
    })
    .await;
    let _one = connect_from(&gw, "198.51.100.1").await.unwrap();
    let _two = connect_from(&gw, "198.51.100.2").await.unwrap();
    let _proxy_itself = connect_from(&gw, "").await.unwrap();
    let full = "too many connections from your address";
    assert_429(connect_from(&gw, "198.51.100.1").await, full);
    // Forged entries to the left of what our proxy appended do not count.
    assert_429(connect_from(&gw, "192.0.2.66, 198.51.100.1").await, full);
    // Trusted hops on the right are skipped.
    assert_429(connect_from(&gw, "198.51.100.1, 127.0.0.1").await, full);
    assert_429(connect_from(&gw, "").await, full);
    let _three = connect_from(&gw, "198.51.100.1, 198.51.100.3")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_connections_per_second_are_limited_per_address() {
    let gw = Gateway::start(Config {
        new_connections_per_ip_per_sec: nz(1),
        trusted_proxies: vec![wsgate::forwarded::Network::parse("127.0.0.0/8").unwrap()],
        jwt_key: Some(JwtKey::secret(SECRET).unwrap()),
        ..test_config(None)
    })
    .await;
    let slow = "too many new connections from your address: slow down";
    // Failed attempts spend the budget too: a token guesser is throttled.
    let r = connect_from(&gw, "198.51.100.1").await.err().unwrap();
    assert_eq!(r.status, 401);
    assert_429(connect_from(&gw, "198.51.100.1").await, slow);
    // Another address has its own bucket.
    let r = connect_from(&gw, "198.51.100.2").await.err().unwrap();
    assert_eq!(r.status, 401);
    let metrics = gw.metrics().await;
    assert_eq!(metric(&metrics, &refused_series("ip_rate")), 1.0);
}
