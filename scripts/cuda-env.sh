#!/usr/bin/env bash
# CUDA 13.0 toolchain from NVIDIA's PyPI wheels, for building `--features cuda` without a GPU
# (here and in CI). Idempotent: a second run only re-checks.
#
#   source scripts/cuda-env.sh       install if needed, then export CUDA_HOME, PATH,
#                                    CUDA_COMPUTE_CAP into this shell
#   scripts/cuda-env.sh check        cargo check --features cuda --all-targets
#   scripts/cuda-env.sh clippy       cargo clippy --features cuda --all-targets -- -D warnings
#   scripts/cuda-env.sh link         also install cuBLAS/cuRAND/NVRTC, make a link directory
#                                    (lib*.so symlinks + a libcuda.so stub) and build the release
#                                    binaries, tests and benches: what runs on a GPU host
#   scripts/cuda-env.sh stubtest     after link: run the linked test executables here, against
#                                    the stub driver (arguments go to each test executable):
#                                    everything but the #[ignore]d GPU tests runs for real
#   scripts/cuda-env.sh pack         link, then scripts/gpu-pack.sh (binaries into gpu-dist/)
#   scripts/cuda-env.sh build        the production build, what Dockerfile.cuda and CI run: the
#                                    release daemon with `--features cudnn`, then a runtime
#                                    tree (bin/popcon-worker + lib/: exactly the CUDA libraries
#                                    it needs, the driver excepted) that is checked to load
#   scripts/cuda-env.sh env          print the exports (for eval, or to see them)
# Extra arguments after the mode go to cargo (to the test executables for stubtest).
#
# Environment (all optional):
#   CUDA_VENV          the venv holding the wheels        (default: $REPO/.venv-cuda)
#   CUDA_TARGET_DIR    cargo target dir for CUDA builds   (default: $REPO/target/cuda)
#   CUDA_COMPUTE_CAP   PTX architecture, compute_NN       (default: 90, H100/H200)
#   PYTHON             interpreter that creates the venv  (default: python3)
#   CUDA_TOOLKIT       wheels (default) or system: use an installed CUDA 13.0 toolkit at
#                      CUDA_SYSTEM_HOME (default /usr/local/cuda) and the system's cuDNN
#                      instead of the wheels (NVIDIA's cudnn-devel images: Dockerfile.cuda).
#                      env, check, clippy and build; link, stubtest and pack need the wheels
#   CUDA_STAGE_DIR     build: where the runtime tree goes  (default: $CUDA_TARGET_DIR/release/cuda-stage)
#
# Why 13.0 exactly: PTX built by a newer nvcc does not load on a driver that supports only
# CUDA 13.0 (the GPU host's), and every wheel must be the same minor so nvcc, its crt/nvvm
# pieces and the headers agree. cuRAND has its own numbering: 10.4.0 is CUDA 13.0's.
#
# Why a stub libcuda: candle's `cuda` feature makes cudarc link libcuda (the driver) at build
# time. The driver is not a wheel and this machine has no GPU; a stub with the real soname
# (libcuda.so.1) satisfies the linker, and the GPU host's real driver library is loaded at run
# time in its place. The stub never runs.
#
# Why cuDNN 9.13.0: it is what NVIDIA's nvidia/cuda:13.0.1-cudnn-* images ship (Dockerfile.cuda),
# so CI links against the same cuDNN the image does. Change both together.

# --- settings ---------------------------------------------------------------------------------

_cuda_env_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_cuda_env_venv="${CUDA_VENV:-$_cuda_env_repo/.venv-cuda}"
_cuda_env_base=(
    'nvidia-cuda-nvcc==13.0.*'
    'nvidia-cuda-runtime==13.0.*'
    'nvidia-cuda-crt==13.0.*'
    'nvidia-nvvm==13.0.*'
    'nvidia-cuda-cccl==13.0.*'
)
_cuda_env_linklibs=(
    'nvidia-cublas==13.0.*'
    'nvidia-curand==10.4.0.*'
    'nvidia-cuda-nvrtc==13.0.*'
)
# cuDNN's wheel requires nvidia-cublas unpinned: repeat the pin so pip keeps 13.0.
_cuda_env_cudnnlibs=(
    'nvidia-cudnn-cu13==9.13.0.*'
    'nvidia-cublas==13.0.*'
)
_cuda_env_toolkit="${CUDA_TOOLKIT:-wheels}"

