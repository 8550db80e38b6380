//! The `straycat` binary: parse options, set up logging and signals, run the server.

use std::process::ExitCode;
use std::sync::Arc;
use straycat::config::{self, Command};
use straycat::{EchoAgent, Server};

fn main() -> ExitCode {
    let command = config::parse(std::env::args().skip(1), |k| std::env::var(k).ok());
    let config = match command {
        Ok(Command::Run(c)) => c,
        Ok(Command::Help) => {
            print!("{}", config::help_text());
            return ExitCode::SUCCESS;
        }
        Ok(Command::Version) => {
            println!("straycat {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("straycat: {e}");
            return ExitCode::from(2);
        }
    };
    straycat::logging::init(&config.log_level);
    let agent = Arc::new(EchoAgent {
        delay: config.echo_delay,
    });
    let listen = config.listen;
    let server = match Server::bind(*config, agent) {
        Ok(s) => s,
        Err(e) => {
            log::error!("cannot listen on {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let handle = server.shutdown_handle();
    match signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ]) {
        Ok(mut signals) => {
            let spawned = std::thread::Builder::new()
                .name("straycat-signals".into())
                .stack_size(64 * 1024)
                .spawn(move || {
                    if let Some(sig) = signals.forever().next() {
                        log::info!("signal {sig} received");
                        handle.shutdown();
                    }
                });
            if let Err(e) = spawned {
                log::error!("cannot start the signal thread: {e}");
                return ExitCode::FAILURE;
            }
        }
        Err(e) => {
            log::error!("cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    }
    match server.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("event loop failed: {e}");
            ExitCode::FAILURE
        }
    }
}
