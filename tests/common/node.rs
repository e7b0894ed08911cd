//! The real npm Bayeux clients (faye, cometd) as child processes, for the
//! interop tests.
//!
//! The clients and their exact versions are pinned in `tests/js/package.json`
//! and `package-lock.json`. On first use in a process, [`tools`] finds `node`
//! and `npm` on `PATH` and runs `npm ci --prefer-offline --no-audit --no-fund`
//! in `tests/js` unless `node_modules` already holds exactly that lock file's
//! install (a stamp written after a successful install), so it runs once per
//! checkout and works offline after that. A lock file serialises installs
//! between test processes running at once; a `OnceLock` does so between the
//! tests of one process.
//!
//! A script ([`Script`]) speaks JSON lines (see `tests/js/harness.js`): one
//! event object per stdout line, one command object per stdin line. Every
//! wait is bounded, and the child is killed when the `Script` is dropped.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

use super::WAIT;

/// The oldest Node.js the pinned clients run on (cometd-nodejs-client 2).
pub const MIN_NODE_MAJOR: u32 = 18;

/// Longest `npm ci` may take (a cold cache on a slow machine).
const INSTALL_TIMEOUT: Duration = Duration::from_secs(300);

/// Written into `node_modules` after a successful install: the `package.json`
/// and `package-lock.json` it installed, byte for byte.
const STAMP: &str = ".wsgate-installed";

/// Most bytes of a script's stderr kept for failure messages (the tail).
const STDERR_KEEP: usize = 64 * 1024;

/// `tests/js`: the scripts, `package.json` and `node_modules`.
pub fn js_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("js")
}

/// Where `node` and `npm` are, once the pinned packages are installed.
#[derive(Debug)]
pub struct Tools {
    pub node: PathBuf,
    pub npm: PathBuf,
}

/// Finds node and npm and installs the pinned packages, once per process.
/// Panics with the reason (no node, too old, npm failed) so a test says why
/// it could not run.
pub fn tools() -> &'static Tools {
    static TOOLS: OnceLock<Result<Tools, String>> = OnceLock::new();
    match TOOLS.get_or_init(setup) {
        Ok(tools) => tools,
        Err(e) => panic!("cannot run the JS interop clients: {e}"),
    }
}

fn setup() -> Result<Tools, String> {
    let node = on_path("node").ok_or("`node` not found on PATH (install Node.js 18 or newer)")?;
    let npm = on_path("npm").ok_or("`npm` not found on PATH")?;
    let version = Command::new(&node)
        .arg("--version")
        .output()
        .map_err(|e| format!("{} --version: {e}", node.display()))?;
    let version = String::from_utf8_lossy(&version.stdout).trim().to_owned();
    let major: u32 = version
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .ok_or_else(|| format!("cannot read the node version {version:?}"))?;
    if major < MIN_NODE_MAJOR {
        return Err(format!("node {version} is older than {MIN_NODE_MAJOR}"));
    }
    let tools = Tools { node, npm };
    install(&tools, &js_dir())?;
    Ok(tools)
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.is_file())
}

/// What the stamp must hold for `node_modules` to be current.
fn wanted_stamp(dir: &Path) -> Result<Vec<u8>, String> {
    let mut stamp = Vec::new();
    for file in ["package.json", "package-lock.json"] {
        let path = dir.join(file);
        let bytes = fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        stamp.extend_from_slice(&bytes);
        stamp.push(0);
    }
    Ok(stamp)
}

/// Is `node_modules` the install of exactly this lock file, with every
/// dependency of `package.json` present?
fn up_to_date(dir: &Path, stamp: &[u8]) -> bool {
    let modules = dir.join("node_modules");
    if fs::read(modules.join(STAMP)).ok().as_deref() != Some(stamp) {
        return false;
    }
    let Ok(manifest) = fs::read(dir.join("package.json")) else {
        return false;
    };
    let Ok(manifest) = serde_json::from_slice::<Value>(&manifest) else {
        return false;
    };
    manifest["dependencies"].as_object().is_some_and(|deps| {
        deps.keys()
            .all(|name| modules.join(name).join("package.json").is_file())
    })
}

