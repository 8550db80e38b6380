# cross/lib.sh: shared by the cross/ scripts (sourced, not run). Installs what the ARM builds
# need and sets cargo's per-target environment, for these builds only.
#
# Nothing foreign goes into dpkg: no `dpkg --add-architecture`, no `pkg:arm64` installs.
# apt installs native (amd64) packages only: Debian's rustc-web, the cross linkers, the
# `*-cross` C libraries (Architecture: all) and qemu-user. The one ARM piece, Rust's standard
# library for each target (libstd-rust-web-dev of arm64 and armhf, at exactly rustc-web's
# version: rustc refuses rlibs built by another compiler), is downloaded as a .deb, checked
# against the SHA256 of the index that lists it, and unpacked with `dpkg-deb -x` into a
# private sysroot under $CROSS_CACHE. cross/README.md says why this cannot break the way
# multiarch installs did.

# shellcheck shell=bash

CROSS_TARGETS=(aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf)

# Debian architecture of a Rust target triple.
deb_arch() {
    case "$1" in
        aarch64-unknown-linux-gnu) echo arm64 ;;
        armv7-unknown-linux-gnueabihf) echo armhf ;;
        x86_64-unknown-linux-gnu) echo amd64 ;;
        *) die "no Debian architecture known for $1" ;;
    esac
}

# GNU triple (the cross gcc's prefix, and /usr/<triple>, the tree the -cross packages fill).
gnu_triple() {
    case "$1" in
        aarch64-unknown-linux-gnu) echo aarch64-linux-gnu ;;
        armv7-unknown-linux-gnueabihf) echo arm-linux-gnueabihf ;;
        *) die "no GNU triple known for $1" ;;
    esac
}

# qemu-user binary that runs a Rust target triple.
qemu_for() {
    case "$1" in
        aarch64-unknown-linux-gnu) echo qemu-aarch64 ;;
        armv7-unknown-linux-gnueabihf) echo qemu-arm ;;
        *) die "no qemu known for $1" ;;
    esac
}

# Where qemu finds the target's loader and libraries (`qemu-* -L`, QEMU_LD_PREFIX): the tree
# of libc6-*-cross and libgcc-s1-*-cross. Its ld.so and libc.so come from one package
# (one glibc build), and with no multiarch libc on the machine there is nothing else for
# qemu's path lookup to fall back to, so the pair can never be mixed.
qemu_prefix() {
    echo "/usr/$(gnu_triple "$1")"
}

die() {
    echo "cross: $*" >&2
    exit 1
}

log() {
    echo "== $*" >&2
}

# Runs a command as root (sudo when we are not root).
as_root() {
    if [ "$(id -u)" = 0 ]; then
        "$@"
    else
        sudo "$@"
    fi
}

# Debian's compiler (the rustc-web package installs it as /usr/bin/rustc).
DEB_RUSTC=/usr/bin/rustc
# Native packages only. The gcc cross compilers pull in libc6-dev-*-cross and
# libgcc-s1-*-cross; they are named here because --no-install-recommends is used.
# dpkg-dev: package.sh's dpkg-shlibdeps. xz-utils: the Packages.xz indexes.
NATIVE_PACKAGES=(gcc-aarch64-linux-gnu gcc-arm-linux-gnueabihf libc6-dev-arm64-cross
    libc6-dev-armhf-cross libgcc-s1-arm64-cross libgcc-s1-armhf-cross qemu-user
    qemu-user-binfmt dpkg-dev xz-utils)
STD_PACKAGE=libstd-rust-web-dev

# The private sysroots, one folder per rustc-web version.
CROSS_CACHE=${STRAYCAT_CROSS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/straycat-cross}

# Installed version of a native package, empty if absent.
installed_version() {
    dpkg-query -W -f='${db:Status-Abbrev} ${Version}\n' "$1" 2>/dev/null |
        awk '$1 == "ii" { print $2 }'
}

# Candidate version apt would install, empty if apt knows none.
candidate_version() {
    apt-cache policy "$1" 2>/dev/null | awk '$1 == "Candidate:" && $2 != "(none)" { print $2 }'
}

# The sysroot (holding lib/rustlib/<target>/lib for both ARM targets) for rustc-web $1.
sysroot_for() {
    echo "$CROSS_CACHE/$1/usr"
}

