#!/usr/bin/env bash
# Build the portable llama-cpp-python wheel that scripts/setup.sh installs for the GGUF export tests
# (tests/tools/test_export.py), so a fresh machine skips the 11-minute source build.
# Portable: GGML_NATIVE=OFF (AVX2/FMA/F16C, no -march=native), no multimodal library. Slim: the wheel
# keeps only the four libraries llama_cpp loads (by the names it and their RUNPATH=$ORIGIN look up);
# scikit-build's copies under lib/ and include/ and the versioned duplicates are left out.
# Usage: bash scripts/build_llama_cpp_wheel.sh [OUT_DIR]   (default tests/fixtures/wheels)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="$(realpath -m "${1:-tests/fixtures/wheels}")"
version="$(grep -E '^llama-cpp-python==' requirements-export.txt | cut -d= -f3)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF" \
    python -m pip wheel --no-cache-dir --no-deps -w "$work" "llama-cpp-python==$version"
python - "$work"/llama_cpp_python-*.whl "$out" <<'PY'
import base64, hashlib, sys, zipfile
from pathlib import Path

source, out = Path(sys.argv[1]), Path(sys.argv[2])
keep_libs = {"libllama.so", "libggml.so.0", "libggml-base.so.0", "libggml-cpu.so.0"}
out.mkdir(parents=True, exist_ok=True)
target = out / source.name
records = []
with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target.with_suffix(".tmp"), "w", zipfile.ZIP_DEFLATED) as zout:
    for info in zin.infolist():
        name = info.filename
        if name.endswith("/RECORD") or not name.startswith(("llama_cpp/", "llama_cpp_python-")):
            continue
        if name.startswith("llama_cpp/lib/") and Path(name).name not in keep_libs:
            continue
        data = zin.read(name)
        zout.writestr(info, data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        records.append(f"{name},sha256={digest},{len(data)}")
    record = next(n for n in zin.namelist() if n.endswith(".dist-info/RECORD"))
    zout.writestr(record, "\n".join(records + [f"{record},,"]) + "\n")
target.with_suffix(".tmp").rename(target)
print(f"{target}: {target.stat().st_size / 2**20:.1f} MiB")
PY
