//! `gateway`: serve a node, or print a token for one.

use std::io::IsTerminal;
use std::process::ExitCode;

use courier_gateway::config::{LogFormat, ServeArgs, TokenArgs};
use courier_gateway::config_file::{self, Invocation, LoadError};
use courier_gateway::node::Node;
use courier_gateway::secret;
use courier_protocol::token;

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    courier_gateway::alloc::configure();
    let result = match config_file::load(std::env::args_os()) {
        Ok(Invocation::Serve(args)) => serve(*args),
        Ok(Invocation::PrintConfig(toml)) => {
            print!("{toml}");
            Ok(())
        }
        Ok(Invocation::Token(args)) => print_token(&args),
        Err(LoadError::Cli(e)) => e.exit(),
        Err(e @ LoadError::File { .. }) => {
            // A configuration the operator must fix: the same exit code
            // clap uses for a bad flag.
            eprintln!("gateway: {e}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gateway: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    init_logging(&args.log_filter, args.log_format);
    if args.role == courier_gateway::config::Role::Router {
        return courier_gateway::fleet::run_router(args);
    }
    let node = Node::start(args)?;
    let trigger = node.shutdown_trigger();
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(signal) = signals.forever().next() {
                // Stop first: nothing (not even a failing log write) may
                // come between the signal and the shutdown.
                trigger();
                tracing::info!(signal, "signal received; shutting down");
            }
        })?;
    node.wait();
    Ok(())
}

/// Prints a token for `args` (its user and device were checked by clap).
fn print_token(args: &TokenArgs) -> anyhow::Result<()> {
    let secret = secret::load(&args.data_dir)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    println!(
        "{}",
        token::mint(
            &secret,
            &token::claims_for(&args.user, args.device, now, args.ttl)
        )
    );
    Ok(())
}

/// `RUST_LOG`, when set, replaces `--log-filter` (the tracing convention).
fn init_logging(filter: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // With its default, a failed write makes the subscriber report it
        // with eprint!, which panics once stderr is gone (a log pipe whose
        // reader exited): the thread that logged dies, and if that is the
        // signal thread, SIGTERM no longer stops the node. Lost log lines
        // are not worth a thread.
        .log_internal_errors(false)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