# True when rustc-web, the native packages and both unpacked standard libraries are there at
# one version: then we touch neither apt nor the network.
toolchain_ready() {
    local v p
    v=$(installed_version rustc-web)
    [ -n "$v" ] && [ -x "$DEB_RUSTC" ] || return 1
    for p in "${NATIVE_PACKAGES[@]}"; do
        [ -n "$(installed_version "$p")" ] || return 1
    done
    for p in arm64 armhf; do
        [ -f "$CROSS_CACHE/$v/.unpacked-$p" ] || return 1
    done
}

# Runs apt-get "$@" as root with its output in a log file. On failure prints one line naming
# what apt could not do (its first "E:" line) and where the whole log is, and exits.
apt_quiet() {
    local out="$CROSS_CACHE/apt.log" err
    if as_root env DEBIAN_FRONTEND=noninteractive apt-get "$@" >"$out" 2>&1; then
        return 0
    fi
    err=$(grep -m1 -E '^(E|Err):|unmet dependencies|not installable' "$out" || tail -n 1 "$out")
    die "apt-get $1 failed: $err (check the mirror in /etc/apt/sources.list.d, run 'apt-get update', then retry; whole log: $out)"
}

# Downloads URL $1 to file $2, checked against SHA256 $3 when given (apt's own downloader:
# present on every Debian, honours apt's proxy settings). Root keeps the file (no _apt
# sandbox, which could not write into root's home).
download() {
    local sum=()
    [ -z "${3:-}" ] || sum=("SHA256:$3")
    /usr/lib/apt/apt-helper -o APT::Sandbox::User="$(id -un)" download-file "$1" "$2" "${sum[@]}" \
        >>"$CROSS_CACHE/download.log" 2>&1
}

# "SHA256 Size" of file $2 (e.g. main/binary-armhf/Packages.xz) in the Release file $1.
release_entry() {
    awk -v f="$2" '/^SHA256:/ { in_sha = 1; next } /^[^ ]/ { in_sha = 0 }
        in_sha && $3 == f { print $1, $2; exit }' "$1"
}

# "Filename SHA256" of package $2 at version $3 in the uncompressed Packages file $1.
index_entry() {
    awk -v p="$2" -v v="$3" 'BEGIN { RS = ""; FS = "\n" }
        {
            name = ""; ver = ""; file = ""; sha = ""
            for (i = 1; i <= NF; i++) {
                if ($i ~ /^Package: /) name = substr($i, 10)
                else if ($i ~ /^Version: /) ver = substr($i, 10)
                else if ($i ~ /^Filename: /) file = substr($i, 11)
                else if ($i ~ /^SHA256: /) sha = substr($i, 9)
            }
            if (name == p && ver == v) { print file, sha; exit }
        }' "$1"
}