_cuda_env_say() { printf 'cuda-env: %s\n' "$*" >&2; }
_cuda_env_die() {
    printf 'cuda-env: ERROR: %s\n' "$*" >&2
    return 1
}

# --- install ----------------------------------------------------------------------------------

# pip-installs the given requirements into the venv unless a stamp says this exact set is there.
_cuda_env_pip() {
    local stamp="$_cuda_env_venv/.cuda-env-$1.stamp"
    shift
    local want
    want="$(printf '%s\n' "$@")"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        return 0
    fi
    _cuda_env_say "pip install into $_cuda_env_venv: $*"
    "$_cuda_env_venv/bin/python" -m pip install --disable-pip-version-check -q "$@" ||
        _cuda_env_die "pip install failed (needs PyPI): $*" || return 1
    printf '%s' "$want" >"$stamp"
}

_cuda_env_install_base() {
    if [[ ! -x "$_cuda_env_venv/bin/python" ]]; then
        _cuda_env_say "creating venv $_cuda_env_venv"
        "${PYTHON:-python3}" -m venv "$_cuda_env_venv" ||
            _cuda_env_die "could not create a venv with ${PYTHON:-python3} (apt-get install python3-venv?)" ||
            return 1
    fi
    _cuda_env_pip base "${_cuda_env_base[@]}"
}

# The wheels put everything under one tree, site-packages/nvidia/cu13: bin/nvcc (with
# nvcc.profile pointing at ../nvvm and ../include), bin/crt, nvvm/bin/cicc, include/ (with
# cccl/), lib/. That tree is a working CUDA_HOME as is; we only verify it.
_cuda_env_home() {
    local site
    site="$("$_cuda_env_venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" ||
        return 1
    printf '%s/nvidia/cu13' "$site"
}

_cuda_env_verify() {
    local home="$1" f
    for f in bin/nvcc bin/ptxas bin/crt/link.stub nvvm/bin/cicc nvvm/libdevice/libdevice.10.bc \
        include/cuda.h include/cuda_runtime.h include/cccl/cub/cub.cuh lib/libcudart.so.13; do
        [[ -e "$home/$f" ]] || _cuda_env_die "wheel layout changed: $home/$f is missing" || return 1
    done
    local version
    version="$("$home/bin/nvcc" --version | grep -o 'release [0-9.]*')" ||
        _cuda_env_die "$home/bin/nvcc does not run" || return 1
    [[ "$version" == "release 13.0" ]] ||
        _cuda_env_die "expected nvcc release 13.0, got '$version'" || return 1
}

_cuda_env_export() {
    local home
    home="$(_cuda_env_home)" || return 1
    export CUDA_HOME="$home"
    # cudarc's build script runs `nvcc --version` from PATH to pick its CUDA bindings, and
    # candle-kernels' finds nvcc there too: ours must come first.
    case ":$PATH:" in
    *":$home/bin:"*) ;;
    *) export PATH="$home/bin:$PATH" ;;
    esac
    # No GPU to probe here: name the target (H100/H200) instead of letting tools ask nvidia-smi.
    export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
}

# Each step checks its own status (`|| return 1`) rather than relying on `set -e`: errexit is
# off inside a function called from an `||` or `if`, and a sourced script must not set it in
# the caller's shell anyway.
_cuda_env_setup() {
    local home
    case "$_cuda_env_toolkit" in
    wheels) ;;
    system)
        _cuda_env_setup_system
        return
        ;;
    *) _cuda_env_die "CUDA_TOOLKIT=$_cuda_env_toolkit: expected wheels or system" || return 1 ;;
    esac
    _cuda_env_install_base || return 1
    home="$(_cuda_env_home)" || _cuda_env_die "the venv's python does not run" || return 1
    _cuda_env_verify "$home" || return 1
    _cuda_env_export
}

