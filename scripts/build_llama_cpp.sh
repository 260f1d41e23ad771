#!/usr/bin/env bash
# Build llama.cpp's tools (llama-perplexity, llama-completion: the classic llama-cli, whose
# new llama-cli needs the server build; llama-bench, llama-quantize, llama-simple,
# llama-tokenize, llama-imatrix) from the llama.cpp sources vendored in the
# llama-cpp-python sdist, into
# ${LOWBIT_LLAMA_CPP_DIR:-~/.cache/lowbit/llama.cpp}. The export tests and
# benchmarks/gguf_export.py find the binaries there (or via LOWBIT_LLAMA_CPP_BIN).
# Takes a few minutes on 2 cores. Safe to run again: finished steps are skipped.
#
# LLAMA_CPP_ISA=avx2 builds the same tools with AVX2/FMA/F16C only (no AVX-512, no VNNI, no
# AMX) into $ROOT/bin-avx2, so an AVX-512 machine can time llama.cpp as an AVX2-only CPU runs
# it (benchmarks/decode_vs_llama_cpp.py --avx2-only uses it).
#
# AMX (Intel Xeons): GCC 12 miscompiles ggml/src/ggml-cpu/amx/mmq.cpp (llama-perplexity
# segfaults, llama-bench's prefill dies of SIGILL on quantized files). On a CPU with AMX and a
# GCC older than 13 the native build therefore uses clang where it is installed (Debian:
# apt install clang libomp-dev), telling ggml about AMX with the macros GCC defines and clang
# spells differently (__AMX_INT8__, __AMX_TILE__). Without clang it builds with GCC and AMX
# off (-mno-amx-*), with a warning: the tools work, but prefill runs without AMX.
set -euo pipefail
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
ROOT=${LOWBIT_LLAMA_CPP_DIR:-$HOME/.cache/lowbit/llama.cpp}
JOBS=${JOBS:-2}
HERE=$(cd "$(dirname "$0")/.." && pwd)
PIP=${PIP:-"$HERE/.venv/bin/python -m pip"}
mkdir -p "$ROOT"
cd "$ROOT"
SDIST=$(ls llama_cpp_python-"$VERSION".tar.gz 2>/dev/null || true)
if [ -z "$SDIST" ]; then
  $PIP download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$ROOT"
  SDIST=llama_cpp_python-"$VERSION".tar.gz
fi
SRC="$ROOT/llama_cpp_python-$VERSION"
[ -d "$SRC" ] || tar xzf "$SDIST"
cd "$SRC/vendor/llama.cpp"
case "${LLAMA_CPP_ISA:-native}" in
  native) BUILD=build; BIN=bin; ISA_FLAGS=(-DGGML_NATIVE=ON) ;;
  avx2) BUILD=build-avx2; BIN=bin-avx2
        ISA_FLAGS=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
                   -DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX_VNNI=OFF
                   -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF -DGGML_CPU_ALL_VARIANTS=OFF) ;;
  *) echo "LLAMA_CPP_ISA must be native or avx2, not '${LLAMA_CPP_ISA}'" >&2; exit 2 ;;
esac
GCC_MAJOR=$(${CC:-gcc} -dumpversion 2>/dev/null | cut -d. -f1)
if [ "$BUILD" = build ] && grep -qw amx_int8 /proc/cpuinfo && [ -z "${CC:-}" ] &&
   [ "${GCC_MAJOR:-0}" -lt 13 ] 2>/dev/null; then
  if command -v clang >/dev/null && command -v clang++ >/dev/null; then
    export CC=clang CXX=clang++
    BUILD=build-clang
    ISA_FLAGS+=("-DCMAKE_C_FLAGS=-D__AMX_INT8__ -D__AMX_TILE__"
                "-DCMAKE_CXX_FLAGS=-D__AMX_INT8__ -D__AMX_TILE__")
  else
    echo "warning: this CPU has AMX and GCC $GCC_MAJOR miscompiles llama.cpp's AMX kernels;" \
         "building without AMX (install clang and libomp-dev for an AMX build)" >&2
    BUILD=build-noamx
    ISA_FLAGS+=("-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
                "-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16")
  fi
fi
cmake -B "$BUILD" -DCMAKE_BUILD_TYPE=Release "${ISA_FLAGS[@]}" -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF
cmake --build "$BUILD" -j"$JOBS" \
  --target llama-perplexity llama-completion llama-bench llama-quantize llama-simple llama-tokenize \
  llama-imatrix
ln -sfn "$SRC/vendor/llama.cpp/$BUILD/bin" "$ROOT/$BIN"
echo "llama.cpp tools in $ROOT/$BIN:"
ls "$ROOT/$BIN"
