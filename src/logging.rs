//! Log set-up: `simple_logger` at the configured level on a terminal or a plain pipe
//! (colours only on a terminal), and, when stderr is the systemd journal, plain lines with
//! a `<N>` syslog priority prefix and no timestamp, which journald reads as the level.

use log::{Level, LevelFilter, Log, Metadata, Record};
use std::io::{IsTerminal, Write};

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

/// Installs the logger. `RUST_LOG`, when set to a level name, wins over `--log-level`
/// (as in most Rust programs).
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
    if crate::systemd::stderr_is_journal() {
        if log::set_boxed_logger(Box::new(JournalLogger { level })).is_ok() {
            log::set_max_level(level);
        }
        return;
    }
    let logger = simple_logger::SimpleLogger::new()
        .with_level(level)
        .with_colors(std::io::stderr().is_terminal())
        .with_utc_timestamps();
    log::set_max_level(logger.max_level());
    // Only fails if a logger is already installed (a second call in one process).
    let _ = log::set_boxed_logger(Box::new(Unfailing(logger)));
}

/// simple_logger writes with `eprintln!`, which panics when stderr is gone (the reading
/// end of a pipe closed): a log line must never take down the thread that logs it (the
/// signal thread died that way, and SIGTERM was ignored). Such a line is dropped.
struct Unfailing(simple_logger::SimpleLogger);

impl Log for Unfailing {
    fn enabled(&self, metadata: &Metadata) -> bool {
        self.0.enabled(metadata)
    }

    fn log(&self, record: &Record) {
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.0.log(record)));
    }

    fn flush(&self) {
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.0.flush()));
    }
}

/// Lines for journald: `<4>WARN user=… peer=… …`. The journal adds time and unit.
struct JournalLogger {
    level: LevelFilter,
}

/// The syslog priority journald expects for a level (sd-daemon(3)).
pub fn syslog_priority(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

impl Log for JournalLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &Record) {
        if self.enabled(record.metadata()) {
            let line = format!(
                "<{}>{} {}\n",
                syslog_priority(record.level()),
                record.level(),
                record.args()
            );
            // One write per line so lines from the signal thread never interleave.
            let _ = std::io::stderr().lock().write_all(line.as_bytes());
        }
    }

    fn flush(&self) {
        let _ = std::io::stderr().flush();
    }
}
