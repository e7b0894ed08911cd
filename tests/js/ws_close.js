// A real node `ws` client closes cleanly: connects to URL (the native
// WebSocket endpoint), subscribes to a channel, waits for the reply, closes
// with 1000 "bye", and prints the close event as one JSON line:
// {"event":"close","code":...,"reason":"...","wasClean":...}.
// Used by tests/core.rs; ends by itself within 10 s.
import WebSocket from "ws";

const url = process.argv[2];
if (!url) {
    console.log("usage: node ws_close.js ws://HOST:PORT/ws");
    process.exit(64);
}
const timer = setTimeout(() => {
    console.log(JSON.stringify({ event: "timeout" }));
    process.exit(2);
}, 10000);
const ws = new WebSocket(url);
ws.addEventListener("open", () => {
    ws.send(JSON.stringify({ action: "subscribe", channel: "x" }));
});
ws.addEventListener("message", (e) => {
    console.log(JSON.stringify({ event: "message", data: String(e.data) }));
    ws.close(1000, "bye");
});
ws.addEventListener("close", (e) => {
    console.log(JSON.stringify({ event: "close", code: e.code, reason: e.reason, wasClean: e.wasClean }));
    clearTimeout(timer);
    process.exit(0);
});
ws.addEventListener("error", (e) => {
    console.log(JSON.stringify({ event: "error", message: String(e.message) }));
});
