# cross/lib.sh: shared by the cross/ scripts (sourced, not run). Installs Debian's Rust
# cross toolchain and sets cargo's per-target environment, for these builds only.
#
# Why Debian's compiler: rustup can't fetch target standard libraries here (no internet but
# the package registries), so the ARM builds use Debian's `rustc-web` with the matching
# `libstd-rust-web-dev:<arch>` (same version, or rustc refuses the rlibs). Host builds keep
# whatever `rustc` is on PATH: we only set `RUSTC` in the environment of the cargo commands
# below, never in a .cargo/config.

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

# GNU triple (the cross gcc's prefix and the sysroot under /usr) of a Rust target triple.
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

# Debian's cross compiler (the rustc-web package installs it as /usr/bin/rustc).
DEB_RUSTC=/usr/bin/rustc
# libc6 and libgcc-s1 of arm64 and armhf are what the binaries run on under qemu (see
# QEMU_SYSROOT); the -cross packages are what the cross linkers link against.
CROSS_PACKAGES=(gcc-aarch64-linux-gnu gcc-arm-linux-gnueabihf libc6-dev-arm64-cross
    libc6-dev-armhf-cross libc6:arm64 libc6:armhf libgcc-s1:arm64 libgcc-s1:armhf qemu-user)

# Where qemu-user finds the ARM dynamic loader and libraries: the root, i.e. Debian's
# multiarch libc6:arm64 / libc6:armhf (/lib/ld-linux-aarch64.so.1, /lib/aarch64-linux-gnu/).
# Not /usr/<gnu triple>: that tree has the cross packages' ld.so (2.36-8cross1) but not every
# library, so qemu's path lookup falls back to the multiarch libc.so (2.36-9+deb12uN); that
# mixed pair of ld.so and libc corrupts the loader's stack cache list and the first
# pthread_create spins forever (aarch64) or segfaults (armv7).
QEMU_SYSROOT=/

# Installed version of a package, empty if absent.
installed_version() {
    dpkg-query -W -f='${db:Status-Abbrev} ${Version}\n' "$1" 2>/dev/null |
        awk '$1 == "ii" { print $2 }'
}

# Candidate version apt would install, empty if apt knows none.
candidate_version() {
    apt-cache policy "$1" 2>/dev/null | awk '$1 == "Candidate:" && $2 != "(none)" { print $2 }'
}

# True when rustc-web and both target standard libraries are installed at one version, and
# the cross linkers and qemu are there: then we don't touch apt at all.
toolchain_ready() {
    local v p
    v=$(installed_version rustc-web)
    [ -n "$v" ] || return 1
    for p in libstd-rust-web-dev:arm64 libstd-rust-web-dev:armhf; do
        [ "$(installed_version "$p")" = "$v" ] || return 1
    done
    for p in "${CROSS_PACKAGES[@]}"; do
        [ -n "$(installed_version "$p")" ] || return 1
    done
    [ -x "$DEB_RUSTC" ]
}

# Where the workaround for a stale index keeps its files.
CROSS_STATE=${CROSS_STATE:-/var/cache/straycat-cross}

