#!/usr/bin/env bash
# Prepares what tests/llm/run.sh needs, once, in a cache outside the work tree:
#
#   $STRAYCAT_LLM_CACHE (default ~/.cache/straycat-llm)/
#     dist/llama_cpp_python-0.3.36.tar.gz   the sdist, from PyPI (pip download)
#     venv/                                 python3 -m venv: llama-cpp-python[server] built
#                                           from that sdist, gguf, numpy, websockets
#     ggml-vocab-llama-spm.gguf             the Llama-2 vocabulary llama.cpp vendors in the
#                                           sdist for its tokenizer tests (vocab only)
#     tiny-stop-<hash>.gguf                 the test model make_model.py writes around it
#     tiny-nostop-<hash>.gguf               the same without an end (the long-turn check)
#
# Nothing comes from a model hub: the only downloads are PyPI packages. The first run builds
# llama.cpp (about 8 minutes on 2 cores); a run with everything present does nothing and
# takes a second or two. Each step is bounded by `timeout`; a failure is one line on stderr
# naming the step and its log, and exit code 1.
#
# Prints the two models' paths on stdout, one a line (run.sh reads them); the rest goes to
# stderr.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
CACHE="${STRAYCAT_LLM_CACHE:-$HOME/.cache/straycat-llm}"
LLAMA_VERSION=0.3.36
GGUF_VERSION=0.19.0
SDIST_NAME="llama_cpp_python-${LLAMA_VERSION}.tar.gz"
VOCAB_MEMBER="llama_cpp_python-${LLAMA_VERSION}/vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf"
PY="${STRAYCAT_LLM_PYTHON:-python3}"

mkdir -p "$CACHE/dist" "$CACHE/logs"
VENV="$CACHE/venv"
VPY="$VENV/bin/python"
STAMP="$VENV/.straycat-llm-ready-${LLAMA_VERSION}-${GGUF_VERSION}"

die() { echo "tests/llm/setup.sh: $*" >&2; exit 1; }
log() { echo "[llm setup] $*" >&2; }

# step NAME SECONDS LOGFILE CMD...: runs CMD with a time bound, its output in LOGFILE.
step() {
    local name="$1" secs="$2" logf="$3"
    shift 3
    local rc=0
    timeout --kill-after=10 "$secs" "$@" >"$logf" 2>&1 || rc=$?
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        die "$name took longer than ${secs}s and was stopped (log: $logf)"
    elif [ "$rc" != 0 ]; then
        die "$name failed with exit code $rc: $(grep -v '^\s*$' "$logf" | tail -n 1 | cut -c1-300) (log: $logf)"
    fi
}

command -v "$PY" >/dev/null 2>&1 || die "no $PY on PATH (set STRAYCAT_LLM_PYTHON)"
command -v timeout >/dev/null 2>&1 || die "no 'timeout' (coreutils) on PATH"

# 1. The sdist. `--no-binary llama-cpp-python` makes pip take the sdist of that package
# only; its build dependencies (scikit-build-core, cmake, ninja) come as wheels
# (`--no-binary :all:` would build cmake from source as well).
SDIST="$CACHE/dist/$SDIST_NAME"
if [ ! -s "$SDIST" ]; then
    log "downloading the llama-cpp-python $LLAMA_VERSION sdist from PyPI (~77 MB)"
    step "pip download llama-cpp-python==$LLAMA_VERSION" 600 "$CACHE/logs/download.log" \
        "$PY" -m pip download --disable-pip-version-check --no-deps \
        --no-binary llama-cpp-python -d "$CACHE/dist.tmp" "llama-cpp-python==$LLAMA_VERSION"
    [ -s "$CACHE/dist.tmp/$SDIST_NAME" ] || die "pip download gave no $SDIST_NAME (log: $CACHE/logs/download.log)"
    mv "$CACHE/dist.tmp/$SDIST_NAME" "$SDIST"
    rm -rf "$CACHE/dist.tmp"
fi

# 2. The vocabulary, from the sdist.
VOCAB="$CACHE/ggml-vocab-llama-spm.gguf"
if [ ! -s "$VOCAB" ]; then
    log "extracting the Llama-2 vocabulary from the sdist"
    tmp="$(mktemp -d "$CACHE/vocab.XXXXXX")"
    step "extracting $VOCAB_MEMBER" 120 "$CACHE/logs/vocab.log" \
        tar -xzf "$SDIST" -C "$tmp" "$VOCAB_MEMBER"
    mv "$tmp/$VOCAB_MEMBER" "$VOCAB"
    rm -rf "$tmp"
fi

# 3. The virtualenv. Ready only once the stamp is written, after every package imports.
if [ ! -f "$STAMP" ]; then
    if [ ! -x "$VPY" ]; then
        log "creating the virtualenv $VENV"
        rm -rf "$VENV"
        timeout --kill-after=10 300 "$PY" -m venv "$VENV" >"$CACHE/logs/venv.log" 2>&1 \
            && "$VPY" -m pip --version >/dev/null 2>&1 \
            || die "python3 -m venv failed (log: $CACHE/logs/venv.log; with Debian's own python3: apt-get install python3-venv)"
    fi
    log "installing gguf, numpy and websockets"
    step "pip install gguf numpy websockets" 600 "$CACHE/logs/pip-small.log" \
        "$VPY" -m pip install --disable-pip-version-check "gguf==$GGUF_VERSION" numpy websockets
    if ! "$VPY" -c 'import llama_cpp.server' >/dev/null 2>&1; then
        log "building llama-cpp-python[server] $LLAMA_VERSION from its sdist: about 8 minutes on 2 cores, the first time only (log: $CACHE/logs/pip-llama.log)"
        CMAKE_BUILD_PARALLEL_LEVEL="$(nproc 2>/dev/null || echo 2)" \
        step "pip install llama-cpp-python[server]==$LLAMA_VERSION" 2400 "$CACHE/logs/pip-llama.log" \
            "$VPY" -m pip install --disable-pip-version-check --no-binary llama-cpp-python \
            "llama-cpp-python[server] @ file://$SDIST"
    fi
    step "importing llama_cpp.server, gguf, numpy, websockets" 120 "$CACHE/logs/import.log" \
        "$VPY" -c 'import llama_cpp, llama_cpp.server.app, gguf, numpy, websockets.sync.client; print(llama_cpp.__version__)'
    touch "$STAMP"
fi

# 4. The models, named after make_model.py's hash, so an edit to it makes new ones: the
# test model, and the same without stop tokens (a turn that lasts until the context is full).
HASH="$(sha256sum "$HERE/make_model.py" | cut -c1-12)"
find "$CACHE" -maxdepth 1 -name 'tiny-*.gguf*' ! -name "tiny-*-$HASH.gguf" -delete
for kind in stop nostop; do
    model="$CACHE/tiny-$kind-$HASH.gguf"
    if [ ! -s "$model" ]; then
        log "writing the tiny model $model"
        extra=()
        [ "$kind" = nostop ] && extra=(--stop-every 0)
        step "make_model.py ($kind)" 300 "$CACHE/logs/model-$kind.log" \
            "$VPY" "$HERE/make_model.py" --vocab "$VOCAB" --out "$model.tmp" "${extra[@]}"
        mv "$model.tmp" "$model"
    fi
    echo "$model"
done