fn install(tools: &Tools, dir: &Path) -> Result<(), String> {
    let stamp = wanted_stamp(dir)?;
    if up_to_date(dir, &stamp) {
        return Ok(());
    }
    let _lock = InstallLock::acquire(dir)?;
    // Another process may have installed while we waited for the lock.
    if up_to_date(dir, &stamp) {
        return Ok(());
    }
    let log = dir.join(".npm-ci.log");
    let out = fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
    let err = out
        .try_clone()
        .map_err(|e| format!("{}: {e}", log.display()))?;
    let mut child = Command::new(&tools.npm)
        .args(["ci", "--prefer-offline", "--no-audit", "--no-fund"])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("spawn npm ci: {e}"))?;
    let deadline = Instant::now() + INSTALL_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "npm ci did not finish within {INSTALL_TIMEOUT:?} (log: {})",
                    log.display()
                ));
            }
            Err(e) => return Err(format!("waiting for npm ci: {e}")),
        }
    };
    if !status.success() {
        let tail = fs::read_to_string(&log).unwrap_or_default();
        let tail = &tail[tail.len().saturating_sub(4000)..];
        return Err(format!(
            "npm ci failed ({status}) in {}:\n{tail}",
            dir.display()
        ));
    }
    let stamp_path = dir.join("node_modules").join(STAMP);
    fs::write(&stamp_path, &stamp).map_err(|e| format!("{}: {e}", stamp_path.display()))?;
    let _ = fs::remove_file(&log);
    Ok(())
}

/// `tests/js/.npm-ci.lock`, created exclusively (holding our pid) for the
/// time of an install; removed on drop. A lock whose process is gone is
/// stale and taken over.
struct InstallLock {
    path: PathBuf,
}

impl InstallLock {
    fn acquire(dir: &Path) -> Result<InstallLock, String> {
        let path = dir.join(".npm-ci.lock");
        let deadline = Instant::now() + INSTALL_TIMEOUT + Duration::from_secs(30);
        loop {
            match fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut file) => {
                    use std::io::Write;
                    let _ = write!(file, "{}", std::process::id());
                    return Ok(InstallLock { path });
                }
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                    let holder = fs::read_to_string(&path).unwrap_or_default();
                    let alive = holder
                        .trim()
                        .parse::<u32>()
                        .is_ok_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
                    // An empty file is a holder that has not written its pid yet.
                    if !alive && !holder.trim().is_empty() {
                        let _ = fs::remove_file(&path);
                        continue;
                    }
                    if Instant::now() >= deadline {
                        return Err(format!(
                            "{} still held by pid {} after {:?}",
                            path.display(),
                            holder.trim(),
                            INSTALL_TIMEOUT
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(format!("{}: {e}", path.display())),
            }
        }
    }
}

impl Drop for InstallLock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// A running client script: events out, commands in. Killed on drop.
pub struct Script {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Lines<BufReader<ChildStdout>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    history: Vec<Value>,
    ended: bool,
}

impl Script {
    /// Starts `tests/js/<script>` with `args` (installing the packages first
    /// if needed). Call it inside a Tokio runtime: a task collects stderr.
    pub fn spawn(script: &str, args: &[&str]) -> Script {
        let tools = tools();
        let dir = js_dir();
        let mut child = tokio::process::Command::new(&tools.node)
            .arg(dir.join(script))
            .args(args)
            .current_dir(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn node {script}: {e}"));
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("piped stdout");
        let mut stderr_pipe = child.stderr.take().expect("piped stderr");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&stderr);
        tokio::spawn(async move {
            let mut chunk = [0u8; 4096];
            while let Ok(n @ 1..) = stderr_pipe.read(&mut chunk).await {
                let mut kept = sink.lock().expect("stderr buffer");
                kept.extend_from_slice(&chunk[..n]);
                let excess = kept.len().saturating_sub(STDERR_KEEP);
                kept.drain(..excess);
            }
        });
        Script {
            name: script.to_owned(),
            child,
            stdin,
            lines: BufReader::new(stdout).lines(),
            stderr,
            history: Vec::new(),
            ended: false,
        }
    }

    /// Sends one command line, e.g.
    /// `json!({"cmd":"publish","channel":"/foo/bar","data":1,"ref":"p1"})`.
    pub async fn send(&mut self, cmd: Value) {
        let stdin = self.stdin.as_mut().expect("stdin already closed");
        let mut line = cmd.to_string();
        line.push('\n');
        stdin
            .write_all(line.as_bytes())
            .await
            .unwrap_or_else(|e| panic!("{}: write command: {e}", self.name));
        stdin.flush().await.expect("flush stdin");
    }

