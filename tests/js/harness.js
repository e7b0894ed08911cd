// Shared plumbing of the interop client scripts (faye_client.js,
// cometd_client.js), which the Rust tests drive through tests/common/node.rs.
//
// The protocol, the same for every script:
// - arguments: --url URL --transport websocket|long-polling
//   [--subscribe CHANNEL]... (default: /foo/* and /foo/bar) [--token JWT]
//   [--max-ms N] (the script ends itself after N ms, default 60000)
//   [--join-leave] (faye: ext.wsgate.join_leave on every subscribe);
// - stdout: one JSON object per line, each with an "event" field;
// - stdin: one JSON command per line:
//     {"cmd":"publish","channel":"/foo/bar","data":<any>,"ref":"p1"}
//     {"cmd":"subscribe","channel":"/x"}
//     {"cmd":"unsubscribe","channel":"/foo/*"}
//     {"cmd":"call","target":"billing","data":<any>,"ref":"c1"}  (cometd's remoteCall)
//     {"cmd":"disconnect"}
//   End of input means disconnect.
// Nothing else is printed on stdout; the clients' own logs go to stderr.

import { createInterface } from "node:readline";

export const USAGE = `usage: node SCRIPT --url URL --transport websocket|long-polling
         [--subscribe CHANNEL]... [--token JWT] [--max-ms N] [--since JSON] [--join-leave]

Runs a real Bayeux client against URL (e.g. http://127.0.0.1:8080/bayeux):
handshakes, subscribes (default /foo/* and /foo/bar), prints
{"event":"ready"} once every subscribe was answered, then prints every event
as one JSON line and obeys JSON commands on stdin (publish, subscribe,
unsubscribe, disconnect; end of input = disconnect).`;

/** Parses argv (without node and the script); exits on --help or bad use. */
export function parseArgs(argv) {
    const opts = { url: null, transport: null, subscribe: [], token: null, maxMs: 60000, since: null, joinLeave: false };
    for (let i = 0; i < argv.length; i++) {
        const arg = argv[i];
        const value = () => {
            if (i + 1 >= argv.length) usage(`${arg} needs a value`);
            return argv[++i];
        };
        switch (arg) {
            case "--help":
            case "-h":
                process.stdout.write(USAGE + "\n");
                process.exit(0);
                break;
            case "--url": opts.url = value(); break;
            case "--transport": opts.transport = value(); break;
            case "--subscribe": opts.subscribe.push(value()); break;
            case "--token": opts.token = value(); break;
            case "--max-ms": opts.maxMs = Number(value()); break;
            case "--since": opts.since = JSON.parse(value()); break;
            case "--join-leave": opts.joinLeave = true; break;
            default: usage(`unknown argument ${arg}`);
        }
    }
    if (!opts.url) usage("--url is required");
    if (opts.transport !== "websocket" && opts.transport !== "long-polling") {
        usage("--transport must be websocket or long-polling");
    }
    if (!Number.isFinite(opts.maxMs) || opts.maxMs <= 0) usage("--max-ms must be a positive number");
    if (opts.subscribe.length === 0) opts.subscribe = ["/foo/*", "/foo/bar"];
    return opts;
}

function usage(problem) {
    process.stderr.write(`${problem}\n${USAGE}\n`);
    process.exit(64);
}

/** Prints one event line. */
export function emit(event) {
    process.stdout.write(JSON.stringify(event) + "\n");
}

/** Ends the process with `code` once stdout is flushed. */
export function exit(code) {
    process.stdout.write("", () => process.exit(code));
}

/**
 * Makes the script end by itself after `maxMs` whatever happens, and turns
 * any uncaught error into an error event and exit status 1.
 */
export function guard(maxMs) {
    setTimeout(() => {
        emit({ event: "error", error: `gave up after ${maxMs} ms` });
        exit(2);
    }, maxMs).unref();
    const fail = (e) => {
        emit({ event: "error", error: String((e && e.stack) || e) });
        exit(1);
    };
    process.on("uncaughtException", fail);
    process.on("unhandledRejection", fail);
}

/**
 * Obeys each stdin command line with the script's client: `publish(cmd)`,
 * `subscribe(channel)`, `unsubscribe(channel)` (false when the channel is
 * not subscribed: reported as an error event) and `disconnect()`, which end
 * of input calls too.
 */
export function commands(client) {
    const handle = (cmd) => {
        switch (cmd.cmd) {
            case "publish":
                client.publish(cmd);
                break;
            case "subscribe":
                client.subscribe(cmd.channel);
                break;
            case "unsubscribe":
                if (!client.unsubscribe(cmd.channel)) {
                    emit({ event: "error", error: `not subscribed to ${cmd.channel}` });
                }
                break;
            case "call":
                if (!client.call) {
                    emit({ event: "error", error: "this client has no remote calls" });
                } else {
                    client.call(cmd);
                }
                break;
            case "disconnect":
            case "eof":
                client.disconnect();
                break;
            default:
                emit({ event: "error", error: `unknown command ${JSON.stringify(cmd)}` });
        }
    };
    const lines = createInterface({ input: process.stdin });
    lines.on("line", (line) => {
        if (!line.trim()) return;
        let cmd;
        try {
            cmd = JSON.parse(line);
        } catch (e) {
            emit({ event: "error", error: `bad command line: ${line}` });
            return;
        }
        handle(cmd);
    });
    lines.on("close", () => handle({ cmd: "eof" }));
}

/** Tracks the initial subscriptions and prints {"event":"ready"} once all were answered. */
export function readiness(channels) {
    const pending = new Set(channels);
    let done = false;
    return (channel) => {
        pending.delete(channel);
        if (!done && pending.size === 0) {
            done = true;
            emit({ event: "ready" });
        }
    };
}
