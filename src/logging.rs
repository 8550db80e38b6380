//! Log set-up: `simple_logger` at the configured level, colours only on a terminal.

use log::LevelFilter;
use std::io::IsTerminal;

/// Parses a level name as accepted by `--log-level`.
pub fn level(name: &str) -> LevelFilter {
    match name {
        "off" => LevelFilter::Off,
        "error" => LevelFilter::Error,
        "warn" => LevelFilter::Warn,
        "debug" => LevelFilter::Debug,
        "trace" => LevelFilter::Trace,
        _ => LevelFilter::Info,
    }
}

/// Installs the logger. `RUST_LOG`, when set, wins over `--log-level` (as in most Rust
/// programs); colours are used only when stderr is a terminal.
pub fn init(level_name: &str) {
    let mut level = level(level_name);
    if let Ok(env) = std::env::var("RUST_LOG") {
        let env = env.trim().to_ascii_lowercase();
        if matches!(
            env.as_str(),
            "off" | "error" | "warn" | "info" | "debug" | "trace"
        ) {
            level = self::level(&env);
        }
    }
    let logger = simple_logger::SimpleLogger::new()
        .with_level(level)
        .with_colors(std::io::stderr().is_terminal())
        .with_utc_timestamps();
    // Only fails if a logger is already installed (a second call in one process).
    let _ = logger.init();
}