    /// Closes stdin: the scripts take end of input as "disconnect".
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// The next event within `timeout`: `Ok(None)` once stdout ended,
    /// `Err(())` on timeout. A line that is not JSON comes back as
    /// `{"event":"unparsed","line":..}` so nothing is lost.
    pub async fn next_event(&mut self, timeout: Duration) -> Result<Option<Value>, ()> {
        if self.ended {
            return Ok(None);
        }
        let line = match tokio::time::timeout(timeout, self.lines.next_line()).await {
            Err(_) => return Err(()),
            Ok(Ok(Some(line))) => line,
            Ok(Ok(None)) | Ok(Err(_)) => {
                self.ended = true;
                return Ok(None);
            }
        };
        let event = serde_json::from_str::<Value>(&line)
            .unwrap_or_else(|_| serde_json::json!({"event": "unparsed", "line": line}));
        self.history.push(event.clone());
        Ok(Some(event))
    }

    /// Waits (up to [`WAIT`]) for the next event named `name`, skipping
    /// others (they stay in [`Script::history`]); panics with the history
    /// and stderr if it does not come.
    pub async fn expect(&mut self, name: &str) -> Value {
        self.expect_where(name, |e| e["event"] == name).await
    }

    /// Waits (up to [`WAIT`]) for the next event satisfying `pred`; `what`
    /// names it in the panic message.
    pub async fn expect_where(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_event(left).await {
                Ok(Some(event)) if pred(&event) => return event,
                Ok(Some(event)) if event["event"] == "error" => {
                    self.fail(&format!("script error while waiting for {what}"))
                }
                Ok(Some(_)) => {}
                Ok(None) => self.fail(&format!("script ended while waiting for {what}")),
                Err(()) => self.fail(&format!("timed out after {WAIT:?} waiting for {what}")),
            }
        }
    }

    /// Collects every event that arrives within `d` (e.g. to check that
    /// something was *not* delivered twice), then returns them.
    pub async fn events_for(&mut self, d: Duration) -> Vec<Value> {
        let deadline = Instant::now() + d;
        let mut got = Vec::new();
        while let Ok(Some(event)) = self
            .next_event(deadline.saturating_duration_since(Instant::now()))
            .await
        {
            got.push(event);
        }
        got
    }

    /// Every event seen so far, in order.
    pub fn history(&self) -> &[Value] {
        &self.history
    }

    /// The tail of the script's stderr (the clients' own logs).
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().expect("stderr buffer")).into_owned()
    }

    /// Closes stdin, reads the remaining events and waits for the exit, all
    /// within `timeout` (then the child is killed and this panics).
    pub async fn finish(mut self, timeout: Duration) -> (ExitStatus, Vec<Value>) {
        self.close_stdin();
        let deadline = Instant::now() + timeout;
        loop {
            match self
                .next_event(deadline.saturating_duration_since(Instant::now()))
                .await
            {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(()) => self.fail(&format!("did not end within {timeout:?}")),
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, self.child.wait()).await {
            Ok(Ok(status)) => (status, std::mem::take(&mut self.history)),
            Ok(Err(e)) => panic!("{}: wait: {e}", self.name),
            Err(_) => self.fail(&format!("did not exit within {timeout:?}")),
        }
    }

    fn fail(&mut self, why: &str) -> ! {
        let _ = self.child.start_kill();
        let events: Vec<String> = self.history.iter().map(Value::to_string).collect();
        panic!(
            "{}: {why}\n--- events:\n{}\n--- stderr:\n{}",
            self.name,
            events.join("\n"),
            self.stderr()
        );
    }
}

/// Runs `script` to completion: `args`, then `commands` on stdin and end of
/// input; returns the exit status and every event, or panics after
/// `timeout`.
pub async fn run(
    script: &str,
    args: &[&str],
    commands: &[Value],
    timeout: Duration,
) -> (ExitStatus, Vec<Value>) {
    let mut s = Script::spawn(script, args);
    for cmd in commands {
        s.send(cmd.clone()).await;
    }
    s.finish(timeout).await
}
