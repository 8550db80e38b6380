//! Log set-up: lines with a UTC timestamp, the level and the module on a terminal or a
//! plain pipe (the level in colour only on a terminal), and, when stderr is the systemd
//! journal, plain lines with a `<N>` syslog priority prefix and no timestamp, which
//! journald reads as the level. Both are ours: `simple_logger`, with the `time` and
//! `colored` crates it brings, was 33 KiB of the armv7 binary for what is a `format!` here.

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
    let logger = TerminalLogger {
        level,
        colors: std::io::stderr().is_terminal(),
    };
    log::set_max_level(level);
    // Only fails if a logger is already installed (a second call in one process).
    let _ = log::set_boxed_logger(Box::new(logger));
}

/// `2026-12-01T15:10:03.398Z WARN  [straycat::server::io] user=… peer=… …`, the format
/// simple_logger had. Written with one `write_all` per line, whose error is dropped: a
/// line must never take down the thread that logs it (`eprintln!` panics when stderr is
/// gone, and the signal thread died that way once, so SIGTERM was ignored).
struct TerminalLogger {
    level: LevelFilter,
    colors: bool,
}

impl Log for TerminalLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let level = format!("{:<5}", record.level());
        let level = match (self.colors, record.level()) {
            (false, _) | (true, Level::Trace) => level,
            (true, l) => {
                let color = match l {
                    Level::Error => 31,
                    Level::Warn => 33,
                    Level::Info => 36,
                    _ => 35,
                };
                format!("\x1b[{color}m{level}\x1b[0m")
            }
        };
        let line = format!(
            "{} {level} [{}] {}\n",
            utc_timestamp(now),
            record.target(),
            record.args()
        );
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {
        let _ = std::io::stderr().flush();
    }
}

/// RFC 3339 in UTC with milliseconds, from the time since the Unix epoch.
fn utc_timestamp(since_epoch: std::time::Duration) -> String {
    let secs = since_epoch.as_secs();
    let (year, month, day) = civil_from_days(secs / 86_400);
    let rem = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        since_epoch.subsec_millis()
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (H. Hinnant's
/// `civil_from_days`, for days at or after the epoch).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_are_utc_dates() {
        let at = |secs: u64, ms: u64| utc_timestamp(Duration::from_millis(secs * 1000 + ms));
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(1_800_000_000, 123), "2027-01-15T08:00:00.123Z");
        assert_eq!(at(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(at(4_102_444_799, 999), "2099-12-31T23:59:59.999Z");
    }
}
