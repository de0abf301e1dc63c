"""Helpers shared by the tools' tests (merge, cli, web, server, evaluation, quantization)."""

import fcntl
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = REPO_ROOT / "scripts"


def make_lora_dir(base_dir: Path, out_dir: Path, seed: int = 0, scale: float = 0.5) -> Path:
    """A LoRA adapter on ``W_pack`` of the tiny model whose B weights are perturbed, so it matters."""
    import baichuan_finetune  # noqa: F401
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(base_dir))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["W_pack"], lora_dropout=0.0, task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    peft_model.save_pretrained(str(out_dir))
    AutoTokenizer.from_pretrained(str(base_dir)).save_pretrained(str(out_dir))
    # peft writes the in-memory name; point it at the tiny base explicitly, as training does.
    import json

    config_path = out_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = str(base_dir)
    config_path.write_text(json.dumps(config, indent=2))
    return out_dir


def generate_reply(model, tokenizer, messages: list[dict], generation_config=None, **kwargs):
    """The whole reply of ``generation.stream_reply`` (its last item)."""
    from baichuan_finetune.tools.generation import stream_reply

    reply = None
    for _, reply in stream_reply(model, tokenizer, messages, generation_config, **kwargs):
        pass
    return reply


@torch.no_grad()
def greedy_token_ids(model, prompt_ids: list[int], max_new_tokens: int, eos_id: int = 2) -> list[int]:
    """Greedy continuation by plain full forward passes (no cache, no ``generate``): a reference.

    Ends after ``max_new_tokens`` or at eos (not included); no repetition penalty.
    """
    from baichuan_finetune.tools.loading import chat_model

    base = chat_model(model)
    ids = list(prompt_ids)
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits = base(input_ids=torch.tensor([ids], device=base.device)).logits[0, -1]
        token = int(logits.argmax())
        if token == eos_id:
            break
        out.append(token)
        ids.append(token)
    return out


# Ports handed to servers and launchers under test: below Linux's ephemeral range (32768-60999), so
# the kernel never gives them to a bind(0) or an outgoing connection, and below 29500 (the default
# port of deepspeed and torchrun, e.g. a quickstart running beside the tests).
TEST_PORTS = range(20000, 29000)
PORT_LOCK_DIR = Path(tempfile.gettempdir()) / "baichuan-finetune-test-ports"
_held_port_locks: list = []  # open lock files: each port stays ours until this process exits


def free_port() -> int:
    """A TCP port on 127.0.0.1 that no other caller of ``free_port`` holds, in any process.

    Asking the kernel (bind to port 0, close, pass the number on) races: between the close and the
    server's own bind, another test (or another pytest run on the same machine) gets the same
    number. Here each port of ``TEST_PORTS`` is claimed with an exclusive ``flock`` on its own lock
    file, held until this process exits (the kernel releases it even on a crash, so nothing goes
    stale), and a port something else has bound (or that lingers in TIME_WAIT) is skipped.
    """
    PORT_LOCK_DIR.mkdir(exist_ok=True)
    for port in TEST_PORTS:
        lock = open(PORT_LOCK_DIR / f"{port}.lock", "a")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                lock.close()  # in use outside our lock files
                continue
        _held_port_locks.append(lock)
        return port
    raise RuntimeError(f"no free port left in {TEST_PORTS} (lock files in {PORT_LOCK_DIR})")


def script_env() -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def start_server(script: str, model_dir: Path, *extra: str, timeout: float = 90.0):
    """Start ``scripts/<script> --model DIR --port P`` on 127.0.0.1 and wait for ``/health``."""
    port = free_port()
    cmd = [sys.executable, str(SCRIPTS / script), "--model", str(model_dir), "--host", "127.0.0.1",
           "--port", str(port), *extra]
    proc = subprocess.Popen(cmd, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{script} exited with {proc.returncode}:\n{proc.stdout.read()}")
        try:
            with urllib.request.urlopen(base_url + "/health", timeout=2) as response:
                if response.status == 200:
                    return proc, base_url
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"{script} not ready after {timeout}s:\n{proc.stdout.read()}")


def stop_server(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def require(module: str, reason: str):
    try:
        return __import__(module)
    except ImportError:
        pytest.skip(f"{module} is not installed: {reason}")
