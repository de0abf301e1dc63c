"""What every benchmark shares: its inputs in ``../shared``, and one way to print and record its figures.

A benchmark makes one ``Report`` once its arguments are parsed. The report prints the exact command
line and the machine (CPU model, cores, torch version, device, load average) first, then each result
table as markdown (the shape docs/benchmarks.md records), and with ``--json PATH`` (``add_json_argument``)
writes all of it to one JSON record at the end::

    parser = argparse.ArgumentParser(...)
    common.add_json_argument(parser)
    args = parser.parse_args()
    report = common.Report(args)                  # prints "command: ..." and "machine: ..."
    report.table(["mode", "GiB"], [["naive", 9.67]], title="peak RSS growth")
    report.finish(results=raw)                    # writes args.json when given

Benchmarks that measure each mode in a fresh process run themselves again with ``--_mode`` through
``run_child`` and read the one JSON line it prints last; ``rss_bytes`` is the resident memory now.

Run from a source checkout with the project's venv active (``. .venv/bin/activate``): the package is
installed there (editable), and ``python benchmarks/<name>.py`` finds this module next to the script.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
TOKENIZER = SHARED / "baichuan2" / "tokenizer.model"
DATA = SHARED / "data" / "medicalgpt_sharegpt_zh_1k.jsonl"

# Environment variables that change a benchmark's figures; printed in front of the command when set.
_ENV_IN_COMMAND = ("OMP_NUM_THREADS", "DS_ACCELERATOR", "CUDA_VISIBLE_DEVICES", "ATEN_CPU_CAPABILITY")


def rss_bytes() -> int:
    """Resident memory of this process now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (``ru_maxrss``)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_child(script: str, args: Sequence[str]) -> dict:
    """Run ``script`` again in a fresh process with ``args``; the JSON object of its last output line."""
    out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def add_json_argument(parser) -> None:
    parser.add_argument("--json", metavar="PATH", help="also write the command, machine and results to this file")


def command_line() -> str:
    """The command as typed from the repository root, with the environment variables that matter."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(REPO_ROOT)
    except ValueError:
        pass
    env = [f"{name}={shlex.quote(os.environ[name])}" for name in _ENV_IN_COMMAND if name in os.environ]
    return " ".join([*env, "python", shlex.join([str(script), *sys.argv[1:]])])


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str = "cpu") -> dict:
    """CPU model and cores, torch version, the device the figures come from, load average."""
    try:
        import torch

        torch_version = torch.__version__
        if device == "cuda" and torch.cuda.is_available():
            device = f"cuda ({torch.cuda.get_device_name()})"
    except ImportError:
        torch_version = "absent"
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch_version, "device": device,
            "python": platform.python_version(), "load_average": [round(x, 2) for x in os.getloadavg()]}


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-2 or abs(value) >= 1e6 else f"{value:,.3f}".rstrip("0").rstrip(".")
    return str(value).replace("|", "\\|")


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """``| a | b |`` lines with a ``|---|`` rule; strings are printed as given, floats to 3 decimals."""
    lines = ["| " + " | ".join(_cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


class Report:
    """Prints a benchmark's command, machine and tables, and records them for ``--json``."""

    def __init__(self, args=None, device: str = "cpu") -> None:
        self.started = time.perf_counter()
        self.path = getattr(args, "json", None)
        self.record: dict = {"benchmark": Path(sys.argv[0]).stem, "command": command_line(),
                             "machine": machine(device), "args": dict(vars(args)) if args is not None else {},
                             "tables": [], "lines": []}
        m = self.record["machine"]
        print(f"command: {self.record['command']}")
        print(f"machine: {m['cpu']}, {m['cores']} cores; torch {m['torch']}; device {m['device']}; "
              f"load average {' '.join(f'{x:.2f}' for x in m['load_average'])}", flush=True)

    def line(self, text: str = "") -> None:
        """Print one line of the output and keep it in the record."""
        print(text, flush=True)
        self.record["lines"].append(text)

    def table(self, columns: Sequence[str], rows: Iterable[Sequence[Any]], title: str | None = None) -> None:
        """Print a markdown table (after a blank line, and its title and a blank line, when given); keep it."""
        rows = [list(row) for row in rows]
        print()
        if title:
            print(title + "\n")
        print(markdown_table(columns, rows), flush=True)
        self.record["tables"].append({"title": title, "columns": list(columns), "rows": rows})

    def finish(self, **results: Any) -> None:
        """Write the record to ``--json PATH`` when given, with ``results`` (any JSON-able values) added."""
        self.record["seconds"] = round(time.perf_counter() - self.started, 1)
        self.record.update(results)
        if self.path:
            Path(self.path).write_text(json.dumps(self.record, indent=2, default=str) + "\n")
            print(f"recorded: {self.path}")
