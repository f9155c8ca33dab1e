//! The `dweetpipe` binary: parse the command line, set up logging, run the command, and turn
//! errors into a message on stderr and a non-zero exit.

mod cli;

use std::process::ExitCode;

use clap::Parser;
use dweetpipe::client;
use tracing_subscriber::EnvFilter;

/// mimalloc rather than glibc's allocator: see its line in Cargo.toml.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    let call = cli::Call::of(&cli.command);
    match runtime.block_on(cli::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) if error.is::<cli::Interrupted>() => ExitCode::from(130),
        Err(error) => {
            eprintln!("error: {error:#}");
            if let Some(hint) = error
                .downcast_ref::<client::Error>()
                .and_then(|e| hint_for(call, e))
            {
                eprintln!("hint: {hint}");
            }
            ExitCode::FAILURE
        }
    }
}

/// What the user can do about a client error from `call`, where there is something to do.
fn hint_for(call: cli::Call, error: &client::Error) -> Option<&'static str> {
    use cli::Call;
    match (call, error) {
        (_, client::Error::RateLimited { .. }) => {
            Some("the server allows about one request per second per thing; wait and retry")
        }
        (_, client::Error::Transport(_)) => {
            Some("is the server running and the --server URL (or DWEET_SERVER) right?")
        }
        (Call::Lock, client::Error::NotFound { .. }) => Some(
            "the server knows no lock of that id with this key: check the lock id (it is issued with the lock) and its master key",
        ),
        (Call::RemoveLock, client::Error::NotFound { .. }) => {
            Some("the server knows no lock of that id: check the spelling")
        }
        (Call::RemoveLock, client::Error::WrongKey { .. }) => {
            Some("the key is not this lock's master key")
        }
        (Call::Alert, client::Error::NotFound { .. }) => Some(
            "the thing has no alert (set one with `dweetpipe alert set`), or no such thing is known",
        ),
        (_, client::Error::Locked { .. }) => {
            Some("the thing is locked: pass its key with --key-file PATH or DWEET_KEY")
        }
        (_, client::Error::WrongKey { .. }) => {
            Some("check the key: it must be the master key of the lock attached to this thing")
        }
        (Call::Thing, client::Error::NotFound { .. }) => Some(
            "thing names are case-sensitive, and a thing is forgotten 24 h after its last dweet",
        ),
        _ => None,
    }
}