# An installed toolkit (NVIDIA's devel images): the same checks of nvcc's release, no venv.
_cuda_env_setup_system() {
    local home="${CUDA_SYSTEM_HOME:-/usr/local/cuda}" f version
    for f in bin/nvcc include/cuda.h include/cuda_runtime.h; do
        [[ -e "$home/$f" ]] ||
            _cuda_env_die "CUDA_TOOLKIT=system: $home/$f is missing (CUDA_SYSTEM_HOME?)" || return 1
    done
    version="$("$home/bin/nvcc" --version | grep -o 'release [0-9.]*')" ||
        _cuda_env_die "$home/bin/nvcc does not run" || return 1
    [[ "$version" == "release 13.0" ]] ||
        _cuda_env_die "expected nvcc release 13.0 at $home, got '$version'" || return 1
    export CUDA_HOME="$home"
    case ":$PATH:" in
    *":$home/bin:"*) ;;
    *) export PATH="$home/bin:$PATH" ;;
    esac
    export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
}

# --- link: a directory the linker can use ---------------------------------------------------

_cuda_env_link_dir() { printf '%s/link' "$_cuda_env_venv"; }

# lib*.so symlinks for every versioned library of the wheels (the linker looks for the
# unversioned name), and libcuda.so from the symbols in $dir/libcuda.syms.
_cuda_env_make_link_dir() {
    local dir so base
    dir="$(_cuda_env_link_dir)"
    mkdir -p "$dir" || return 1
    # cuDNN's wheel (build mode) has its own tree beside cu13/.
    for so in "$CUDA_HOME"/lib/lib*.so.* "$CUDA_HOME"/../cudnn/lib/lib*.so.*; do
        [[ -e "$so" ]] || continue
        base="$(basename "$so")"
        [[ "$base" == *.alt.* ]] && continue # the alternative NVRTC build; not the one we link
        ln -sfn "$so" "$dir/${base%%.so.*}.so" || return 1
        ln -sfn "$so" "$dir/$base" || return 1
    done
    touch "$dir/libcuda.syms" || return 1
    _cuda_env_build_stub "$dir"
}

# Seeds the symbol list with every driver function cudarc declares, so the first link usually
# succeeds; the link loop below adds whatever the linker still reports missing.
_cuda_env_seed_syms() {
    local dir="$1" src
    src="$(cd "$_cuda_env_repo" && cargo metadata --format-version 1 --features cuda 2>/dev/null |
        "$_cuda_env_venv/bin/python" -c '
import json, sys
for p in json.load(sys.stdin)["packages"]:
    if p["name"] == "cudarc":
        print(p["manifest_path"].rsplit("/", 1)[0] + "/src/driver/sys/mod.rs")
        break
')" || true
    if [[ -n "$src" && -f "$src" ]]; then
        # The names inside its `extern "C"` blocks are the exported symbol names.
        grep -oE '^[[:space:]]+fn cu[A-Z][A-Za-z0-9_]*\(' "$src" | grep -oE 'cu[A-Za-z0-9_]+' \
            >>"$dir/libcuda.syms" || true
    else
        _cuda_env_say "cudarc's driver bindings not found; the stub starts empty and grows from link errors"
    fi
}

_cuda_env_build_stub() {
    local dir="$1" c="$1/libcuda-stub.c"
    sort -u -o "$dir/libcuda.syms" "$dir/libcuda.syms" || return 1
    {
        echo '/* Link-time stand-in for the NVIDIA driver library; generated by scripts/cuda-env.sh.'
        echo '   Never loaded: the GPU host provides the real libcuda.so.1. Returns CUDA_ERROR_UNKNOWN. */'
        echo '/* A marker scripts/gpu-check.sh looks for, so the stub is never mistaken for a driver. */'
        echo 'const char popcon_libcuda_stub[] = "POPCON_LIBCUDA_STUB";'
        while read -r sym; do
            [[ -n "$sym" ]] && echo "int $sym(void) { return 999; }"
        done <"$dir/libcuda.syms"
    } >"$c" || return 1
    gcc -shared -fPIC -O0 -Wl,-soname,libcuda.so.1 -o "$dir/libcuda.so" "$c" ||
        _cuda_env_die "gcc could not build the libcuda stub" || return 1
    # For `stubtest` only: lets the test executables start here, where no driver exists.
    ln -sfn libcuda.so "$dir/libcuda.so.1"
}

