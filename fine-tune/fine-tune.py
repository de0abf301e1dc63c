"""Fine-tune Baichuan2: `python fine-tune/fine-tune.py --help`, or a launcher (deepspeed, torchrun,
scripts/train.sh) running it once per process. All the logic lives in the package:
`baichuan_finetune.options.arguments` (the options) and `baichuan_finetune.training.train` (the run)."""

import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def _load(name: str):
    """A standard-library-only module of the package, loaded by its path: importing the package runs its
    __init__, which imports transformers (tens of seconds on a cold start)."""
    spec = importlib.util.spec_from_file_location(f"_fine_tune_{name}", os.path.join(HERE, "baichuan_finetune", "core", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    # Before torch, transformers and DeepSpeed load: library noise filtered (baichuan_finetune/core/quiet.py),
    # then a mistyped flag, existing checkpoints or a missing path reported at once, or our first line.
    _load("quiet").install()
    checks = _load("launch_checks")
    problem = checks.problem(sys.argv[1:])
    if problem is not None:
        if checks.is_main_local_process():
            print(f"{checks.PROG}: error: {problem}", file=sys.stderr, flush=True)
        sys.exit(2)
    checks.announce_start(sys.argv[1:])

    # Works from a source checkout too, without `pip install -e .`.
    sys.path.insert(0, HERE)
    from baichuan_finetune.training.launch_guard import exit_process
    from baichuan_finetune.training.train import main

    # Not sys.exit: once main() has destroyed the process group, leave without interpreter teardown,
    # where C++ threads of gloo could abort a finished rank ("terminate called without an active
    # exception"); see baichuan_finetune.training.launch_guard. Exceptions still end in a traceback as usual.
    exit_process(main())
