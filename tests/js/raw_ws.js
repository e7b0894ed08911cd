// A raw WebSocket client (npm `ws`) for dialects whose own client packages
// are not published (RoadRunner websockets v2) or not usable from Node
// (SocketStream 0.4's): the Rust test sends frames and reads what came.
//
// Arguments: --url ws://host:port/path [--max-ms N].
// stdout (one JSON object per line): {"event":"open"};
//   {"event":"message","text":"..."} for a text frame, or
//   {"event":"message","binary":"<base64>"} for a binary one;
//   {"event":"close","code":N,"reason":"..."}; {"event":"error","error":".."}.
// stdin: {"cmd":"send","text":".."} | {"cmd":"send","binary":"<base64>"} |
//   {"cmd":"close"}; end of input closes.

import WebSocket from "ws";
import { createInterface } from "node:readline";
import { emit, exit, guard } from "./harness.js";

const args = process.argv.slice(2);
let url = null;
let maxMs = 60000;
for (let i = 0; i < args.length; i++) {
    if (args[i] === "--url") url = args[++i];
    else if (args[i] === "--max-ms") maxMs = Number(args[++i]);
}
if (!url) {
    process.stderr.write("usage: node raw_ws.js --url ws://host:port/path [--max-ms N]\n");
    process.exit(64);
}
guard(maxMs);

const ws = new WebSocket(url);
ws.on("open", () => emit({ event: "open" }));
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
    if (cmd.cmd === "send" && cmd.text !== undefined) ws.send(cmd.text);
    else if (cmd.cmd === "send") ws.send(Buffer.from(cmd.binary, "base64"));
    else if (cmd.cmd === "close") ws.close(1000);
    else emit({ event: "error", error: `unknown command ${line}` });
});
lines.on("close", () => ws.close(1000));