_cuda_env_link() {
    _cuda_env_pip link "${_cuda_env_linklibs[@]}" || return 1
    _cuda_env_make_link_dir || return 1
    local dir log tries=0 missing
    dir="$(_cuda_env_link_dir)"
    if [[ ! -s "$dir/libcuda.syms" ]]; then
        _cuda_env_seed_syms "$dir" || return 1
        _cuda_env_build_stub "$dir" || return 1
    fi
    _cuda_env_say "libcuda stub: $(wc -l <"$dir/libcuda.syms") symbols; link dir $dir"
    log="$(mktemp)" || return 1
    while :; do
        tries=$((tries + 1))
        _cuda_env_say "cargo build --release --features cuda --bins --tests --benches (try $tries)"
        if RUSTFLAGS="${RUSTFLAGS:-} -L $dir" cargo build --release --features cuda \
            --bins --tests --benches "$@" 2>&1 | tee "$log" >&2; then
            break
        fi
        # GNU ld: undefined reference to `cuFoo'; lld: undefined symbol: cuFoo
        missing="$(grep -oE "(undefined reference to .|undefined symbol: )cu[A-Z][A-Za-z0-9_]*" "$log" |
            grep -oE 'cu[A-Z][A-Za-z0-9_]*$' | sort -u || true)"
        if [[ -z "$missing" || $tries -ge 3 ]]; then
            rm -f "$log"
            _cuda_env_die "the CUDA release build failed (see above)" || return 1
        fi
        _cuda_env_say "adding $(wc -l <<<"$missing") missing driver symbols to the stub"
        printf '%s\n' "$missing" >>"$dir/libcuda.syms"
        _cuda_env_build_stub "$dir" || return 1
    done
    rm -f "$log"
    _cuda_env_list_artifacts "$dir" "$@" || return 1
    _cuda_env_say "linked: $(wc -l <"$CARGO_TARGET_DIR/release/gpu-artifacts.tsv") executables listed in $CARGO_TARGET_DIR/release/gpu-artifacts.tsv; scripts/gpu-pack.sh bundles them"
}

# Asks cargo (a no-op build now) which executables it produced, and writes
# `kind-name<TAB>path` lines for scripts/gpu-pack.sh: bin-NAME, unit-lib-NAME (the library's
# unit tests), unit-bin-NAME, test-NAME (tests/), bench-NAME (benches/).
_cuda_env_list_artifacts() {
    local dir="$1"
    shift
    RUSTFLAGS="${RUSTFLAGS:-} -L $dir" cargo build --release --features cuda --bins --tests --benches \
        --message-format=json "$@" 2>/dev/null |
        "$_cuda_env_venv/bin/python" -c '
import json, sys
seen = set()
for line in sys.stdin:
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    exe = msg.get("executable")
    if msg.get("reason") != "compiler-artifact" or not exe:
        continue
    kinds, name = msg["target"]["kind"], msg["target"]["name"]
    is_test = msg["profile"]["test"]
    if "bench" in kinds:
        label = "bench-" + name
    elif "test" in kinds:
        label = "test-" + name
    elif is_test:
        label = "unit-" + ("bin" if "bin" in kinds else "lib") + "-" + name
    else:
        label = "bin-" + name
    if label not in seen:
        seen.add(label)
        print(label + "\t" + exe)
' >"$CARGO_TARGET_DIR/release/gpu-artifacts.tsv"
}

# --- build: the production binary and its runtime tree ---------------------------------------

