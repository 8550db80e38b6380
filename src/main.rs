//! The `straycat` binary: parse options, set up logging, signals and systemd, run the server.

#![deny(unsafe_code)]

use std::process::ExitCode;
use std::sync::Arc;
use straycat::agent::{Cat, CatConfig, OpenAi, OpenAiConfig, Process, ProcessConfig};
use straycat::config::{self, AgentKind, Command, Config};
use straycat::systemd;
use straycat::{Backend, PolledEcho, Server, TlsSetupError};

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
        Ok(Command::Token {
            user,
            ttl_secs,
            secret,
        }) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let secret = straycat::auth::Secret::new(&secret);
            println!("{}", straycat::auth::sign(&user, &secret, now, ttl_secs));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("straycat: {e}");
            return ExitCode::from(2);
        }
    };
    straycat::logging::init(&config.log_level);
    let server = match build_server(*config) {
        Ok(s) => s,
        Err((e, code)) => {
            log::error!("{e}");
            return code;
        }
    };
    let server = match server.with_state_dir() {
        Ok(s) => s,
        Err(e) => {
            log::error!("{e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = server.shutdown_handle().on_termination_signals() {
        log::error!("cannot install signal handlers: {e}");
        return ExitCode::FAILURE;
    }
    match server.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("event loop failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The server on the socket systemd handed over, or on `--listen`, with systemd
/// notifications when `NOTIFY_SOCKET` is set. An error comes with its exit code: 2 for a
/// certificate or key that cannot be used (like a bad option, not worth a restart), else 1.
fn build_server(config: Config) -> Result<Server, (String, ExitCode)> {
    let failed = |e: String| (e, ExitCode::FAILURE);
    let agent = backend(&config).map_err(failed)?;
    let server = if systemd::listen_fds() >= 1 {
        let listener = inherited_listener().map_err(failed)?;
        log::info!("using the listening socket passed by systemd (--listen is ignored)");
        Server::from_listener(listener, config, agent)
            .map_err(|e| setup_error(e, "cannot serve the inherited socket"))?
    } else {
        let listen = config.listen;
        Server::bind(config, agent)
            .map_err(|e| setup_error(e, &format!("cannot listen on {listen}")))?
    };
    Ok(server.with_systemd(systemd::notifier(), systemd::watchdog_interval()))
}

/// A failed start-up: a bad certificate or key is its own sentence and exit code 2; any
/// other error is `doing: error`, exit code 1.
fn setup_error(e: std::io::Error, doing: &str) -> (String, ExitCode) {
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<TlsSetupError>())
    {
        Some(tls) => (tls.to_string(), ExitCode::from(2)),
        None => (format!("{doing}: {e}"), ExitCode::FAILURE),
    }
}

/// The agent `--agent` names, set up (an upstream's address resolved, here, once).
fn backend(config: &Config) -> Result<Backend, String> {
    let missing = |what: &str| format!("--agent {} needs {what}", config.agent.name());
    Ok(match config.agent {
        AgentKind::Echo => Backend::Polled(Arc::new(PolledEcho {
            delay: config.echo_delay,
        })),
        AgentKind::Openai => {
            let agent = OpenAi::new(OpenAiConfig {
                url: config
                    .openai_url
                    .clone()
                    .ok_or_else(|| missing("--openai-url"))?,
                model: config
                    .openai_model
                    .clone()
                    .ok_or_else(|| missing("--openai-model"))?,
                api_key: config.openai_api_key.clone(),
                system_prompt: config.system_prompt.clone(),
                max_concurrent: config.openai_max_concurrent,
                max_answer_bytes: config.max_message_bytes,
            })?;
            Backend::Polled(Arc::new(agent))
        }
        AgentKind::Process => Backend::Polled(Arc::new(Process::new(ProcessConfig {
            cmd: config
                .process_cmd
                .clone()
                .ok_or_else(|| missing("--process-cmd"))?,
            max_output_bytes: config.max_message_bytes,
            max_concurrent: config.workers,
        })?)),
        AgentKind::Cat => Backend::Polled(Arc::new(Cat::new(CatConfig {
            url: config.cat_url.clone().ok_or_else(|| missing("--cat-url"))?,
            token: config.cat_token.clone(),
            max_frame_bytes: config.max_message_bytes,
            // Parked upstream sockets cost a descriptor each, like client sockets.
            max_connections: config.max_connections.min(config.max_sessions),
        })?)),
    })
}

/// Takes file descriptor 3, the first socket of sd_listen_fds(3).
#[allow(unsafe_code)]
fn inherited_listener() -> Result<mio::net::TcpListener, String> {
    use std::os::fd::FromRawFd;
    use std::os::unix::fs::FileTypeExt;
    const SD_LISTEN_FDS_START: i32 = 3;
    let is_socket = std::fs::metadata(format!("/proc/self/fd/{SD_LISTEN_FDS_START}"))
        .map(|m| m.file_type().is_socket())
        .unwrap_or(false);
    if !is_socket {
        return Err("LISTEN_FDS is set but file descriptor 3 is not a socket".into());
    }
    // SAFETY: `from_raw_fd` needs fd 3 to be open and owned by nobody else. LISTEN_PID is
    // this process (checked by `listen_fds`), so the service manager passed fds 3.. to us
    // alone; we just checked fd 3 is an open socket; and this is the only place that takes
    // it, once, at start-up, before anything else in the process opens or closes fds.
    let std_listener = unsafe { std::net::TcpListener::from_raw_fd(SD_LISTEN_FDS_START) };
    std_listener
        .set_nonblocking(true)
        .map_err(|e| format!("inherited socket: {e}"))?;
    // systemd passes it without close-on-exec; the process agent's children must not
    // inherit the listening socket.
    rustix::io::fcntl_setfd(&std_listener, rustix::io::FdFlags::CLOEXEC)
        .map_err(|e| format!("inherited socket: close-on-exec: {e}"))?;
    std_listener
        .local_addr()
        .map_err(|e| format!("inherited fd 3 is not a TCP listener: {e}"))?;
    Ok(mio::net::TcpListener::from_std(std_listener))
}
