// A realizehit client against wsgate's Engine.IO endpoint, driven by the
// Rust tests (tests/realizehit.rs) through tests/common/node.rs: the real
// `engine.io-client` 1.8 (protocol 3), as realizehit's client-ws.js uses
// it (`new Socket(uri, {path: '/ws'})`), `realizehit-pattern-to-id` for the
// subscription ids and `realizehit-publisher` to publish straight to Redis.
//
// Arguments: --url http://HOST:PORT --path /ws
//   [--transport polling|websocket] (websocket: transports ['websocket'])
//   [--no-upgrade] [--redis URL] [--max-ms N]
// Events (stdout, one JSON line each):
//   open {sid, transport}; upgrade {transport}; message {data} (every
//   message as received); reply {message} (a message that is JSON);
//   delivery {id, payload, known} (a `<id>?<payload>` message; known: the id
//   is one pattern2id gave for a pattern this script acted on); id {pat, id};
//   published {ref}; close {reason}; error {error}.
// Commands (stdin, one JSON line each):
//   {"cmd":"send","text":".."}               a raw message
//   {"cmd":"act","id":..,"act":"sub","pat":{..}}  a request (JSON)
//   {"cmd":"id","pat":{..}}                  prints pattern2id(pat)
//   {"cmd":"publish","pat":{..},"payload":..,"ref":"p1"}  realizehit-publisher
//   {"cmd":"close"}                          closes the socket
// End of input closes the socket and ends the script.

import { createInterface } from "node:readline";
import eio from "engine.io-client";
import pattern2id from "realizehit-pattern-to-id";
import Publisher from "realizehit-publisher";
import { emit, exit, guard } from "./harness.js";

const opts = { url: null, path: "/ws", transport: "polling", upgrade: true, redis: null, maxMs: 60000 };
const argv = process.argv.slice(2);
for (let i = 0; i < argv.length; i++) {
    const value = () => argv[++i];
    switch (argv[i]) {
        case "--url": opts.url = value(); break;
        case "--path": opts.path = value(); break;
        case "--transport": opts.transport = value(); break;
        case "--no-upgrade": opts.upgrade = false; break;
        case "--redis": opts.redis = value(); break;
        case "--max-ms": opts.maxMs = Number(value()); break;
        default:
            process.stderr.write(`unknown argument ${argv[i]}\n`);
            process.exit(64);
    }
}
guard(opts.maxMs);

const known = new Set();
const socketOpts = { path: opts.path, upgrade: opts.upgrade };
if (opts.transport === "websocket") socketOpts.transports = ["websocket"];
const socket = new eio.Socket(opts.url, socketOpts);
let publisher = null;

socket.on("open", () => emit({ event: "open", sid: socket.id, transport: socket.transport.name }));
socket.on("upgrade", (t) => emit({ event: "upgrade", transport: t.name }));
socket.on("message", (data) => {
    emit({ event: "message", data });
    const m = /^([a-zA-Z0-9]*)\?/.exec(data);
    if (m) {
        const id = m[1];
        let payload;
        try {
            payload = JSON.parse(data.slice(id.length + 1));
        } catch (e) {
            payload = { unparsable: data.slice(id.length + 1) };
        }
        emit({ event: "delivery", id, payload, known: known.has(id) });
        return;
    }
    try {
        emit({ event: "reply", message: JSON.parse(data) });
    } catch (e) {
        // Not JSON: the message event says it all.
    }
});
socket.on("close", (reason) => {
    emit({ event: "close", reason });
    exit(0);
});
socket.on("error", (e) => emit({ event: "transport_error", error: String(e && e.message || e) }));

const handle = (cmd) => {
    switch (cmd.cmd) {
        case "send":
            socket.send(cmd.text);
            break;
        case "act": {
            const { cmd: _, ...req } = cmd;
            if (req.pat && typeof req.pat === "object") {
                try {
                    const id = pattern2id(req.pat);
                    if (id) known.add(id);
                } catch (e) {
                    // An invalid pattern: the server is to say why.
                }
            }
            socket.send(JSON.stringify(req));
            break;
        }
        case "id":
            emit({ event: "id", pat: cmd.pat, id: pattern2id(cmd.pat) });
            break;
        case "publish":
            if (!publisher) publisher = new Publisher({ redis: opts.redis });
            publisher.publish(cmd.pat, cmd.payload).then(
                () => emit({ event: "published", ref: cmd.ref }),
                (e) => emit({ event: "error", error: `publish: ${e}` }),
            );
            break;
        case "close":
        case "eof":
            if (publisher) publisher.redis.disconnect();
            socket.close();
            break;
        default:
            emit({ event: "error", error: `unknown command ${JSON.stringify(cmd)}` });
    }
};
const lines = createInterface({ input: process.stdin });
lines.on("line", (line) => {
    if (!line.trim()) return;
    try {
        handle(JSON.parse(line));
    } catch (e) {
        emit({ event: "error", error: `bad command line: ${line}: ${e}` });
    }
});
lines.on("close", () => handle({ cmd: "eof" }));