# Downloads libstd-rust-web-dev for Debian architecture $1 at version $2 into $3, checked.
#
# The trust chain is apt's own: the Release file apt verified with the archive keyring during
# `apt-get update` (the suite that offers rustc-web $2) gives the SHA256 of the arch's
# Packages.xz; that index gives the SHA256 of the .deb. A mirror caught mid-sync may serve an
# index that does not match its Release file (seen: bookworm-security armhf); we then try
# the by-hash copy, and failing that use the index as served, saying so, and still check the
# .deb against it. If no index lists the version yet, the .deb comes from the pool path the
# amd64 package has (same source upload), and its control fields are checked instead.
fetch_std_deb() {
    local arch=$1 v=$2 deb=$3 origin base dist suite comp lists release entry idx_sha idx_size
    local idx="$CROSS_CACHE/Packages-$arch" file sha amd64_file
    origin=$(apt-cache madison rustc-web | awk -F' [|] ' -v v="$v" '$2 == v { print $3; exit }')
    read -r base dist _ <<<"$origin"
    suite=${dist%%/*} comp=${dist#*/}
    [ -n "$base" ] && [ -n "$suite" ] || die "apt does not say which suite offers rustc-web $v"
    lists=/var/lib/apt/lists/$(echo "$base/dists/$suite/" | sed -E 's|^[a-z]+://||; s|/|_|g')
    release=${lists}InRelease
    [ -f "$release" ] || release=${lists}Release
    [ -f "$release" ] || die "no Release file of $suite from apt-get update (looked for ${lists}InRelease)"
    entry=$(release_entry "$release" "$comp/binary-$arch/Packages.xz")
    [ -n "$entry" ] || die "$suite's Release file lists no $comp/binary-$arch/Packages.xz"
    read -r idx_sha idx_size <<<"$entry"
    local url="$base/dists/$suite/$comp/binary-$arch"
    rm -f "$idx.xz"
    if download "$url/by-hash/SHA256/$idx_sha" "$idx.xz" "$idx_sha" ||
        download "$url/Packages.xz" "$idx.xz" "$idx_sha"; then
        log "$suite $comp $arch index: matches the signed Release file"
    else
        download "$url/Packages.xz" "$idx.xz" ||
            die "could not download $url/Packages.xz (mirror down?); retry later"
        log "$suite $comp $arch index: the mirror serves $(stat -c %s "$idx.xz") bytes, its signed Release says $idx_size (mirror mid-sync); using it as served"
    fi
    xz -dc "$idx.xz" >"$idx" || die "$url/Packages.xz is not valid xz"
    read -r file sha <<<"$(index_entry "$idx" "$STD_PACKAGE" "$v")"
    rm -f "$idx" "$idx.xz" "$idx.xz.FAILED" "$deb"
    if [ -n "$file" ]; then
        log "downloading $STD_PACKAGE:$arch $v"
        download "$base/$file" "$deb" "$sha" ||
            die "could not download $base/$file with SHA256 $sha (mirror down or mid-sync?); retry later"
        return 0
    fi
    amd64_file=$(apt-cache show "$STD_PACKAGE=$v" 2>/dev/null | awk '/^Filename: / { print $2; exit }')
    [ -n "$amd64_file" ] || die "apt knows no $STD_PACKAGE $v for amd64 either"
    file=${amd64_file%_*.deb}_$arch.deb
    log "$STD_PACKAGE:$arch $v is not in the $arch index yet: fetching $file by its pool path"
    download "$base/$file" "$deb" ||
        die "$STD_PACKAGE:$arch $v is neither in the $arch index nor at $base/$file; retry once the mirror has synced"
    [ "$(dpkg-deb -f "$deb" Package Version Architecture | tr '\n' ' ')" = \
        "Package: $STD_PACKAGE Version: $v Architecture: $arch " ] ||
        die "$base/$file is not $STD_PACKAGE $v for $arch"
}

# Unpacks the standard library of Debian architecture $1 for rustc-web $2 into the sysroot.
unpack_std() {
    local arch=$1 v=$2 dir="$CROSS_CACHE/$2" deb tmp
    deb="$CROSS_CACHE/$STD_PACKAGE-$v-$arch.deb"
    fetch_std_deb "$arch" "$v" "$deb"
    tmp=$(mktemp -d "$dir/tmp-XXXXXX")
    dpkg-deb -x "$deb" "$tmp" || die "could not unpack $deb"
    mkdir -p "$dir/usr/lib/rustlib"
    # One target folder per architecture: the two unpack side by side.
    cp -a "$tmp"/usr/lib/rustlib/. "$dir/usr/lib/rustlib/"
    rm -rf "$tmp" "$deb"
    touch "$dir/.unpacked-$arch"
}

