// A SocketStream 0.4 client built the way Prism's client is: one
// `realtime-service-client` per service, frames over a raw WebSocket
// (npm `ws`), `connect` and `discover` on the system service, and the
// handlers the server hands out evaluated as Prism's client evaluates them.
//
// Arguments: --url ws://host:port/path [--subscribe NAME]... [--max-ms N].
// stdout (JSON lines): {"event":"connected","sessionId":".."};
//   {"event":"discovered","services":[{id,name,use}]};
//   {"event":"subscribed","name":..,"args":[..]} (the rpc callback's args);
//   {"event":"pubsub","name":"<event>","args":[..]} for every event the
//   pubsub handler emits for a subscribed name and for wsgate:* notices;
//   {"event":"system_error","message":..}; {"event":"ready"} once every
//   --subscribe was answered; {"event":"error","error":..}.
// stdin: {"cmd":"rpc","method":"..","params":[..],"ref":".."} -> {"event":"rpc","ref":..,"args":[..]};
//   end of input closes.
// An rpc error reaches no callback: the handed-out handler logs it with
// console.error (as SocketStream's rpc client did), printed here as
// {"event":"console_error","message":".."}.

import WebSocket from "ws";
import { createRequire } from "node:module";
import { createInterface } from "node:readline";
import { emit, exit, guard } from "./harness.js";

const require = createRequire(import.meta.url);
const ServiceClient = require("realtime-service-client");

const args = process.argv.slice(2);
let url = null;
let maxMs = 60000;
const names = [];
for (let i = 0; i < args.length; i++) {
    if (args[i] === "--url") url = args[++i];
    else if (args[i] === "--subscribe") names.push(args[++i]);
    else if (args[i] === "--max-ms") maxMs = Number(args[++i]);
}
if (!url) {
    process.stderr.write("usage: node socketstream_client.js --url URL [--subscribe NAME]...\n");
    process.exit(64);
}
guard(maxMs);

console.error = (...a) => emit({ event: "console_error", message: a.map(String).join(" ") });

const ws = new WebSocket(url);
// What realtime-service-client calls `services`: the connection it writes to.
const app = { connection: { write: (msg) => ws.send(msg) } };
const services = {};
const api = {};

function provide(params, handler) {
    const client = new ServiceClient(app, params);
    services[params.id] = client;
    api[params.name] = handler(client);
}

provide({ id: 0, name: "_system", use: { json: true, callbacks: true } }, (client) => {
    client.onmessage = (obj) => {
        if (obj && obj.type === "error") emit({ event: "system_error", message: obj.message });
    };
    return {
        connect: (cb) => client.send({ c: "connect", v: "0.0.1", sessionId: false }, cb),
        discover: (cb) => client.send({ c: "discover", p: {} }, cb),
    };
});

ws.on("message", (data) => {
    const text = data.toString("utf8");
    const parts = text.split("|");
    const service = services[parts.shift()];
    if (!service) return emit({ event: "error", error: `no service for ${text}` });
    service.read(parts);
});
ws.on("close", () => exit(0));
ws.on("error", (e) => emit({ event: "error", error: String(e) }));

ws.on("open", () => {
    api._system.connect((info) => {
        emit({ event: "connected", sessionId: info.sessionId, version: info.version });
        api._system.discover((list) => {
            for (const service of list) {
                let handler;
                eval("handler = " + service.handler);
                provide(service.params, handler);
            }
            emit({ event: "discovered", services: list.map((s) => s.params) });
            for (const n of ["wsgate:interrupted", "wsgate:resumed"]) {
                api.pubsub.on(n, (...a) => emit({ event: "pubsub", name: n, args: a }));
            }
            let pending = names.length;
            if (pending === 0) emit({ event: "ready" });
            for (const name of names) {
                api.pubsub.on(name, (...a) => emit({ event: "pubsub", name, args: a }));
                api.rpc("wsgate.subscribe", name, (...a) => {
                    emit({ event: "subscribed", name, args: a });
                    if (--pending === 0) emit({ event: "ready" });
                });
            }
        });
    });
});

const lines = createInterface({ input: process.stdin });
lines.on("line", (line) => {
    if (!line.trim()) return;
    const cmd = JSON.parse(line);
    if (cmd.cmd === "rpc") {
        api.rpc(cmd.method, ...(cmd.params || []), (...a) => emit({ event: "rpc", ref: cmd.ref, args: a }));
    } else if (cmd.cmd === "on") {
        api.pubsub.on(cmd.name, (...a) => emit({ event: "pubsub", name: cmd.name, args: a }));
    } else emit({ event: "error", error: `unknown command ${line}` });
});
lines.on("close", () => ws.close(1000));
