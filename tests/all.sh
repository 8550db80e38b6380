#!/usr/bin/env bash
# Runs every check and test of straycat. On a fresh Debian 12 machine with the Rust
# toolchain it first installs what the tests need (kosoku, the Autobahn TestSuite runner,
# from PyPI; cargo-fuzz from crates.io, in fuzz/run.sh; for the ARM part, Debian's
# rustc-web, ARM standard libraries, cross linkers and qemu-user, through apt). This is the
# README's test command, and what .ci/run calls.
#
# STRAYCAT_TEST_CROSS=0 skips the ARM and package part (for a quick run on a machine where
# apt and root are not to be touched); CI runs everything.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v kosoku >/dev/null 2>&1 && [ ! -x "$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/kosoku" ]; then
    echo "== installing kosoku (Autobahn TestSuite runner) from PyPI"
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore kosoku \
        || python3 -m pip install --quiet --disable-pip-version-check kosoku
fi

if ! python3 -c 'import prometheus_client' 2>/dev/null; then
    echo "== installing prometheus_client (the /metrics exposition check) from PyPI"
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore prometheus_client==0.26.0 \
        || python3 -m pip install --quiet --disable-pip-version-check prometheus_client==0.26.0
fi

echo "== cargo fmt --check"
cargo fmt --check
echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --quiet -- -D warnings
echo "== cargo clippy --no-default-features (the build without TLS)"
cargo clippy --no-default-features --lib --bins --quiet -- -D warnings
echo "== cargo doc"
RUSTDOCFLAGS=-Dwarnings cargo doc --no-deps --quiet
echo "== cargo test (unit, integration over 127.0.0.1, Autobahn 1-10)"
cargo test --all-targets
if [ "${STRAYCAT_TEST_CROSS:-1}" != 0 ] || { [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; }; then
    echo "== the kiosk page in a real browser (tests/browser/run.sh: Debian's Chromium, Selenium)"
    bash tests/browser/run.sh
else
    echo "== STRAYCAT_TEST_CROSS=0 and no Chromium: skipping the browser tests (they would apt-get install it)"
fi
if [ "${STRAYCAT_TEST_CROSS:-1}" != 0 ] || command -v node >/dev/null 2>&1; then
    echo "== the official Cheshire Cat clients (tests/clients/run.sh: cheshire-cat-api from PyPI, ccat-api from npm)"
    bash tests/clients/run.sh
else
    echo "== STRAYCAT_TEST_CROSS=0 and no Node.js: skipping the client tests (they would apt-get install it)"
fi

if [ "${STRAYCAT_TEST_CROSS:-1}" != 0 ] || command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ]; then
    echo "== several instances behind HAProxy: sticky routing, a drain and a return (deploy/test.sh)"
    bash deploy/test.sh
else
    echo "== STRAYCAT_TEST_CROSS=0 and no haproxy: skipping deploy/test.sh (it would apt-get install it)"
fi

echo "== fuzzing, a short run: every fuzz target for 20,000 inputs from its seeds (fuzz/run.sh; installs cargo-fuzz)"
bash fuzz/run.sh

if [ "${STRAYCAT_TEST_CROSS:-1}" = 0 ]; then
    echo "== STRAYCAT_TEST_CROSS=0: skipping the ARM builds, the suite under qemu and the packages"
    exit 0
fi
echo "== ARM: release builds, the whole suite on aarch64 under qemu, armv7 smoke test"
bash cross/test-arm.sh
echo "== packages: arm64 and armhf .deb built, amd64 .deb installed, run and purged"
bash cross/package.sh arm64 armhf
bash cross/test-package.sh