# The one build Dockerfile.cuda runs, and CI with it: the release daemon with cuDNN, then
# $CUDA_STAGE_DIR/{bin,lib} holding it and the CUDA libraries it loads (RUNTIME-LIBS.tsv says
# which and why), checked to start from that tree alone.
#
# The link search path goes in LIBRARY_PATH (read by the gcc that rustc links through), not in
# RUSTFLAGS: RUSTFLAGS is part of every crate's fingerprint, and a `clippy --release --features
# cudnn` in the same target dir would otherwise compile everything, candle's kernels included,
# a second time.
_cuda_env_build() {
    local libpath stub tries=0 log missing
    if [[ "$_cuda_env_toolkit" == system ]]; then
        # cudarc finds the toolkit's lib64 (and its stubs/libcuda.so) from CUDA_HOME itself;
        # cuDNN comes from the system library path, where NVIDIA's cudnn images put it.
        libpath="$CUDA_HOME/lib64:$CUDA_HOME/lib64/stubs"
        stub="$CUDA_HOME/lib64/stubs/libcuda.so"
        [[ -f "$stub" ]] || _cuda_env_die "no driver stub at $stub" || return 1
    else
        _cuda_env_pip link "${_cuda_env_linklibs[@]}" || return 1
        _cuda_env_pip cudnn "${_cuda_env_cudnnlibs[@]}" || return 1
        _cuda_env_make_link_dir || return 1
        libpath="$(_cuda_env_link_dir)"
        if [[ ! -s "$libpath/libcuda.syms" ]]; then
            _cuda_env_seed_syms "$libpath" || return 1
            _cuda_env_build_stub "$libpath" || return 1
        fi
        stub="$libpath/libcuda.so"
    fi
    log="$(mktemp)" || return 1
    while :; do
        tries=$((tries + 1))
        _cuda_env_say "cargo build --release --features cudnn --bin popcon-worker ($_cuda_env_toolkit toolkit, try $tries)"
        if LIBRARY_PATH="$libpath${LIBRARY_PATH:+:$LIBRARY_PATH}" cargo build --release \
            --features cudnn --bin popcon-worker "$@" 2>&1 | tee "$log" >&2; then
            break
        fi
        missing=""
        if [[ "$_cuda_env_toolkit" == wheels ]]; then
            missing="$(grep -oE "(undefined reference to .|undefined symbol: )cu[A-Z][A-Za-z0-9_]*" "$log" |
                grep -oE 'cu[A-Z][A-Za-z0-9_]*$' | sort -u || true)"
        fi
        if [[ -z "$missing" || $tries -ge 3 ]]; then
            rm -f "$log"
            _cuda_env_die "the cuDNN release build failed (see above)" || return 1
        fi
        _cuda_env_say "adding $(wc -l <<<"$missing") missing driver symbols to the stub"
        printf '%s\n' "$missing" >>"$libpath/libcuda.syms"
        _cuda_env_build_stub "$libpath" || return 1
    done
    rm -f "$log"
    _cuda_env_stage "$CARGO_TARGET_DIR/release/popcon-worker" "$libpath" "$stub"
}

# The soname of a shared library (its file name if it has none).
_cuda_env_soname() {
    local name
    name="$(readelf -d "$1" 2>/dev/null | sed -n 's/.*(SONAME).*\[\(.*\)\]/\1/p')"
    printf '%s' "${name:-$(basename "$1")}"
}

# `soname<TAB>path` for every library ldd resolves for the given files (LD_LIBRARY_PATH as set
# by the caller); a library the loader cannot find is an error.
_cuda_env_ldd() {
    local out
    out="$(ldd "$@")" || _cuda_env_die "ldd failed on $*" || return 1
    if grep -q 'not found' <<<"$out"; then
        _cuda_env_die "unresolved libraries: $(grep 'not found' <<<"$out" | tr -s ' \t' ' ')" || return 1
    fi
    awk '$2 == "=>" && $3 ~ /^\// { print $1 "\t" $3 }' <<<"$out" | sort -u
}

# What a library name is at run time: `driver` (libcuda, libnvidia-*: the host's, mounted by
# the NVIDIA container toolkit), `cuda` (a CUDA library we ship) or `system` (the base image's).
_cuda_env_lib_kind() {
    case "$1" in
    libcuda.so* | libnvidia-*) echo driver ;;
    libcu* | libnv*) echo cuda ;;
    *) echo system ;;
    esac
}

