"""Helpers shared by the tools' tests (merge, cli, web, server, evaluation, quantization)."""

import os
import socket
import subprocess
import sys
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
    from baichuan_finetune.generation import stream_reply

    reply = None
    for _, reply in stream_reply(model, tokenizer, messages, generation_config, **kwargs):
        pass
    return reply


@torch.no_grad()
def greedy_token_ids(model, prompt_ids: list[int], max_new_tokens: int, eos_id: int = 2) -> list[int]:
    """Greedy continuation by plain full forward passes (no cache, no ``generate``): a reference.

    Ends after ``max_new_tokens`` or at eos (not included); no repetition penalty.
    """
    from baichuan_finetune.loading import chat_model

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
