#!/usr/bin/env bash
# Create .venv if missing and install the pinned requirements and this package (editable).
# Idempotent and fast when nothing changed: a stamp records the hash of requirements.txt and
# pyproject.toml. Used by scripts/quickstart.sh, scripts/test.sh and .ci/run.
# Environment: PYTHON (default python3), TORCH_INDEX_URL (e.g. https://download.pytorch.org/whl/cpu).
# --with-extras: also the tools/quantization/export extras and Debian's chromium (what the full test
# suite needs; scripts/test.sh passes it). llama-cpp-python comes from the portable wheel kept under
# tests/fixtures/wheels/ (see its SOURCES.md) instead of an 11-minute source build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

extras=()
if [[ "${1:-}" == "--with-extras" ]]; then
    extras=(requirements-tools.txt requirements-quant.txt requirements-export.txt)
    bash scripts/install_browser.sh || echo "setup: WARNING: chromium could not be installed; the browser test will skip" >&2
fi

PYTHON="${PYTHON:-python3}"
if [[ ! -x .venv/bin/python ]]; then
    echo "setup: creating .venv with $($PYTHON --version 2>&1)"
    "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate

stamp=".venv/.baichuan-finetune-setup"
want="$(cat requirements.txt pyproject.toml "${extras[@]}" | sha256sum | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] && python -c "import importlib.util as u, sys; sys.exit(u.find_spec('baichuan_finetune') is None)" 2>/dev/null; then
    exit 0
fi

torch_pin="$(grep -E '^torch==' requirements.txt)"
if ! python -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '${torch_pin#torch==}' else 1)" 2>/dev/null; then
    echo "setup: installing $torch_pin"
    python -m pip install --quiet "$torch_pin" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
echo "setup: installing requirements.txt and this package (editable)"
python -m pip install --quiet -r requirements.txt
llama_wheel=(tests/fixtures/wheels/llama_cpp_python-*.whl)
if [[ ${#extras[@]} -gt 0 && -f "${llama_wheel[0]}" ]]; then
    echo "setup: installing ${llama_wheel[0]}"
    python -m pip install --quiet --no-deps "${llama_wheel[0]}"
fi
for extra in "${extras[@]}"; do
    echo "setup: installing $extra"
    python -m pip install --quiet -r "$extra"
done
python -m pip install --quiet -e . --no-deps
echo "$want" >"$stamp"
