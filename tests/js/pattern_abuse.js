// Pattern-cost abuse (issue 10): N sockets each ask for M crafted patterns
// (`*{k}x{i}*z*` by default, `p{k}.{i}.*` with --plain, `a{k}x{i}*z*` with
// --prefixed), print how many
// were accepted and refused (by reason), then hold the sockets open for
// --hold-ms so that Redis's PUBLISH rate can be measured meanwhile.
// usage: node pattern_abuse.js ws://HOST:PORT/ws [--sockets 40] [--patterns 256] [--plain] [--hold-ms 20000]
import WebSocket from "ws";

const args = process.argv.slice(2);
const url = args[0];
const opt = (name, dflt) => {
    const i = args.indexOf(name);
    return i >= 0 ? Number(args[i + 1]) : dflt;
};
const sockets = opt("--sockets", 40), patterns = opt("--patterns", 256), holdMs = opt("--hold-ms", 20000);
const plain = args.includes("--plain");
const prefixed = args.includes("--prefixed");
let accepted = 0, answered = 0;
const refused = {};
const all = [];
for (let k = 0; k < sockets; k++) {
    const ws = new WebSocket(url);
    all.push(ws);
    ws.on("open", () => {
        for (let i = 0; i < patterns; i++) {
            const pattern = plain ? `p${k}.${i}.*` : prefixed ? `a${k}x${i}*z*` : `*${k}x${i}*z*`;
            ws.send(JSON.stringify({ action: "subscribe", pattern }));
        }
    });
    ws.on("message", (data) => {
        const m = JSON.parse(String(data));
        if (m.action !== "subscribe") return;
        answered++;
        if (m.status) accepted++;
        else refused[m.error] = (refused[m.error] || 0) + 1;
        if (answered === sockets * patterns) {
            console.log(JSON.stringify({ event: "subscribed", accepted, refused }));
            setTimeout(() => { all.forEach((w) => w.close()); process.exit(0); }, holdMs);
        }
    });
}
setTimeout(() => { console.log(JSON.stringify({ event: "timeout", answered, accepted })); process.exit(2); }, holdMs + 30000);
