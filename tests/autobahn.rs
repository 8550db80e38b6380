//! The Autobahn TestSuite cases 1–10 against `/echo`, driven by `kosoku` (PyPI), which
//! `tests/all.sh` installs. Compression (12.*, 13.*) is out of scope.

mod common;

use std::path::PathBuf;
use std::process::Command;

/// `kosoku` from `$KOSOKU`, the PATH, or the scripts folder of `python3`'s install.
fn kosoku() -> PathBuf {
    if let Some(p) = std::env::var_os("KOSOKU") {
        return PathBuf::from(p);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("kosoku");
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_path('scripts'))",
        ])
        .output()
        .expect("python3 is needed to find kosoku");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("kosoku")
}

#[test]
fn autobahn_cases_1_to_10_pass_on_echo() {
    let kosoku = kosoku();
    assert!(
        kosoku.is_file(),
        "kosoku not found at {}: run tests/all.sh, which installs it (pip install kosoku)",
        kosoku.display()
    );
    // Case 9 sends messages of up to 16 MiB and reads nothing until it has sent them.
    let server = common::Server::start(&[
        "--raw-echo",
        "--max-message-bytes",
        "16777216",
        "--max-buffered-bytes",
        "67108864",
        "--log-level",
        "info",
    ]);
    let reports = std::env::temp_dir().join(format!("straycat-autobahn-{}", std::process::id()));
    let out = Command::new(&kosoku)
        .args(["-x", "12.*", "-x", "13.*", "-o"])
        .arg(&reports)
        .arg(format!("ws://{}/echo", server.addr()))
        .output()
        .expect("kosoku runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let _ = std::fs::remove_dir_all(&reports);
    let summary = stdout
        .lines()
        .chain(stderr.lines())
        .filter(|l| l.contains("cases passed") || l.contains("failed"))
        .collect::<Vec<_>>();
    assert!(out.status.success(), "kosoku failed:\n{stdout}\n{stderr}");
    assert!(
        summary
            .iter()
            .any(|l| l.trim_end().ends_with("cases passed")),
        "no pass summary:\n{stdout}\n{stderr}"
    );
    assert!(
        !summary.iter().any(|l| l.contains("failed")),
        "failures:\n{stdout}"
    );
    let passed: usize = summary
        .iter()
        .find_map(|l| l.split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(0);
    assert!(
        passed >= 290,
        "expected every case of 1-10 to run, saw {passed}"
    );
}
