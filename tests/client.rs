//! `wsgate::client` against a real gateway (embedded broker): subscribes,
//! receives deliveries as the raw frames the gateway sent, and after the node
//! stops (close 1001) comes back by itself to the node restarted on the same
//! address, resubscribes and receives the next publish. The cluster version,
//! through haproxy with kill -9 and a rolling restart, is tests/cluster.rs.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;

use std::time::Duration;

use common::{test_config, Gateway, WAIT};
use serde_json::json;
use tokio::sync::{mpsc, oneshot};
use wsgate::client::{self, ClientConfig, Ended, Event, Subscription};

async fn next(rx: &mut mpsc::Receiver<Event>) -> Event {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("no client event in time")
        .expect("client stopped")
}

#[tokio::test]
async fn client_reconnects_to_a_restarted_node_and_resubscribes() {
    let gw = Gateway::start(test_config(None)).await;
    let addr = gw.addr;
    let mut config = ClientConfig::new(
        format!("ws://{addr}/ws"),
        vec![
            Subscription::Pattern("news.*".into()),
            Subscription::Channel("alerts".into()),
        ],
    );
    config.backoff_max = Duration::from_millis(200);
    let (tx, mut rx) = mpsc::channel(64);
    let (stop, stopped) = oneshot::channel::<()>();
    let run = tokio::spawn(client::run(config, tx, async {
        let _ = stopped.await;
    }));

    assert_eq!(next(&mut rx).await, Event::Subscribed { connection: 1 });
    let (status, body) = gw
        .publish(json!({"channel":"news.sport","payload":{"score":3}}))
        .await;
    assert_eq!((status, body), (200, json!({"receivers":1})));
    assert_eq!(
        next(&mut rx).await,
        Event::Text(
            r#"{"action":"message","pattern":"news.*","channel":"news.sport","payload":{"score":3}}"#
                .into()
        )
    );

    // The node stops (1001) and comes back on the same address.
    gw.stop().await;
    assert_eq!(
        next(&mut rx).await,
        Event::Disconnected {
            connection: 1,
            reason: Ended::Closed {
                code: 1001,
                reason: "server shutting down".into()
            }
        }
    );
    let gw = Gateway::start(wsgate::Config {
        listen: addr,
        ..test_config(None)
    })
    .await;
    assert_eq!(next(&mut rx).await, Event::Subscribed { connection: 2 });
    let (status, _) = gw
        .publish(json!({"channel":"alerts","payload":"disk full"}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        next(&mut rx).await,
        Event::Text(r#"{"action":"message","channel":"alerts","payload":"disk full"}"#.into())
    );

    stop.send(()).unwrap();
    let stats = tokio::time::timeout(WAIT, run)
        .await
        .expect("client stops when told")
        .unwrap()
        .unwrap();
    assert_eq!((stats.connections, stats.reconnects), (2, 1));
    gw.stop().await;
}