_cuda_env_stage() {
    local bin="$1" libpath="$2" stub="$3"
    local stage
    stage="$(realpath -m "${CUDA_STAGE_DIR:-$CARGO_TARGET_DIR/release/cuda-stage}")" || return 1
    local stubdir="$CARGO_TARGET_DIR/release/driver-stub"
    local manifest soname path kind dir f extra=()
    declare -A ship=() seen=()
    # A directory with only the stub driver: lets the loader start the binary here.
    mkdir -p "$stubdir" || return 1
    cp -L "$stub" "$stubdir/libcuda.so.1" || return 1
    # Our own subfolders only: CUDA_STAGE_DIR may be a folder with other things in it.
    rm -rf "${stage:?}/bin" "${stage:?}/lib" || return 1
    mkdir -p "$stage/bin" "$stage/lib" || return 1
    manifest="$stage/RUNTIME-LIBS.tsv"
    printf 'kind\tsoname\tsource\n' >"$manifest" || return 1

    # What the binary links (ldd: transitively) ...
    local linked
    linked="$(LD_LIBRARY_PATH="$libpath:$stubdir" _cuda_env_ldd "$bin")" || return 1
    while IFS=$'\t' read -r soname path; do
        [[ -n "$soname" ]] || continue
        kind="$(_cuda_env_lib_kind "$soname")"
        seen[$soname]=1
        if [[ "$kind" == cuda ]]; then
            ship[$soname]="$path"
        else
            printf '%s\t%s\t%s\n' "$kind" "$soname" "$path" >>"$manifest"
        fi
    done <<<"$linked"
    # ... and what those load by name at run time (dlopen, invisible to ldd): libcudnn.so.9 is
    # a shim that loads its sub-libraries, and they load cuBLASLt (linked already) and NVRTC
    # (the binary itself does not link it); NVRTC loads its builtins.
    [[ -n "${ship[libcudnn.so.9]:-}" ]] ||
        _cuda_env_die "the binary does not link libcudnn.so.9: was it built with --features cudnn?" || return 1
    extra=("$(dirname "${ship[libcudnn.so.9]}")"/libcudnn_*.so.9)
    local dirs
    IFS=: read -ra dirs <<<"$libpath"
    for dir in "${dirs[@]}"; do
        [[ "$dir" == */stubs ]] || extra+=("$dir"/libnvrtc.so.[0-9]*)
    done
    for f in "${extra[@]}"; do
        [[ -e "$f" && "$f" != *.alt.* ]] || continue
        ship[$(_cuda_env_soname "$f")]="$f"
    done
    [[ -n "${ship[libnvrtc.so.13]:-}" ]] ||
        _cuda_env_die "libnvrtc.so.13 (loaded by cuDNN) not found in $libpath" || return 1
    for f in "$(dirname "${ship[libnvrtc.so.13]}")"/libnvrtc-builtins.so.*; do
        [[ -e "$f" && "$f" != *.alt.* ]] || continue
        ship[$(_cuda_env_soname "$f")]="$f"
    done
    # The dlopened libraries' own dependencies must be shipped or be the system's.
    linked="$(LD_LIBRARY_PATH="$libpath:$stubdir" _cuda_env_ldd "${ship[@]}")" || return 1
    while IFS=$'\t' read -r soname path; do
        [[ -n "$soname" && -z "${seen[$soname]:-}" && -z "${ship[$soname]:-}" ]] || continue
        seen[$soname]=1
        kind="$(_cuda_env_lib_kind "$soname")"
        if [[ "$kind" == cuda ]]; then
            ship[$soname]="$path"
        else
            printf '%s\t%s\t%s\n' "$kind" "$soname" "$path" >>"$manifest"
        fi
    done <<<"$linked"

    cp "$bin" "$stage/bin/popcon-worker" || return 1
    strip --strip-debug "$stage/bin/popcon-worker" || return 1
    for soname in $(printf '%s\n' "${!ship[@]}" | sort); do
        cp -L "${ship[$soname]}" "$stage/lib/$soname" || return 1
        printf 'cuda\t%s\t%s\n' "$soname" "$(readlink -f "${ship[$soname]}")" >>"$manifest"
    done
    {
        echo "git: $(git -C "$_cuda_env_repo" rev-parse --short HEAD 2>/dev/null || echo none)"
        echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m), $_cuda_env_toolkit toolkit"
        echo "nvcc: $(nvcc --version | grep -o 'release [0-9.]*, V[0-9.]*' || echo unknown)"
        echo "features: cudnn; CUDA_COMPUTE_CAP: $CUDA_COMPUTE_CAP"
    } >"$stage/BUILD.txt" || return 1

    # The check: from the tree and the stub driver alone, every library resolves inside the
    # tree (a CUDA library found elsewhere would be missing in the image), and the binary
    # starts. LD_LIBRARY_PATH is searched before the system's cache, so this holds even where
    # the toolkit is installed system-wide.
    linked="$(LD_LIBRARY_PATH="$stage/lib:$stubdir" _cuda_env_ldd "$stage/bin/popcon-worker" "$stage"/lib/*)" ||
        return 1
    while IFS=$'\t' read -r soname path; do
        [[ "$(_cuda_env_lib_kind "$soname")" == cuda && "$path" != "$stage/lib/"* ]] &&
            { _cuda_env_die "$soname resolves to $path, outside $stage/lib" || return 1; }
    done <<<"$linked"
    LD_LIBRARY_PATH="$stage/lib:$stubdir" "$stage/bin/popcon-worker" --version >&2 ||
        _cuda_env_die "the staged binary does not start" || return 1
    _cuda_env_say "runtime tree $stage: bin/popcon-worker ($(du -sh "$stage/bin" | cut -f1)), $(find "$stage/lib" -type f | wc -l) CUDA libraries in lib/ ($(du -sh "$stage/lib" | cut -f1)); $manifest"
}

