// A real EventSource client (npm `eventsource` 3, the WHATWG EventSource for
// node) against wsgate's server-sent events endpoint, driven by
// tests/sse.rs through tests/common/node.rs.
//
// - arguments: --url URL [--bearer TOKEN] (sent as Authorization: Bearer,
//   through the client's fetch hook) [--max-ms N] (default 60000);
// - stdout: one JSON object per line:
//     {"event":"open","opens":N}                 each (re)connection
//     {"event":"message","data":"<text>","id":"<lastEventId>"} an unnamed
//                                                event (a delivery)
//     {"event":"named","type":T,"data":"<text>"} subscribe, interrupted,
//                                                resumed, close
//     {"event":"es_error","readyState":N,"status":S} EventSource's error
//       event (a dropped stream it will retry: readyState 0; a refusal it
//       gives up on: readyState 2, with the HTTP status when it has one)
// - stdin: {"cmd":"disconnect"}, or end of input: close and exit.

import { EventSource } from "eventsource";
import { createInterface } from "node:readline";

const opts = { url: null, bearer: null, maxMs: 60000 };
const argv = process.argv.slice(2);
for (let i = 0; i < argv.length; i++) {
    const value = () => argv[++i];
    switch (argv[i]) {
        case "--url": opts.url = value(); break;
        case "--bearer": opts.bearer = value(); break;
        case "--max-ms": opts.maxMs = Number(value()); break;
        default:
            process.stderr.write(`unknown argument ${argv[i]}\n`);
            process.exit(2);
    }
}
if (!opts.url) {
    process.stderr.write("usage: node sse_client.js --url URL [--bearer TOKEN] [--max-ms N]\n");
    process.exit(2);
}

const emit = (o) => process.stdout.write(JSON.stringify(o) + "\n");
const init = {};
if (opts.bearer) {
    init.fetch = (input, fetchInit) =>
        fetch(input, {
            ...fetchInit,
            headers: { ...fetchInit.headers, Authorization: `Bearer ${opts.bearer}` },
        });
}
const es = new EventSource(opts.url, init);
let opens = 0;
es.onopen = () => emit({ event: "open", opens: ++opens });
es.onmessage = (e) => emit({ event: "message", data: e.data, id: e.lastEventId });
for (const type of ["subscribe", "interrupted", "resumed", "close"]) {
    es.addEventListener(type, (e) => emit({ event: "named", type, data: e.data }));
}
es.onerror = (e) => emit({ event: "es_error", readyState: es.readyState, status: e.code ?? null });

const end = () => {
    es.close();
    process.exit(0);
};
setTimeout(end, opts.maxMs).unref();
const rl = createInterface({ input: process.stdin });
rl.on("line", (line) => {
    try {
        if (JSON.parse(line).cmd === "disconnect") end();
    } catch {
        // not a command
    }
});
rl.on("close", end);