# `apt-get update`, surviving one stale index on the mirror.
#
# A mirror caught mid-sync serves a Packages file whose size or hash differs from its
# (signed) Release file. apt then refuses that index *and rolls the whole suite back*, so one
# stale architecture (here bookworm-security armhf) hides the suite's updates for every
# architecture (rustc-web for amd64 and arm64 included). We re-update each affected suite
# without the broken architectures (a one-off source list, leaving the other lists alone),
# and remember where the broken index lives: `fetch_unindexed` can use it later.
# The mirror's host name comes from apt's own error message, never from this script.
apt_update_robust() {
    local out failed line url base suite comp arch arches a good list
    out=$(mktemp)
    as_root apt-get update 2>&1 | tee "$out" >&2 || true
    failed=$(grep -oE '^E: Failed to fetch [^ ]+' "$out" | awk '{ print $5 }' | sort -u || true)
    rm -f "$out"
    as_root mkdir -p "$CROSS_STATE/debs"
    # apt-helper downloads as the _apt user when it can.
    if id _apt >/dev/null 2>&1; then as_root chown _apt "$CROSS_STATE" "$CROSS_STATE/debs"; fi
    as_root rm -f "$CROSS_STATE/stale-indexes"
    [ -n "$failed" ] || return 0
    arches=$( (dpkg --print-architecture; dpkg --print-foreign-architectures) | sort -u)
    while read -r url; do
        # <base>/dists/<suite>/<component>/binary-<arch>/Packages.xz (or a by-hash path)
        [[ $url =~ ^(.*)/dists/([^/]+)/(.+)/binary-([^/]+)/ ]] ||
            die "apt-get update failed on $url (not a Packages index; network down?)"
        base=${BASH_REMATCH[1]} suite=${BASH_REMATCH[2]} comp=${BASH_REMATCH[3]}
        arch=${BASH_REMATCH[4]}
        log "stale index on the mirror: $suite/$comp $arch; re-updating $suite without $arch"
        echo "$base $suite $comp $arch $url" | as_root tee -a "$CROSS_STATE/stale-indexes" >/dev/null
    done <<<"$failed"
    # One re-update per suite, with every architecture that did not fail.
    awk '{ print $1, $2 }' "$CROSS_STATE/stale-indexes" | sort -u | while read -r base suite; do
        good=""
        for a in $arches; do
            grep -q "^$base $suite [^ ]* $a " "$CROSS_STATE/stale-indexes" || good="$good${good:+,}$a"
        done
        [ -n "$good" ] || continue
        list=$(mktemp)
        awk -v b="$base" -v s="$suite" '$1 == b && $2 == s { print $3 }' \
            "$CROSS_STATE/stale-indexes" | sort -u | while read -r comp; do
            echo "deb [arch=$good] $base $suite $comp"
        done >"$list"
        as_root apt-get update -o Dir::Etc::sourcelist="$list" -o Dir::Etc::sourceparts=- \
            -o APT::Get::List-Cleanup=0 >&2 || die "apt-get update of $suite without the stale index failed"
        rm -f "$list"
    done
}

# "Version|Filename|SHA256|Pre-Depends, Depends" of package $1 in the Packages stanzas on
# stdin (the first stanza naming it).
stanza_summary() {
    awk -v p="$1" 'BEGIN { RS = ""; FS = "\n" }
        {
            name = ""; v = ""; f = ""; h = ""; d = ""
            for (i = 1; i <= NF; i++) {
                if ($i ~ /^Package: /) name = substr($i, 10)
                else if ($i ~ /^Version: /) v = substr($i, 10)
                else if ($i ~ /^Filename: /) f = substr($i, 11)
                else if ($i ~ /^SHA256: /) h = substr($i, 9)
                else if ($i ~ /^(Pre-)?Depends: /) d = d (d == "" ? "" : ", ") substr($i, index($i, " ") + 1)
            }
            if (name == p) { print v "|" f "|" h "|" d; exit }
        }'
}

