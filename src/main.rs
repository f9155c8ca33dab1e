//! The `dweetpipe` binary: parse the command line, set up logging, run the command, and turn
//! errors into a message on stderr and a non-zero exit.

mod cli;

use std::process::ExitCode;

use clap::Parser;
use dweetpipe::client;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(cli::default_log_filter(&cli.command)));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        cli::LogFormat::Json => logs.json().with_current_span(false).init(),
        cli::LogFormat::Human => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: could not start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            if let Some(hint) = error.downcast_ref::<client::Error>().and_then(hint_for) {
                eprintln!("hint: {hint}");
            }
            ExitCode::FAILURE
        }
    }
}

/// What the user can do about a client error, where there is something to do.
fn hint_for(error: &client::Error) -> Option<&'static str> {
    match error {
        client::Error::Locked { .. } => {
            Some("the thing is locked: pass its key with --key-file PATH or DWEET_KEY")
        }
        client::Error::WrongKey { .. } => {
            Some("check the key: it must be the master key of the lock attached to this thing")
        }
        client::Error::NotFound { .. } => Some(
            "thing names are case-sensitive, and a thing is forgotten 24 h after its last dweet",
        ),
        client::Error::RateLimited { .. } => {
            Some("the server allows about one request per second per thing; wait and retry")
        }
        client::Error::Transport(_) => {
            Some("is the server running and the --server URL (or DWEET_SERVER) right?")
        }
        _ => None,
    }
}
