//! The `wsgate` binary: answer `--help`/`--version`, read the config, raise
//! the open-file limit and fit the caps in it, install logging, serve until
//! stopped. Exit codes: 0 after a clean stop (or `--help`/`--version`), 2 for
//! a usage or configuration error (nothing was started), 1 when serving
//! failed (e.g. the address is taken).

use std::process::ExitCode;

use tracing::{info, warn};
use tracing_subscriber::EnvFilter;
use wsgate::config::{Config, LogFormat};
use wsgate::fdlimit;

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    if let Some(arg) = args.next() {
        let extra = args.next();
        return match (arg.to_str(), extra) {
            (Some("-h" | "--help"), None) => {
                print!("{}", wsgate::config::help_text());
                ExitCode::SUCCESS
            }
            (Some("-V" | "--version"), None) => {
                println!("wsgate {}", env!("CARGO_PKG_VERSION"));
                ExitCode::SUCCESS
            }
            (Some("-h" | "--help" | "-V" | "--version"), Some(extra)) => {
                eprintln!(
                    "wsgate: unexpected argument {:?} (usage: wsgate [--help | --version])",
                    extra.to_string_lossy()
                );
                ExitCode::from(2)
            }
            _ => {
                eprintln!(
                    "wsgate: unknown argument {:?}: wsgate takes no arguments and is configured \
                     by WSGATE_* environment variables (wsgate --help lists them)",
                    arg.to_string_lossy()
                );
                ExitCode::from(2)
            }
        };
    }
    let mut config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("wsgate: {e}");
            return ExitCode::from(2);
        }
    };
    let filter = EnvFilter::try_new(&config.log).unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour codes only on a terminal: in files and log shippers they are noise.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi);
    match config.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    if let Err(e) = fit_fd_limit(&mut config) {
        eprintln!("wsgate: {e}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wsgate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let listener = match wsgate::server::bind(config.listen) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("wsgate: cannot listen on {}: {e}", config.listen);
                return ExitCode::FAILURE;
            }
        };
        match wsgate::server::run(listener, config, wsgate::shutdown::signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("wsgate: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// Raises the soft open-file limit to the hard one, logs both, and fits the
/// connection caps in it (see `wsgate::fdlimit`): a default that does not
/// fit is lowered (logged), an explicit value that does not fit is an error.
fn fit_fd_limit(config: &mut Config) -> Result<(), fdlimit::FitError> {
    let limit = match fdlimit::raise() {
        Ok(l) => {
            info!(
                soft_before = l.soft_before,
                soft = l.soft,
                hard = l.hard,
                "open-file limit"
            );
            l.soft
        }
        Err(e) => {
            // Without getrlimit there is nothing to fit against: keep the caps.
            warn!(cause = %e, "cannot read or raise the open-file limit");
            return Ok(());
        }
    };
    let wanted = fdlimit::Caps {
        connections: config.max_connections.get(),
        connections_set: config.max_connections_set,
        pending: config.max_pending_connections.get(),
        pending_set: config.max_pending_connections_set,
    };
    let got = fdlimit::fit(limit, wanted)?;
    if got != wanted {
        warn!(
            limit,
            headroom = fdlimit::HEADROOM,
            max_connections = got.connections,
            max_pending_connections = got.pending,
            wanted_connections = wanted.connections,
            wanted_pending = wanted.pending,
            "caps lowered to fit the open-file limit (set WSGATE_MAX_CONNECTIONS to make it a requirement)"
        );
    }
    if let (Some(c), Some(p)) = (
        std::num::NonZeroUsize::new(got.connections),
        std::num::NonZeroUsize::new(got.pending),
    ) {
        config.max_connections = c;
        config.max_pending_connections = p;
    }
    Ok(())
}
