// An npm `ws` client that offers permessage-deflate (RFC 7692) and
// compresses every message it sends (threshold 0), for tests/compression.rs.
//
// Arguments: --url ws://host:port/path [--deflate on|off] [--max-ms N].
// stdout (one JSON object per line):
//   {"event":"open","extensions":"<the 101's Sec-WebSocket-Extensions>"|null};
//   {"event":"message","text":"..."}; {"event":"close","code":N,"reason":".."};
//   {"event":"error","error":".."}.
// stdin: {"cmd":"send","text":".."} | {"cmd":"close"}; end of input closes.

import WebSocket from "ws";
import { createInterface } from "node:readline";
import { emit, exit, guard } from "./harness.js";

const args = process.argv.slice(2);
let url = null;
let deflate = true;
let maxMs = 60000;
for (let i = 0; i < args.length; i++) {
    if (args[i] === "--url") url = args[++i];
    else if (args[i] === "--deflate") deflate = args[++i] === "on";
    else if (args[i] === "--max-ms") maxMs = Number(args[++i]);
}
if (!url) {
    process.stderr.write("usage: node deflate_ws.js --url URL [--deflate on|off] [--max-ms N]\n");
    process.exit(64);
}
guard(maxMs);

const ws = new WebSocket(url, { perMessageDeflate: deflate ? { threshold: 0 } : false });
let extensions = null;
ws.on("upgrade", (res) => {
    extensions = res.headers["sec-websocket-extensions"] ?? null;
});
ws.on("open", () => emit({ event: "open", extensions }));
ws.on("message", (data, isBinary) => {
    if (isBinary) emit({ event: "message", binary: Buffer.from(data).toString("base64") });
    else emit({ event: "message", text: data.toString("utf8") });
});
ws.on("close", (code, reason) => {
    emit({ event: "close", code, reason: reason.toString() });
    exit(0);
});
ws.on("error", (e) => emit({ event: "error", error: String(e) }));

const lines = createInterface({ input: process.stdin });
lines.on("line", (line) => {
    if (!line.trim()) return;
    const cmd = JSON.parse(line);
    if (cmd.cmd === "send") ws.send(cmd.text);
    else if (cmd.cmd === "close") ws.close(1000);
    else emit({ event: "error", error: `unknown command ${line}` });
});
lines.on("close", () => ws.close(1000));
