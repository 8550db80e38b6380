#!/usr/bin/env bash
# Runs every check and test of straycat. On a fresh Debian 12 machine with the Rust
# toolchain it first installs what the tests need (kosoku, the Autobahn TestSuite runner,
# from PyPI). This is the README's test command, and what .ci/run calls.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v kosoku >/dev/null 2>&1 && [ ! -x "$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/kosoku" ]; then
    echo "== installing kosoku (Autobahn TestSuite runner) from PyPI"
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore kosoku \
        || python3 -m pip install --quiet --disable-pip-version-check kosoku
fi

echo "== cargo fmt --check"
cargo fmt --check
echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --quiet -- -D warnings
echo "== cargo doc"
RUSTDOCFLAGS=-Dwarnings cargo doc --no-deps --quiet
echo "== cargo test (unit, integration over 127.0.0.1, Autobahn 1-10)"
cargo test --all-targets
