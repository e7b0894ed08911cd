//! `wsgate-bench`: a load client for the wsgate gateway.
//!
//! It speaks the native protocol, or Bayeux over a WebSocket (`--dialect`),
//! over tokio-tungstenite (one task per socket,
//! sockets bound to source addresses spread over 127.0.0.0/8 with
//! `IP_BIND_ADDRESS_NO_PORT`), publishes through Redis with pipelined
//! `PUBLISH` paced to a rate, takes latency from the send time carried in
//! each payload (a byte scan, no JSON parse), and reads the gateway's CPU
//! time and RSS from `/proc`. Every run is bounded in count and in time, and
//! ends with one JSON line on stdout and a table on stderr. `calls` also
//! plays the service processes of `/services` and a direct Redis round
//! trip to compare calls with. `baseline` is not a workload but the
//! reference fan-out server wsgate is measured against (issue 13). `--help` lists the workloads and options; `scripts/bench.sh` runs the standard suite.

mod baseline;
mod bayeux;
mod caller;
mod calls;
mod churn;
mod cli;
mod dialects;
mod fanout;
mod hist;
mod history;
mod idle;
mod joinstorm;
mod net;
mod outage;
mod presence;
mod rds;
mod recv;
mod report;
mod resync;
mod route;
mod rtt;
mod service;
mod sse;
mod sys;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use cli::{Command, Opts, Workload};
use net::Gateway;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("baseline") {
        // The reference server (issue 13), not a workload: it serves until stopped.
        return match baseline::main(&args[1..]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("wsgate-bench baseline: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let opts = match cli::parse(&args) {
        Ok(Command::Help) => {
            print!("{}", cli::USAGE);
            return ExitCode::SUCCESS;
        }
        Ok(Command::Table(path)) => {
            return match report::table(&path) {
                Ok(t) => {
                    print!("{t}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("wsgate-bench: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Ok(Command::Run(opts)) => opts,
        Err(e) => {
            eprintln!("wsgate-bench: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wsgate-bench {}: {e}", opts.label);
            // Still one JSON line, so a suite's results show the failure.
            println!(
                "{}",
                serde_json::json!({
                    "workload": opts.workload.name(),
                    "label": opts.label,
                    "error": e,
                })
            );
            ExitCode::FAILURE
        }
    }
}

fn run(opts: &Opts) -> Result<(), String> {
    let (fd_soft, fd_hard) = sys::raise_fd_limit().map_err(|e| format!("RLIMIT_NOFILE: {e}"))?;
    let sockets = match opts.workload {
        Workload::Churn => opts.connections,
        Workload::Resync => opts.patterns.div_ceil(opts.per_conn),
        Workload::Calls => opts.callers + opts.services + 8,
        Workload::Presence => opts.subscribers + opts.probers,
        _ => opts.subscribers,
    };
    if sockets as u64 + 64 > fd_soft {
        return Err(format!(
            "{sockets} sockets need more file descriptors than the limit of {fd_soft} (hard \
             {fd_hard}) allows: run several bench processes (see docs/benchmarks.md)"
        ));
    }
    let env = report::Env {
        fd_soft,
        fd_hard,
        clk_tck: sys::clk_tck(),
        load_before: sys::loadavg(),
    };
    let gateways = opts
        .urls
        .iter()
        .enumerate()
        .map(|(i, u)| Gateway::parse(u, opts.pids.get(i).copied()))
        .collect::<Result<Vec<_>, _>>()?;

    // The hard bound: whatever happens, the process ends.
    let hard = Duration::from_secs_f64(opts.max_secs + 30.0);
    std::thread::spawn(move || {
        std::thread::sleep(hard);
        eprintln!("wsgate-bench: still running {hard:?} after start: exiting");
        std::process::exit(3);
    });
    let deadline = Instant::now() + Duration::from_secs_f64(opts.max_secs);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(opts.threads)
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    let result = rt.block_on(async {
        match opts.workload {
            Workload::Fanout | Workload::Spread | Workload::Channels | Workload::Cluster => {
                fanout::run(opts, &gateways, deadline).await
            }
            Workload::Idle => idle::run(opts, &gateways, deadline).await,
            Workload::Churn => churn::run(opts, &gateways, deadline).await,
            Workload::Resync => resync::run(opts, &gateways, deadline).await,
            Workload::JoinStorm => joinstorm::run(opts, &gateways, deadline).await,
            Workload::Outage => outage::run(opts, &gateways, deadline).await,
            Workload::Calls => calls::run(opts, &gateways, deadline).await,
            Workload::Presence => presence::run(opts, &gateways, deadline).await,
            Workload::History => history::run(opts, &gateways, deadline).await,
        }
    });
    // Sockets still open are simply dropped.
    rt.shutdown_timeout(Duration::from_secs(2));
    let run = result?;
    report::emit(opts, &env, run);
    Ok(())
}