# Installs the toolchain, unless it is already there.
install_toolchain() {
    local v pkgs arch
    if dpkg --print-foreign-architectures 2>/dev/null | grep -qxE 'arm64|armhf'; then
        log "warning: dpkg has arm64/armhf multiarch (an earlier setup?); a multiarch libc6 there can be mixed with the cross loader under qemu: see cross/README.md"
    fi
    if toolchain_ready; then
        return 0
    fi
    command -v apt-get >/dev/null || die "needs Debian (apt-get) to install the cross toolchain"
    mkdir -p "$CROSS_CACHE"
    : >"$CROSS_CACHE/download.log"
    log "installing Debian's rustc-web, the cross linkers and qemu-user (native packages only)"
    # A failed index of some other suite or architecture must not stop us: the candidate
    # check below says whether what we need is there.
    as_root apt-get update >"$CROSS_CACHE/apt.log" 2>&1 ||
        log "apt-get update reported errors (see $CROSS_CACHE/apt.log); going on"
    v=$(candidate_version rustc-web)
    [ -n "$v" ] || die "apt offers no rustc-web (is bookworm-security or bookworm-updates in the sources?)"
    check_rust_version "$v"
    pkgs=("rustc-web=$v" "${NATIVE_PACKAGES[@]}")
    # A fresh machine may have no cargo at all: Debian's matches its rustc.
    command -v cargo >/dev/null || pkgs+=("cargo-web=$v")
    apt_quiet install -y --no-install-recommends "${pkgs[@]}"
    for arch in arm64 armhf; do
        [ -f "$CROSS_CACHE/$v/.unpacked-$arch" ] || { mkdir -p "$CROSS_CACHE/$v" && unpack_std "$arch" "$v"; }
    done
    # Older versions' sysroots are of no use to this rustc.
    find "$CROSS_CACHE" -mindepth 1 -maxdepth 1 -type d ! -name "$v" -exec rm -rf {} +
    toolchain_ready || die "toolchain install incomplete"
}

# Fails when Debian's rustc (package version $1, e.g. 1.96.0+dfsg1-1~deb12u2) is older than
# the crate's rust-version.
check_rust_version() {
    local need
    need=$(awk -F'"' '/^rust-version *=/ { print $2; exit }' Cargo.toml)
    [ -n "$need" ] || return 0
    if dpkg --compare-versions "${1%%+*}" lt "$need"; then
        die "Debian's rustc-web is $1, but Cargo.toml needs rust-version $need"
    fi
}

# Exports cargo's per-target settings: Debian's rustc, the private sysroot, the cross C
# compiler and linker, and qemu as the runner (so `cargo test --target …` runs the tests under emulation). Host
# artifacts (build scripts, proc macros) get neither the sysroot nor the linker: cargo
# applies CARGO_TARGET_<triple>_* to that target only.
cross_env() {
    local t up low sysroot
    export RUSTC=$DEB_RUSTC
    sysroot=$(sysroot_for "$(installed_version rustc-web)")
    for t in "${CROSS_TARGETS[@]}"; do
        up=$(echo "$t" | tr 'a-z-' 'A-Z_')
        low=$(echo "$t" | tr '-' '_')
        # ring (rustls' cryptography) compiles C and assembly for the target with the cc
        # crate, which reads CC_<triple> and AR_<triple>.
        export "CC_${low}=$(gnu_triple "$t")-gcc" "AR_${low}=$(gnu_triple "$t")-ar"
        export "CARGO_TARGET_${up}_LINKER=$(gnu_triple "$t")-gcc"
        export "CARGO_TARGET_${up}_RUNNER=$(qemu_for "$t") -L $(qemu_prefix "$t")"
        export "CARGO_TARGET_${up}_RUSTFLAGS=--sysroot=$sysroot"
    done
}

# GET $2 from 127.0.0.1:$1 with bash's /dev/tcp (a fresh Debian has no curl); prints the
# response.
http_get() {
    exec 3<>"/dev/tcp/127.0.0.1/$1" || return 1
    printf 'GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n' "$2" >&3
    timeout 5 cat <&3
    exec 3<&-
}

# Starts "$@" in the background, each "{port}" in its words replaced by a random port on
# 127.0.0.1 and its stderr in the file $1, until GET /health answers: at most 10 s a try
# and five ports (one may be taken). Sets the globals pid and port; fails when no try works.
start_healthy() {
    local log=$1 try p word args
    shift
    port=""
    for try in 1 2 3 4 5; do
        p=$((20000 + RANDOM % 30000))
        args=()
        for word in "$@"; do args+=("${word//\{port\}/$p}"); done
        "${args[@]}" 2>"$log" &
        pid=$!
        for _ in $(seq 100); do
            # Ours must still be running: another server may hold the port.
            if http_get "$p" /health 2>/dev/null | grep -q '"status":"ok"' &&
                kill -0 "$pid" 2>/dev/null; then
                port=$p
                return 0
            fi
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        pid=""
        echo "attempt $try on port $p failed:" >&2
        cat "$log" >&2
    done
    return 1
}
