//! The operator API, behind the publish API key as `/publish` is:
//!
//! - `POST /disconnect {"user":".."}`: closes every connection of that user
//!   (the token's `sub`) on every node; answers `{"disconnected":N}`;
//! - `POST /unsubscribe {"user":"..","channel":".."}` (or `"pattern"`):
//!   ends that subscription on every connection of that user that holds it;
//!   answers `{"unsubscribed":N}`.
//!
//! N counts the connections that acted, summed over the nodes that answered
//! within the router's wait. A malformed body is 400 with the reason; an
//! order the broker cannot carry to the other nodes is 503.

use std::sync::Arc;

use bytes::Bytes;
use serde::Deserialize;
use tracing::info;
use warp::http::StatusCode;
use warp::{Filter, Rejection};

use super::{authorised_body, recover_on};
use crate::app::App;
use crate::broker::Topic;
use crate::rpc::NodeCommand;
use crate::transport::{json, json_error};

/// `POST /disconnect` and `POST /unsubscribe`.
pub(super) fn routes(
    app: Arc<App>,
) -> impl Filter<Extract = (warp::reply::Response,), Error = Rejection> + Clone {
    let route = |name: &'static str, app: Arc<App>| {
        warp::path(name).and(warp::path::end()).and(
            warp::post()
                .and(authorised_body(app.clone()))
                .then(move |app, body| order(app, name, body))
                .recover(recover_on("POST", app))
                .unify(),
        )
    };
    route("disconnect", app.clone())
        .or(route("unsubscribe", app))
        .unify()
}

/// `{"user":".."}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DisconnectBody {
    user: String,
}

/// `{"user":"..","channel":".."}` or `{"user":"..","pattern":".."}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UnsubscribeBody {
    user: String,
    channel: Option<String>,
    pattern: Option<String>,
}

/// Reads the body of `POST /<name>` into the order for every node.
fn command(max_pattern_bytes: usize, name: &str, body: &[u8]) -> Result<NodeCommand, String> {
    let usage = match name {
        "disconnect" => r#"expected {"user": string}"#,
        _ => r#"expected {"user": string, "channel" or "pattern": string}"#,
    };
    let invalid = |e: serde_json::Error| format!("invalid body: {e}: {usage}");
    let user_of = |user: String| {
        if user.is_empty() {
            Err(format!("\"user\" must not be empty: {usage}"))
        } else {
            Ok(user)
        }
    };
    if name == "disconnect" {
        let body: DisconnectBody = serde_json::from_slice(body).map_err(invalid)?;
        return Ok(NodeCommand::Disconnect {
            user: user_of(body.user)?,
        });
    }
    let body: UnsubscribeBody = serde_json::from_slice(body).map_err(invalid)?;
    let topic = match (body.channel, body.pattern) {
        (Some(c), None) => Topic::Channel(Bytes::from(c)),
        (None, Some(p)) => Topic::Pattern(Bytes::from(p)),
        _ => return Err(format!("give one of \"channel\" or \"pattern\": {usage}")),
    };
    crate::session::validate(&topic, max_pattern_bytes)?;
    Ok(NodeCommand::Unsubscribe {
        user: user_of(body.user)?,
        topic,
    })
}

/// Serves one order: read, sent to every node, answered with the count.
async fn order(app: Arc<App>, name: &'static str, body: Bytes) -> warp::reply::Response {
    let command = match command(app.config.max_pattern_bytes.get(), name, &body) {
        Ok(command) => command,
        Err(error) => return json_error(StatusCode::BAD_REQUEST, &error),
    };
    let field = match command {
        NodeCommand::Disconnect { .. } => "disconnected",
        NodeCommand::Unsubscribe { .. } => "unsubscribed",
    };
    let described = format!("{command:?}");
    match app.rpc.command(command).await {
        Ok(n) => {
            // An operator's act on users: worth a line in the log.
            info!(order = %described, connections = n, "operator order executed");
            json(StatusCode::OK, format!("{{\"{field}\":{n}}}"))
        }
        Err(e) => json_error(StatusCode::SERVICE_UNAVAILABLE, &e.message()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(name: &str, body: &str) -> Result<NodeCommand, String> {
        command(16, name, body.as_bytes())
    }

    #[test]
    fn bodies_are_orders() {
        assert_eq!(
            read("disconnect", r#"{"user":"alice"}"#),
            Ok(NodeCommand::Disconnect {
                user: "alice".into()
            })
        );
        assert_eq!(
            read("unsubscribe", r#"{"user":"alice","channel":"news"}"#),
            Ok(NodeCommand::Unsubscribe {
                user: "alice".into(),
                topic: Topic::Channel(Bytes::from_static(b"news")),
            })
        );
        assert_eq!(
            read("unsubscribe", r#"{"pattern":"news.*","user":"alice"}"#),
            Ok(NodeCommand::Unsubscribe {
                user: "alice".into(),
                topic: Topic::Pattern(Bytes::from_static(b"news.*")),
            })
        );
    }

    #[test]
    fn malformed_bodies_say_why() {
        let d = r#"expected {"user": string}"#;
        let u = r#"expected {"user": string, "channel" or "pattern": string}"#;
        for (name, body, want) in [
            ("disconnect", "", format!("invalid body: EOF while parsing a value at line 1 column 0: {d}")),
            ("disconnect", "{}", format!("invalid body: missing field `user` at line 1 column 2: {d}")),
            ("disconnect", r#"{"user":7}"#, format!("invalid body: invalid type: integer `7`, expected a string at line 1 column 9: {d}")),
            ("disconnect", r#"{"user":""}"#, format!("\"user\" must not be empty: {d}")),
            ("disconnect", r#"{"user":"a","channel":"x"}"#, format!("invalid body: unknown field `channel`, expected `user` at line 1 column 21: {d}")),
            ("unsubscribe", r#"{"user":"a"}"#, format!("give one of \"channel\" or \"pattern\": {u}")),
            ("unsubscribe", r#"{"user":"a","channel":"x","pattern":"y"}"#, format!("give one of \"channel\" or \"pattern\": {u}")),
            ("unsubscribe", r#"{"user":"","channel":"x"}"#, format!("\"user\" must not be empty: {u}")),
            ("unsubscribe", r#"{"user":"a","channel":""}"#, "invalid channel: empty".to_owned()),
            ("unsubscribe", r#"{"user":"a","pattern":"0123456789abcdefg"}"#, "pattern too long (17 bytes, max 16)".to_owned()),
            ("unsubscribe", r#"{"user":"a","channel":"a\nb"}"#, "invalid channel: control characters are not allowed".to_owned()),
        ] {
            assert_eq!(read(name, body), Err(want), "{name} {body}");
        }
    }
}
