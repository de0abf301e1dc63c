#!/usr/bin/env bash
# The whole toolkit in one command, on a CPU machine (a few minutes on 2 cores):
#   1. set up .venv (scripts/setup.sh; fast when already done),
#   2. build the tiny Baichuan2 (models/tiny) and the quickstart data (data/quickstart.json) if missing,
#   3. LoRA fine-tune with DeepSpeed ZeRO-3 on 2 processes (scripts/train_lora.sh),
#   4. reload the adapter with peft's AutoPeftModelForCausalLM in a fresh process that cannot import
#      this package, and chat (greedy): question, expected answer, model answer.
# Environment: NPROC (processes, default 2), OUTPUT_DIR (default output/quickstart-lora).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate

export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    export DS_ACCELERATOR=cpu
fi
NPROC="${NPROC:-2}"
OUTPUT_DIR="${OUTPUT_DIR:-output/quickstart-lora}"
start=$SECONDS

[[ -f models/tiny/config.json ]] || python scripts/make_tiny_model.py --output_dir models/tiny
[[ -f data/quickstart.json ]] || python scripts/make_quickstart_data.py --output data/quickstart.json

# Larger LoRA than the official defaults (r 1 on W_pack): the tiny model starts from random weights
# and must learn the whole task through its adapters in a minute or two.
bash scripts/train_lora.sh --num_gpus "$NPROC" \
    --deepspeed ds_config.json \
    --model_name_or_path models/tiny \
    --data_path data/quickstart.json \
    --output_dir "$OUTPUT_DIR" --overwrite_output_dir True \
    --model_max_length 512 --packing True \
    --num_train_epochs 30 --per_device_train_batch_size 1 \
    --learning_rate 5e-3 --lr_scheduler_type cosine --warmup_ratio 0.03 --weight_decay 0.0 \
    --lora_r 32 --lora_alpha 64 --lora_dropout 0.0 --lora_target_modules all-linear \
    --logging_steps 20 --save_strategy no --report_to none --disable_tqdm True \
    --bf16 False

echo
echo "== Chat with the adapter, reloaded in a fresh process (greedy decoding) =="
python - "$OUTPUT_DIR" data/quickstart.json <<'EOF'
import sys

sys.modules["baichuan_finetune"] = None  # prove the output loads without this package

import json

from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer, GenerationConfig

out, data_path = sys.argv[1], sys.argv[2]
model = AutoPeftModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
greedy = GenerationConfig(max_new_tokens=32, do_sample=False, temperature=None, top_k=None, top_p=None,
                          repetition_penalty=1.0, pad_token_id=0,
                          bos_token_id=1, eos_token_id=2, user_token_id=195, assistant_token_id=196)

# Questions taken from the training data (the task is to memorise this small world), asked in two
# multi-turn chats of at most 3 rounds, as in the data: each answer goes back into the history as
# the model gave it.
answers = {}
for record in json.load(open(data_path, encoding="utf-8")):
    turns = record["conversations"]
    for q, a in zip(turns[0::2], turns[1::2]):
        answers.setdefault(q["value"], a["value"])
questions = [q for q in answers if not q.startswith(("Hello", "你好"))]
chats = [[questions[i] for i in (0, 7, 19)], [questions[i] for i in (42, 77)]]

correct = total = 0
for number, chat in enumerate(chats, 1):
    print(f"-- chat {number}")
    messages = []
    for question in chat:
        messages.append({"role": "user", "content": question})
        reply = model.chat(tokenizer, messages, generation_config=greedy).strip()
        messages.append({"role": "assistant", "content": reply})
        ok = reply == answers[question]
        correct, total = correct + ok, total + 1
        print(f"Q: {question}\n   expected: {answers[question]}\n   model:    {reply}   "
              f"[{'ok' if ok else 'differs'}]")
print(f"{correct}/{total} answers exactly as in the training data")
EOF
echo "quickstart done in $((SECONDS - start)) s (adapter in $OUTPUT_DIR)"
