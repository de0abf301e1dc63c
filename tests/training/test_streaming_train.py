"""--streaming end to end: 2 processes, ZeRO-3, --stage pt on a weighted mix read by 2 dataloader workers per
process, SIGKILLed mid-stream after a checkpoint, then resumed: the resumed steps' losses equal those the run
logged before it was killed (the same batches, from the stream position saved in the checkpoint).

The shards, the packing and the resume position are checked in this process by tests/data/test_streaming.py;
this is the one multi-process run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from test_train import BIN, FINE_TUNE, RUN_TIMEOUT, common_flags, env, free_port, run, work  # noqa: F401

SAVE_AT, KILL_AFTER, STEPS = 3, 5, 6

# fine-tune's main() with a callback that, once step KILL_AFTER's loss is logged on rank 0, writes the log
# history where the test waits for it and then hangs, so that the test kills a run certainly mid-stream.
HANGING_MAIN = textwrap.dedent(f"""
    import json, os, sys, time
    sys.path.insert(0, {str(FINE_TUNE.parent)!r})
    from transformers import TrainerCallback
    from baichuan_finetune.training.train import main

    class Hang(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.global_step == {KILL_AFTER} and "loss" in (logs or {{}}) and os.environ.get("RANK") == "0":
                path = os.environ["LOG_HISTORY"]
                with open(path + ".tmp", "w") as f:
                    json.dump(state.log_history, f)
                os.replace(path + ".tmp", path)
                time.sleep(3600)

    sys.exit(main(sys.argv[1:], callbacks=[Hang()]))
""")


def corpus(work: Path) -> str:
    """Two raw-text sources of different formats, weighted: documents short and long (split into pieces)."""
    a, b = work / "stream-a.txt", work / "stream-b.jsonl"
    a.write_text("".join(f"Document {i} of the first source: " + "the river runs east " * (i % 23) + "\n"
                         for i in range(120)))
    b.write_text("".join(json.dumps({"text": f"Record {i}: " + "红色的花 and a long tail " * (i % 31)}) + "\n"
                         for i in range(80)))
    return f"{a}:0.6,{b}:0.4"


def test_two_process_zero3_streaming_killed_mid_stream_resumes_with_the_same_losses(tiny_model_dir, env, work):
    out = work / "streaming"
    flags = [*common_flags(tiny_model_dir, corpus(work), out), "--stage", "pt", "--streaming", "True",
             "--mix_strategy", "interleave_over", "--model_max_length", "64", "--dataloader_num_workers", "2",
             "--max_steps", str(STEPS), "--save_steps", str(SAVE_AT)]
    launch = [BIN / "deepspeed", "--num_gpus", "2", "--master_port"]
    script = work / "hanging_streaming_main.py"
    script.write_text(HANGING_MAIN)
    history = work / "streaming-history.json"
    log = work / "streaming-killed.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen([str(c) for c in [*launch, free_port(), script, *flags]],
                                env={**env, "LOG_HISTORY": str(history)}, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + RUN_TIMEOUT
    try:
        while not history.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the run never logged step {KILL_AFTER} (exit {proc.poll()}):\n{log.read_text()[-4000:]}")
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    text = log.read_text()
    assert "Data (--streaming: estimated from the first 1000 documents of each source" in text
    killed = {h["step"]: h["loss"] for h in json.loads(history.read_text()) if "loss" in h}
    assert sorted(killed) == list(range(1, KILL_AFTER + 1))
    checkpoint = out / f"checkpoint-{SAVE_AT}"
    assert (checkpoint / "checkpoint_complete.json").is_file()
    positions = [json.loads((checkpoint / f"stream_state-rank{r}.json").read_text()) for r in (0, 1)]
    assert [p["rank"] for p in positions] == [0, 1] and all(p["batches"] == SAVE_AT for p in positions)

    proc = run([*launch, free_port(), FINE_TUNE, *flags, "--resume_from_checkpoint", "True"], env)
    assert f"Resuming from {checkpoint}" in proc.stdout + proc.stderr
    resumed = {h["step"]: h["loss"] for h in json.loads((out / "trainer_state.json").read_text())["log_history"]
               if "loss" in h}
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(SAVE_AT + 1, KILL_AFTER + 1):  # trained again after the resume: the same batches
        assert resumed[step] == pytest.approx(killed[step], rel=1e-6, abs=1e-6), (step, killed, resumed)
    assert (out / "model.safetensors").is_file()
