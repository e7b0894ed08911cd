//! The mount table's one rule: no two endpoints on one path.
//!
//! Routes are tried in a fixed order, so two endpoints configured on the
//! same path would leave one of them unreachable without a word; an operator
//! moving a RoadRunner application over sets `WSGATE_ROADRUNNER_PATH=/ws`
//! and must move `WSGATE_WS_PATH` too. Start-up stops instead, naming both
//! variables.

use super::{Config, ConfigError};

/// The suffixes a Bayeux endpoint also answers on (as CometD appends them).
const BAYEUX_SUFFIXES: &[&str] = &[
    "/",
    "/handshake",
    "/connect",
    "/subscribe",
    "/unsubscribe",
    "/disconnect",
];

/// Every path a node with `config` serves, each with the variable (or the
/// built-in route) that mounts it. Engineers adding an endpoint add its
/// paths here.
pub fn mounted(config: &Config) -> Vec<(&'static str, String)> {
    let mut paths = vec![("WSGATE_WS_PATH", config.ws_path.clone())];
    for (var, base) in [
        ("WSGATE_BAYEUX_PATH", &config.bayeux_path),
        ("WSGATE_NODEFONY_PATH", &config.nodefony_path),
    ] {
        paths.push((var, base.clone()));
        for suffix in BAYEUX_SUFFIXES {
            paths.push((var, format!("{base}{suffix}")));
        }
    }
    // RoadRunner and SocketStream.
    paths.push(("WSGATE_ROADRUNNER_PATH", config.roadrunner_path.clone()));
    paths.push((
        "WSGATE_ROADRUNNER_PUBLISH_PATH",
        config.roadrunner_publish_path.clone(),
    ));
    paths.push((
        "WSGATE_ROADRUNNER_PUBLISH_PATH",
        format!("{}-async", config.roadrunner_publish_path),
    ));
    paths.push(("WSGATE_SOCKETSTREAM_PATH", config.socketstream_path.clone()));
    // Server-sent events.
    paths.push(("WSGATE_SSE_PATH", config.sse_path.clone()));
    // realizehit over Engine.IO.
    paths.push(("WSGATE_REALIZEHIT_PATH", config.realizehit_path.clone()));
    paths.push((
        "WSGATE_REALIZEHIT_PUBLISH_PATH",
        config.realizehit_publish_path.clone(),
    ));
    // Services.
    paths.push(("WSGATE_SERVICES_PATH", config.services_path.clone()));
    // Built in.
    for path in [
        "/publish",
        "/disconnect",
        "/unsubscribe",
        "/healthz",
        "/readyz",
        "/metrics",
    ] {
        paths.push(("the built-in route", path.to_owned()));
    }
    paths
}

/// Refuses a configuration in which two endpoints share a path.
pub fn check(config: &Config) -> Result<(), ConfigError> {
    let paths = mounted(config);
    for (i, (first, path)) in paths.iter().enumerate() {
        let clash = paths[i + 1..]
            .iter()
            .find(|(second, other)| other == path && second != first);
        if let Some((second, _)) = clash {
            return Err(ConfigError::SamePath {
                first,
                second,
                path: path.clone(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_vars(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    fn refusal(pairs: &[(&str, &str)]) -> String {
        match vars(pairs) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{pairs:?} was accepted"),
        }
    }

    #[test]
    fn the_defaults_share_no_path() {
        let c = vars(&[]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.roadrunner_path, "/roadrunner");
        assert_eq!(c.roadrunner_publish_path, "/roadrunner/publish");
        assert_eq!(c.socketstream_path, "/socketstream");
        assert!(c.socketstream_channels.is_empty());
    }

    #[test]
    fn two_endpoints_on_one_path_are_refused_naming_both() {
        assert_eq!(
            refusal(&[("WSGATE_ROADRUNNER_PATH", "/ws")]),
            "WSGATE_WS_PATH and WSGATE_ROADRUNNER_PATH both mount /ws: give each endpoint its own path"
        );
        assert_eq!(
            refusal(&[("WSGATE_SOCKETSTREAM_PATH", "/bayeux/connect")]),
            "WSGATE_BAYEUX_PATH and WSGATE_SOCKETSTREAM_PATH both mount /bayeux/connect: give each endpoint its own path"
        );
        assert_eq!(
            refusal(&[("WSGATE_ROADRUNNER_PUBLISH_PATH", "/publish")]),
            "WSGATE_ROADRUNNER_PUBLISH_PATH and the built-in route both mount /publish: give each endpoint its own path"
        );
        assert_eq!(
            refusal(&[
                ("WSGATE_ROADRUNNER_PUBLISH_PATH", "/rr"),
                ("WSGATE_SOCKETSTREAM_PATH", "/rr-async"),
            ]),
            "WSGATE_ROADRUNNER_PUBLISH_PATH and WSGATE_SOCKETSTREAM_PATH both mount /rr-async: give each endpoint its own path"
        );
        assert_eq!(
            refusal(&[("WSGATE_SSE_PATH", "/disconnect")]),
            "WSGATE_SSE_PATH and the built-in route both mount /disconnect: give each endpoint its own path"
        );
        assert_eq!(
            refusal(&[("WSGATE_NODEFONY_PATH", "/metrics")]),
            "WSGATE_NODEFONY_PATH and the built-in route both mount /metrics: give each endpoint its own path"
        );
        assert_eq!(
            refusal(&[("WSGATE_REALIZEHIT_PATH", "/bayeux/")]),
            "WSGATE_BAYEUX_PATH and WSGATE_REALIZEHIT_PATH both mount /bayeux/: give each endpoint its own path"
        );
        assert_eq!(
            refusal(&[("WSGATE_REALIZEHIT_PUBLISH_PATH", "/ws/")]),
            "WSGATE_REALIZEHIT_PATH and WSGATE_REALIZEHIT_PUBLISH_PATH both mount /ws/: give each endpoint its own path"
        );
        assert_eq!(
            refusal(&[("WSGATE_BAYEUX_PATH", "/x"), ("WSGATE_NODEFONY_PATH", "/x")]),
            "WSGATE_BAYEUX_PATH and WSGATE_NODEFONY_PATH both mount /x: give each endpoint its own path"
        );
    }

    #[test]
    fn moving_both_paths_is_accepted() {
        let c = vars(&[
            ("WSGATE_ROADRUNNER_PATH", "/ws"),
            ("WSGATE_WS_PATH", "/native"),
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.roadrunner_path, "/ws");
        assert_eq!(c.ws_path, "/native");
    }
}
