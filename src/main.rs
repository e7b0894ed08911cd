//! The `wsgate` binary: read the config, install logging, serve until stopped.

use std::process::ExitCode;

use tracing_subscriber::EnvFilter;
use wsgate::config::{Config, LogFormat};

fn main() -> ExitCode {
    let config = match Config::from_env() {
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