# Prints the .deb files (downloaded into $CROSS_STATE/debs) that `apt-get install` needs,
# besides what apt finds itself, to install package $2 at version $3 for architecture $1
# when that architecture's index of some suite was stale on the mirror.
#
# We walk the dependencies: a package whose version in the stale index (what the mirror
# serves, in practice the previous sync) is newer than anything apt knows for $1, or that apt
# doesn't know for $1 at all, is downloaded from the pool. That keeps Multi-Arch: same
# libraries in step with the host's copies, which came from the same suite. Each .deb is
# checked against the SHA256 the stale index lists; that index itself could not be checked
# against the signed Release file (that is the whole problem), so it is trusted as served.
fetch_unindexed() {
    local arch=$1 want_pkg=$2 want_ver=$3 base suite comp a url idx item name want
    local cand stale ver file sha deps dep seen=" " queue
    read -r base suite comp a url < <(awk -v a="$arch" '$4 == a' "$CROSS_STATE/stale-indexes" | head -n 1) ||
        die "apt has no $want_pkg:$arch=$want_ver and no stale index was recorded for $arch"
    idx="$CROSS_STATE/Packages-$suite-$arch"
    as_root /usr/lib/apt/apt-helper download-file "$url" "$idx.download" >&2 ||
        die "could not download $url"
    case "$url" in
        *.xz) as_root sh -c "xz -dc '$idx.download' > '$idx'" ;;
        *.gz) as_root sh -c "gzip -dc '$idx.download' > '$idx'" ;;
        *) as_root cp "$idx.download" "$idx" ;;
    esac
    queue=("$want_pkg=$want_ver")
    while [ ${#queue[@]} -gt 0 ]; do
        item=${queue[0]}
        queue=("${queue[@]:1}")
        name=${item%%=*} want=${item#*=}
        [[ $seen == *" $name "* ]] && continue
        seen="$seen$name "
        cand=$(candidate_version "$name:$arch")
        stale=$(stanza_summary "$name" <"$idx")
        if [ -n "$stale" ] && { [ -z "$cand" ] || dpkg --compare-versions "${stale%%|*}" gt "$cand"; }; then
            IFS='|' read -r ver file sha deps <<<"$stale"
            log "fetching $name:$arch $ver outside apt's index (stale on the mirror)"
            as_root /usr/lib/apt/apt-helper download-file "$base/$file" \
                "$CROSS_STATE/debs/${file##*/}" "SHA256:$sha" >&2 || die "could not download $base/$file"
            echo "$CROSS_STATE/debs/${file##*/}"
        elif [ -n "$cand" ]; then
            ver=$cand
            deps=$(apt-cache show "$name:$arch=$cand" 2>/dev/null | stanza_summary "$name")
            deps=${deps##*|}
        else
            die "$name:$arch is neither known to apt nor in the stale index"
        fi
        [ -z "$want" ] || [ "$ver" = "$want" ] || die "found $name:$arch $ver, need $want"
        # "a (>= 1), b | c, d:any (= 2)": the first alternative of each; keep "=" pins.
        IFS=',' read -ra deps <<<"$deps"
        for dep in "${deps[@]}"; do
            dep=${dep%%|*}
            dep=$(echo "$dep" | sed -E 's/^ +//; s/ +$//')
            [ -n "$dep" ] || continue
            name=${dep%% *} name=${name%:any}
            want=""
            [[ $dep =~ \(=\ ([^\)]+)\) ]] && want=${BASH_REMATCH[1]}
            queue+=("$name=$want")
        done
    done
}

# Installs the cross toolchain with apt, unless it is already there.
install_toolchain() {
    local v pkgs debs arch have list
    if toolchain_ready; then
        return 0
    fi
    command -v apt-get >/dev/null || die "needs Debian (apt-get) to install the cross toolchain"
    log "installing Debian's Rust cross toolchain (rustc-web), cross linkers, qemu-user"
    as_root dpkg --add-architecture arm64
    as_root dpkg --add-architecture armhf
    apt_update_robust
    v=$(candidate_version rustc-web)
    [ -n "$v" ] || die "apt offers no rustc-web"
    check_rust_version "$v"
    pkgs=("rustc-web=$v" "${CROSS_PACKAGES[@]}")
    debs=()
    for arch in arm64 armhf; do
        have=$(apt-cache madison "libstd-rust-web-dev:$arch" 2>/dev/null | awk -v v="$v" '$3 == v')
        if [ -n "$have" ]; then
            pkgs+=("libstd-rust-web-dev:$arch=$v")
        else
            list=$(mktemp)
            fetch_unindexed "$arch" libstd-rust-web-dev "$v" >"$list" ||
                die "could not fetch libstd-rust-web-dev:$arch $v"
            mapfile -t -O "${#debs[@]}" debs <"$list"
            rm -f "$list"
        fi
    done
    # A fresh machine may have no cargo at all: Debian's matches its rustc.
    command -v cargo >/dev/null || pkgs+=("cargo-web=$v")
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        "${pkgs[@]}" "${debs[@]}" >&2
    toolchain_ready || die "toolchain install incomplete (rustc-web and libstd-rust-web-dev versions differ?)"
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

# Exports cargo's per-target settings: Debian's rustc, the cross linker, and qemu as the
# runner (so `cargo test --target …` runs the tests under emulation).
cross_env() {
    local t up gnu
    export RUSTC=$DEB_RUSTC
    for t in "${CROSS_TARGETS[@]}"; do
        up=$(echo "$t" | tr 'a-z-' 'A-Z_')
        gnu=$(gnu_triple "$t")
        export "CARGO_TARGET_${up}_LINKER=$gnu-gcc"
        export "CARGO_TARGET_${up}_RUNNER=$(qemu_for "$t") -L $QEMU_SYSROOT"
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
