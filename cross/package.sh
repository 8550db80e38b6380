#!/usr/bin/env bash
# cross/package.sh: .deb packages of straycat for amd64, arm64 and armhf.
#
#   bash cross/package.sh             # all three
#   bash cross/package.sh amd64       # or some of them
#
# Writes target/debian/straycat_<version>-1_<arch>.deb (cargo-deb's layout and default
# revision), each installing /usr/bin/straycat, the systemd units straycat.service and
# straycat.socket in /lib/systemd/system, and /etc/default/straycat (a conffile: your edits
# survive upgrades). amd64 is built with the host toolchain; arm64 and armhf with
# cross/build.sh. Needs only dpkg-dev (dpkg-deb, dpkg-shlibdeps), no cargo-deb.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=cross/lib.sh
. cross/lib.sh

arches=("$@")
[ ${#arches[@]} -gt 0 ] || arches=(amd64 arm64 armhf)

version=$(awk -F'"' '/^version *=/ { print $2; exit }' Cargo.toml)
description=$(awk -F'"' '/^description *=/ { print $2; exit }' Cargo.toml)
debversion="$version-1"
maintainer=${DEB_MAINTAINER:-$(git log -1 --format='%an <%ae>' 2>/dev/null || echo "straycat maintainers <root@localhost>")}

command -v dpkg-shlibdeps >/dev/null || as_root apt-get install -y --no-install-recommends dpkg-dev >&2

# Build what is asked for: the host binary with the normal toolchain, ARM through build.sh.
for arch in "${arches[@]}"; do
    case "$arch" in
        amd64) [ "$(dpkg --print-architecture)" = amd64 ] || die "amd64 is built on an amd64 host"
            log "cargo build --release (host toolchain)"
            env -u RUSTC cargo build --release --locked ;;
        arm64 | armhf) need_cross=1 ;;
        *) die "unknown architecture $arch (amd64, arm64, armhf)" ;;
    esac
done
[ -z "${need_cross:-}" ] || bash cross/build.sh

binary_of() {
    case "$1" in
        amd64) echo target/release/straycat ;;
        arm64) echo target/aarch64-unknown-linux-gnu/release/straycat ;;
        armhf) echo target/armv7-unknown-linux-gnueabihf/release/straycat ;;
    esac
}

# For an ARM binary, dpkg-shlibdeps finds the libraries in the -cross packages' tree.
cross_libdir() {
    case "$1" in
        arm64) echo -l/usr/aarch64-linux-gnu/lib ;;
        armhf) echo -l/usr/arm-linux-gnueabihf/lib ;;
    esac
}

# The -cross packages' shlibs/symbols files name themselves ("libc6:arm64 (>= 2.36)",
# "libgcc-s1-arm64-cross (>= 4.2)"): turn them into the packages a Pi has, libc6 and
# libgcc-s1. libc6-*-cross ships only a shlibs file, whose version is that of the whole
# library (2.36); the binary's newest GLIBC_ version reference is the real minimum, the one
# a symbols file would give.
native_depends() {
    local arch=$1 deps=$2 bin=$3 glibc
    deps=$(echo "$deps" | sed -E "s/:$arch//g; s/-$arch-cross//g")
    glibc=$(LC_ALL=C readelf -V "$bin" | grep -oE 'GLIBC_[0-9]+(\.[0-9]+)+' | sed 's/GLIBC_//' |
        sort -uV | tail -n 1)
    [ -n "$glibc" ] || die "no GLIBC_ version reference in $bin"
    echo "$deps" | sed -E "s/libc6 \(>= [^)]*\)/libc6 (>= $glibc)/"
}

mkdir -p target/debian
for arch in "${arches[@]}"; do
    work=target/debian/build-$arch
    root=$work/debian/straycat
    rm -rf "$work"
    mkdir -p "$root/DEBIAN" "$root/usr/bin" "$root/lib/systemd/system" "$root/etc/default" \
        "$root/usr/share/doc/straycat"
    install -m 0755 "$(binary_of "$arch")" "$root/usr/bin/straycat"
    install -m 0644 cross/straycat.service cross/straycat.socket "$root/lib/systemd/system/"
    # 0600: the file may hold STRAYCAT_API_KEY; systemd (root) reads it before dropping to
    # the dynamic user, so nobody else needs to.
    install -m 0600 cross/straycat.default "$root/etc/default/straycat"
    install -m 0644 README.md "$root/usr/share/doc/straycat/README.md"
    cat >"$root/usr/share/doc/straycat/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: straycat

