//! Process facts from `/proc` and `libc`: CPU time, RSS, the fd limit.

use std::io;

/// Clock ticks per second for `/proc/*/stat` CPU fields (`sysconf(_SC_CLK_TCK)`).
pub(crate) fn clk_tck() -> u64 {
    // SAFETY: sysconf has no preconditions; it only reads a constant.
    let n = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if n > 0 {
        n as u64
    } else {
        100
    }
}

/// Raises this process's RLIMIT_NOFILE soft limit to the hard limit.
/// Returns (soft, hard) after the attempt.
pub(crate) fn raise_fd_limit() -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: `raised` is a valid rlimit; failure is reported, not fatal.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim = raised;
        }
    }
    Ok((lim.rlim_cur, lim.rlim_max))
}

fn proc_path(pid: Option<u32>, file: &str) -> String {
    match pid {
        Some(pid) => format!("/proc/{pid}/{file}"),
        None => format!("/proc/self/{file}"),
    }
}

/// user+system CPU seconds of a process (all its threads); `None` = this process.
pub(crate) fn cpu_secs(pid: Option<u32>) -> io::Result<f64> {
    let path = proc_path(pid, "stat");
    let text = std::fs::read_to_string(&path)?;
    // Fields after the parenthesised command name: state is field 3, so
    // utime (field 14) and stime (field 15) are at offsets 11 and 12.
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| io::Error::other(format!("{path}: no ')'")))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| -> io::Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| io::Error::other(format!("{path}: bad field {}", i + 3)))
    };
    Ok((field(11)? + field(12)?) as f64 / clk_tck() as f64)
}

/// Resident set size in bytes (`VmRSS`); `None` = this process.
pub(crate) fn rss_bytes(pid: Option<u32>) -> io::Result<u64> {
    let path = proc_path(pid, "status");
    let text = std::fs::read_to_string(&path)?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| io::Error::other(format!("{path}: no VmRSS")))
}

/// `/proc/loadavg`, first three fields.
pub(crate) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Online CPUs.
pub(crate) fn nproc() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Wall clock as nanoseconds since the Unix epoch (the payload timestamp).
pub(crate) fn unix_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Runs `--before-phase`'s shell command and waits for it (a profiler it
/// starts in the background keeps running).
pub(crate) async fn before_phase(cmd: Option<&str>) -> Result<(), String> {
    match cmd {
        Some(cmd) => shell(cmd, "--before-phase").await,
        None => Ok(()),
    }
}

/// Runs `cmd` with `sh -c` off the runtime's threads and waits for it; an
/// error names it as `what`.
pub(crate) async fn shell(cmd: &str, what: &str) -> Result<(), String> {
    let cmd = cmd.to_owned();
    let status = tokio::task::spawn_blocking(move || {
        std::process::Command::new("sh")
            .arg("-c")
            .arg(&cmd)
            .status()
    })
    .await
    .map_err(|e| format!("{what}: {e}"))?
    .map_err(|e| format!("{what}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{what} command failed: {status}"))
    }
}

/// Records the gateways' and this process's CPU between two snapshots.
pub(crate) fn report_cpu(
    run: &mut crate::report::Run,
    from: &Snapshot,
    to: &Snapshot,
    gateways: bool,
) {
    if gateways {
        run.float(
            "gateway_cpu_ms",
            (to.gateway_cpu() - from.gateway_cpu()) * 1000.0,
            0,
        );
    }
    run.float("bench_cpu_ms", (to.bench_cpu - from.bench_cpu) * 1000.0, 0);
}

/// CPU and memory of the gateway processes, this process and Redis at one moment.
#[derive(Clone, Debug, Default)]
pub(crate) struct Snapshot {
    /// CPU seconds per gateway pid, in `--pid` order.
    pub(crate) gateways_cpu: Vec<f64>,
    /// RSS bytes per gateway pid.
    pub(crate) gateways_rss: Vec<u64>,
    /// This process's CPU seconds.
    pub(crate) bench_cpu: f64,
    /// This process's RSS bytes.
    pub(crate) bench_rss: u64,
    /// Redis `used_cpu_user + used_cpu_sys` (from `INFO cpu`), if known.
    pub(crate) redis_cpu: Option<f64>,
}

impl Snapshot {
    /// Reads the `/proc` parts (Redis CPU is filled in by the caller).
    pub(crate) fn take(pids: &[u32]) -> Result<Snapshot, String> {
        let mut s = Snapshot {
            bench_cpu: cpu_secs(None).map_err(|e| format!("own CPU: {e}"))?,
            bench_rss: rss_bytes(None).map_err(|e| format!("own RSS: {e}"))?,
            ..Snapshot::default()
        };
        for &pid in pids {
            s.gateways_cpu
                .push(cpu_secs(Some(pid)).map_err(|e| format!("gateway pid {pid}: {e}"))?);
            s.gateways_rss
                .push(rss_bytes(Some(pid)).map_err(|e| format!("gateway pid {pid}: {e}"))?);
        }
        Ok(s)
    }

    /// Total gateway CPU seconds.
    pub(crate) fn gateway_cpu(&self) -> f64 {
        self.gateways_cpu.iter().sum()
    }

    /// Total gateway RSS bytes.
    pub(crate) fn gateway_rss(&self) -> u64 {
        self.gateways_rss.iter().sum()
    }
}
