// The npm `cometd` client with `cometd-nodejs-client` against a Bayeux
// endpoint, driven by the line protocol of harness.js. --transport picks the
// only transport left registered: websocket (CometD handshakes over it) or
// long-polling (which appends the message type to the URL, e.g.
// /bayeux/handshake, as CometD does by default).
//
// Events: as faye_client.js: handshake, connect, subscribed /
// subscribe_failed, ready, message {subscription, channel, data}, delivery,
// meta, ack, published, unsubscribed, disconnected, error; and called {ref,
// successful, data, error} for a remoteCall's answer (the `call` command).

import { adapt } from "cometd-nodejs-client";
import { CometD } from "cometd";
import { commands, emit, exit, guard, parseArgs, readiness } from "./harness.js";

const opts = parseArgs(process.argv.slice(2));
guard(opts.maxMs);

adapt();
const cometd = new CometD();
if (opts.transport === "long-polling") {
    cometd.unregisterTransport("websocket");
} else {
    cometd.unregisterTransport("long-polling");
    cometd.unregisterTransport("callback-polling");
}
cometd.configure({ url: opts.url, logLevel: "warn", maxNetworkDelay: 40000 });

let lastType = null;
cometd.registerExtension("wsgate-harness", {
    outgoing(message) {
        if (message.channel === "/meta/connect" && message.connectionType !== lastType) {
            lastType = message.connectionType;
            emit({ event: "connect", connectionType: lastType });
        }
        return message;
    },
    incoming(message) {
        const channel = message.channel || "";
        if (channel.startsWith("/meta/")) {
            emit({ event: "meta", message });
        } else if (message.data !== undefined) {
            emit({ event: "delivery", channel, data: message.data, message });
        } else {
            emit({ event: "ack", message });
        }
        return message;
    },
});

const subscriptions = new Map();
const ready = readiness(opts.subscribe);

function subscribe(channel) {
    const handle = cometd.subscribe(
        channel,
        (m) => emit({ event: "message", subscription: channel, channel: m.channel, data: m.data }),
        (reply) => {
            if (reply.successful) {
                emit({ event: "subscribed", subscription: channel });
            } else {
                emit({ event: "subscribe_failed", subscription: channel, error: reply.error });
                subscriptions.delete(channel);
            }
            ready(channel);
        },
    );
    subscriptions.set(channel, handle);
}

const handshakeProps = opts.token ? { ext: { token: opts.token } } : {};
cometd.handshake(handshakeProps, (reply) => {
    emit({
        event: "handshake",
        clientId: reply.clientId || null,
        successful: !!reply.successful,
        error: reply.error,
    });
    // CometD re-handshakes by itself after a 402; subscribe only once.
    if (reply.successful && subscriptions.size === 0) {
        for (const channel of opts.subscribe) subscribe(channel);
    }
});

let disconnecting = false;
function disconnect() {
    if (disconnecting) return;
    disconnecting = true;
    setTimeout(() => {
        emit({ event: "disconnected", ok: false, error: "no disconnect reply within 5000 ms" });
        exit(1);
    }, 5000).unref();
    cometd.disconnect((reply) => {
        emit({ event: "disconnected", ok: !!reply.successful, error: reply.error });
        exit(reply.successful ? 0 : 1);
    });
}

commands({
    publish: (cmd) =>
        cometd.publish(cmd.channel, cmd.data, (reply) =>
            emit({ event: "published", ref: cmd.ref, ok: !!reply.successful, error: reply.error }),
        ),
    call: (cmd) =>
        cometd.remoteCall(cmd.target, cmd.data, 15000, (reply) =>
            emit({
                event: "called",
                ref: cmd.ref,
                successful: !!reply.successful,
                data: reply.data,
                error: reply.error,
            }),
        ),
    subscribe,
    unsubscribe(channel) {
        const handle = subscriptions.get(channel);
        if (!handle) return false;
        subscriptions.delete(channel);
        cometd.unsubscribe(handle, (reply) =>
            emit({ event: "unsubscribed", subscription: channel, successful: !!reply.successful }),
        );
        return true;
    },
    disconnect,
});