# --- entry ------------------------------------------------------------------------------------

if [[ "${BASH_SOURCE[0]}" != "$0" ]]; then
    # Sourced: set up and export, without changing the caller's shell options.
    if _cuda_env_setup; then
        _cuda_env_say "CUDA_HOME=$CUDA_HOME CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP ($(nvcc --version | grep -o 'release [0-9.]*'))"
    else
        _cuda_env_say "setup failed; environment unchanged"
        return 1
    fi
    return 0
fi

set -euo pipefail
mode="${1:-env}"
shift || true
_cuda_env_setup
cd "$_cuda_env_repo"
export CARGO_TARGET_DIR="${CUDA_TARGET_DIR:-$_cuda_env_repo/target/cuda}"

case "$mode" in
link | stubtest | pack)
    [[ "$_cuda_env_toolkit" == wheels ]] ||
        _cuda_env_die "$mode works with the wheels only (CUDA_TOOLKIT=wheels)"
    ;;
esac
case "$mode" in
env)
    printf 'export CUDA_HOME=%q\nexport PATH=%q\nexport CUDA_COMPUTE_CAP=%q\n' \
        "$CUDA_HOME" "$PATH" "$CUDA_COMPUTE_CAP"
    ;;
check)
    _cuda_env_say "cargo check --features cuda --all-targets (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
    cargo check --features cuda --all-targets "$@"
    ;;
clippy)
    _cuda_env_say "cargo clippy --features cuda --all-targets (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
    cargo clippy --features cuda --all-targets "$@" -- -D warnings
    ;;
link)
    _cuda_env_link "$@"
    ;;
stubtest)
    list="$CARGO_TARGET_DIR/release/gpu-artifacts.tsv"
    [[ -s "$list" ]] || _cuda_env_die "no $list: run scripts/cuda-env.sh link first"
    status=0
    while IFS=$'\t' read -r name path; do
        case "$name" in unit-* | test-*) ;; *) continue ;; esac
        _cuda_env_say "$name against the stub driver"
        LD_LIBRARY_PATH="$(_cuda_env_link_dir)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "$path" "$@" ||
            status=1
    done <"$list"
    exit "$status"
    ;;
pack)
    _cuda_env_link "$@"
    "$_cuda_env_repo/scripts/gpu-pack.sh"
    ;;
build)
    _cuda_env_build "$@"
    ;;
*)
    _cuda_env_die "unknown mode '$mode' (env | check | clippy | link | stubtest | pack | build)"
    ;;
esac
