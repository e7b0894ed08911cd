// The npm `faye` client (Node) against a Bayeux endpoint, driven by the
// line protocol of harness.js. Faye always handshakes over HTTP
// (long-polling) and then, unless --transport long-polling disables it,
// switches to a WebSocket; the {"event":"connect"} lines say which
// connection type each /meta/connect used.
//
// Events: handshake {clientId, successful, error?}; connect {connectionType};
// subscribed / subscribe_failed {subscription, error?}; ready;
// message {subscription, channel, data} (one per matching subscription, as
// faye dispatches); delivery {channel, data, message} (one per message on
// the wire); meta {message} (every /meta reply as received); ack {message}
// (every publish acknowledgement as received); --since JSON puts
// ext.wsgate.since on every /meta/subscribe, --join-leave puts
// ext.wsgate.join_leave there (presence events); published {ref, ok, error?};
// unsubscribed {subscription, successful}; disconnected; error {error}.

import faye from "faye";
import { commands, emit, exit, guard, parseArgs, readiness } from "./harness.js";

const opts = parseArgs(process.argv.slice(2));
guard(opts.maxMs);

const client = new faye.Client(opts.url, { timeout: 30, retry: 1 });
if (opts.transport === "long-polling") client.disable("websocket");

let lastType = null;
client.addExtension({
    outgoing(message, callback) {
        if (message.channel === "/meta/handshake" && opts.token) {
            message.ext = Object.assign({}, message.ext, { token: opts.token });
        }
        // A resume position for history channels (docs/dialects/bayeux.md):
        // what an application's extension would write from the last
        // delivery's ext.wsgate.
        if (message.channel === "/meta/subscribe" && (opts.since || opts.joinLeave)) {
            const wsgate = {};
            if (opts.since) wsgate.since = opts.since;
            if (opts.joinLeave) wsgate.join_leave = true;
            message.ext = Object.assign({}, message.ext, { wsgate });
        }
        if (message.channel === "/meta/connect" && message.connectionType !== lastType) {
            lastType = message.connectionType;
            emit({ event: "connect", connectionType: lastType });
        }
        callback(message);
    },
    incoming(message, callback) {
        const channel = message.channel || "";
        if (channel.startsWith("/meta/")) {
            emit({ event: "meta", message });
            if (channel === "/meta/handshake") {
                emit({
                    event: "handshake",
                    clientId: message.clientId || null,
                    successful: !!message.successful,
                    error: message.error,
                });
            }
            if (channel === "/meta/unsubscribe") {
                emit({
                    event: "unsubscribed",
                    subscription: message.subscription,
                    successful: !!message.successful,
                });
            }
        } else if (message.data !== undefined) {
            emit({ event: "delivery", channel, data: message.data, message });
        } else {
            emit({ event: "ack", message });
        }
        callback(message);
    },
});

const subscriptions = new Map();
const ready = readiness(opts.subscribe);

function subscribe(channel) {
    const sub = client.subscribe(channel);
    sub.withChannel((ch, data) => emit({ event: "message", subscription: channel, channel: ch, data }));
    subscriptions.set(channel, sub);
    sub.then(
        () => {
            emit({ event: "subscribed", subscription: channel });
            ready(channel);
        },
        (error) => {
            emit({ event: "subscribe_failed", subscription: channel, error: String(error) });
            subscriptions.delete(channel);
            ready(channel);
        },
    );
}

for (const channel of opts.subscribe) subscribe(channel);

let disconnecting = false;
function disconnect() {
    if (disconnecting) return;
    disconnecting = true;
    const done = (ok, error) => {
        emit({ event: "disconnected", ok, error });
        exit(ok ? 0 : 1);
    };
    const promise = client.disconnect();
    if (!promise) return done(false, "client was not connected");
    setTimeout(() => done(false, "no disconnect reply within 5000 ms"), 5000).unref();
    promise.then(() => done(true), (error) => done(false, String(error)));
}

commands({
    publish: (cmd) =>
        client.publish(cmd.channel, cmd.data).then(
            () => emit({ event: "published", ref: cmd.ref, ok: true }),
            (error) => emit({ event: "published", ref: cmd.ref, ok: false, error: String(error) }),
        ),
    subscribe,
    unsubscribe(channel) {
        const sub = subscriptions.get(channel);
        if (!sub) return false;
        subscriptions.delete(channel);
        sub.cancel();
        return true;
    },
    disconnect,
});