Files: *
License: MIT
EOF
    echo "/etc/default/straycat" >"$root/DEBIAN/conffiles"

    # Library dependencies from the binary itself (libc6, libgcc-s1 for unwinding).
    printf 'Source: straycat\n\nPackage: straycat\nArchitecture: any\n' >"$work/debian/control"
    depends=$(cd "$work" && DEB_HOST_ARCH=$arch dpkg-shlibdeps $(cross_libdir "$arch") \
        -O debian/straycat/usr/bin/straycat | sed -n 's/^shlibs:Depends=//p')
    [ -n "$depends" ] || die "dpkg-shlibdeps found no dependencies for $arch"
    [ "$arch" = amd64 ] || depends=$(native_depends "$arch" "$depends" "$(binary_of "$arch")")

    cat >"$root/DEBIAN/control" <<EOF
Package: straycat
Version: $debversion
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $(du -sk --exclude=DEBIAN "$root" | cut -f1)
Depends: $depends
Section: net
Priority: optional
Description: $description
 straycat is a synchronous WebSocket chat server (mio + tungstenite) for small
 devices such as a Raspberry Pi kiosk. It speaks the Cheshire Cat AI 1.x chat
 protocol; replies belong to the session, so a client that disconnects and comes
 back gets every reply. Runs as straycat.service (Type=notify, watchdog,
 hardened) or through straycat.socket; options in /etc/default/straycat.
EOF

    # The same steps dh_installsystemd generates: enable and (re)start the service on
    # install/upgrade; the socket unit is left for the admin to choose.
    cat >"$root/DEBIAN/postinst" <<'EOF'
#!/bin/sh
set -e
case "$1" in
configure | abort-upgrade | abort-deconfigure | abort-remove)
    if command -v deb-systemd-helper >/dev/null; then
        deb-systemd-helper unmask straycat.service >/dev/null || true
        if deb-systemd-helper --quiet was-enabled straycat.service; then
            deb-systemd-helper enable straycat.service >/dev/null || true
        else
            deb-systemd-helper update-state straycat.service >/dev/null || true
        fi
        deb-systemd-helper update-state straycat.socket >/dev/null || true
    fi
    if [ -d /run/systemd/system ]; then
        systemctl --system daemon-reload >/dev/null || true
        if [ -n "$2" ]; then action=try-restart; else action=start; fi
        deb-systemd-invoke $action straycat.service >/dev/null || true
    fi
    ;;
esac
exit 0
EOF
    cat >"$root/DEBIAN/prerm" <<'EOF'
#!/bin/sh
set -e
if [ -d /run/systemd/system ] && [ "$1" = remove ]; then
    deb-systemd-invoke stop straycat.socket straycat.service >/dev/null || true
fi
exit 0
EOF
    cat >"$root/DEBIAN/postrm" <<'EOF'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl --system daemon-reload >/dev/null || true
fi
if [ "$1" = remove ] && command -v deb-systemd-helper >/dev/null; then
    deb-systemd-helper mask straycat.service straycat.socket >/dev/null || true
fi
if [ "$1" = purge ]; then
    if command -v deb-systemd-helper >/dev/null; then
        deb-systemd-helper purge straycat.service straycat.socket >/dev/null || true
        deb-systemd-helper unmask straycat.service straycat.socket >/dev/null || true
    fi
    # StateDirectory= of a DynamicUser service lives under /var/lib/private.
    rm -rf /var/lib/private/straycat /var/lib/straycat
fi
exit 0
EOF
    chmod 0755 "$root/DEBIAN/postinst" "$root/DEBIAN/prerm" "$root/DEBIAN/postrm"

    deb=target/debian/straycat_${debversion}_$arch.deb
    dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
    echo "$deb: $(stat -c %s "$deb") bytes"
done
