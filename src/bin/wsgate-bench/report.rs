//! Output: one JSON line per run (stdout), a human table (stderr), and the
//! `table` command that turns result lines into a markdown table.

use serde_json::{json, Map, Value};

use crate::cli::{Check, Opts};

/// The outcome of one run, in display order.
pub(crate) struct Run {
    /// Parameters that shaped the run, beyond the common ones.
    pub(crate) params: Vec<(&'static str, Value)>,
    /// Results, by name (the names `--check` refers to).
    pub(crate) results: Vec<(&'static str, Value)>,
    /// A one-line human summary for the markdown table.
    pub(crate) summary: String,
    /// Things a reader must know (failures, timeouts, caveats).
    pub(crate) notes: Vec<String>,
}

impl Run {
    pub(crate) fn new() -> Run {
        Run {
            params: Vec::new(),
            results: Vec::new(),
            summary: String::new(),
            notes: Vec::new(),
        }
    }

    pub(crate) fn param(&mut self, k: &'static str, v: impl Into<Value>) {
        self.params.push((k, v.into()));
    }

    pub(crate) fn result(&mut self, k: &'static str, v: impl Into<Value>) {
        self.results.push((k, v.into()));
    }

    /// A float result rounded to `digits` decimals.
    pub(crate) fn float(&mut self, k: &'static str, v: f64, digits: i32) {
        let p = 10f64.powi(digits);
        let r = (v * p).round() / p;
        self.results
            .push((k, json!(if r.is_finite() { r } else { 0.0 })));
    }
}

/// Facts about where the run happened.
pub(crate) struct Env {
    pub(crate) fd_soft: u64,
    pub(crate) fd_hard: u64,
    pub(crate) clk_tck: u64,
    pub(crate) load_before: String,
}

/// Prints the JSON line (stdout) and a table (stderr).
pub(crate) fn emit(opts: &Opts, env: &Env, run: Run) {
    let mut params = Map::new();
    params.insert("urls".into(), json!(opts.urls));
    params.insert("pids".into(), json!(opts.pids));
    if let Some(r) = &opts.redis {
        params.insert("redis".into(), json!(r));
    }
    params.insert("sources".into(), json!(opts.sources));
    params.insert("topic_kind".into(), json!(opts.topic_kind.field()));
    params.insert("dialect".into(), json!(opts.dialect.name()));
    params.insert("read_buffer".into(), json!(opts.read_buffer));
    params.insert("threads".into(), json!(opts.threads));
    params.insert("max_secs".into(), json!(opts.max_secs));
    for (k, v) in &run.params {
        params.insert((*k).into(), v.clone());
    }
    let mut results = Map::new();
    for (k, v) in &run.results {
        results.insert((*k).into(), v.clone());
    }
    let checks: Vec<Value> = opts
        .checks
        .iter()
        .map(|c| check_json(c, results.get(&c.name)))
        .collect();
    let line = json!({
        "workload": opts.workload.name(),
        "label": opts.label,
        "unix_time": crate::sys::unix_nanos() / 1_000_000_000,
        "params": params,
        "results": results,
        "checks": checks,
        "summary": run.summary,
        "notes": run.notes,
        "env": {
            "nproc": crate::sys::nproc(),
            "loadavg_before": env.load_before,
            "loadavg_after": crate::sys::loadavg(),
            "fd_limit_soft": env.fd_soft,
            "fd_limit_hard": env.fd_hard,
            "clk_tck": env.clk_tck,
        },
    });
    println!("{line}");

    let mut t = String::new();
    t.push_str(&format!("== {} ({})\n", opts.label, opts.workload.name()));
    for (k, v) in run.params.iter().chain(&run.results) {
        t.push_str(&format!("  {k:<34} {}\n", plain(v)));
    }
    for c in &checks {
        t.push_str(&format!(
            "  check {:<28} {} -> {}\n",
            c["check"].as_str().unwrap_or(""),
            plain(&c["value"]),
            if c["met"] == json!(true) {
                "met"
            } else {
                "NOT met"
            }
        ));
    }
    for n in &run.notes {
        t.push_str(&format!("  note: {n}\n"));
    }
    t.push_str(&format!(
        "  load {} -> {}, fd limit {}/{}\n",
        env.load_before,
        crate::sys::loadavg(),
        env.fd_soft,
        env.fd_hard
    ));
    eprint!("{t}");
}

fn check_json(c: &Check, v: Option<&Value>) -> Value {
    let value = v.and_then(Value::as_f64);
    json!({
        "check": c.text,
        "value": value,
        "met": value.is_some_and(|v| c.met(v)),
    })
}

fn plain(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// `wsgate-bench table FILE`: a markdown table of the JSON lines in FILE
/// (lines that are not JSON objects are skipped).
pub(crate) fn table(path: &str) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    let mut out = String::from(
        "| run | workload | result | targets | load |\n| --- | --- | --- | --- | --- |\n",
    );
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if !v.is_object() {
            continue;
        }
        let label = v["label"].as_str().unwrap_or("?");
        let workload = v["workload"].as_str().unwrap_or("?");
        let mut summary = v["summary"].as_str().unwrap_or("").to_owned();
        if let Some(e) = v["error"].as_str() {
            summary = format!("**error**: {e}");
        }
        let targets: Vec<String> = v["checks"]
            .as_array()
            .map(|cs| {
                cs.iter()
                    .map(|c| {
                        format!(
                            "{} ({}): {}",
                            c["check"].as_str().unwrap_or("?"),
                            plain(&c["value"]),
                            if c["met"] == json!(true) {
                                "met"
                            } else {
                                "**not met**"
                            }
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let load = v["env"]["loadavg_before"]
            .as_str()
            .and_then(|l| l.split_whitespace().next())
            .unwrap_or("");
        let esc = |s: &str| s.replace('|', "\\|");
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            esc(label),
            esc(workload),
            esc(&summary),
            esc(&targets.join("<br>")),
            load
        ));
    }
    Ok(out)
}
