#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the test suite on CPU. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh --with-extras
# shellcheck disable=SC1091
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || export DS_ACCELERATOR=cpu
# Both cores: two pytest workers, each test module kept on one worker (module fixtures built once).
# Extra arguments go after, so `-n 0` runs in one process.
exec python -m pytest -q -n "${TEST_WORKERS:-2}" --dist loadfile --durations=15 "$@"
