"""LoRA and QLoRA set-up: wrap a loaded base model with trainable adapters (peft)."""

from __future__ import annotations

from ..options.arguments import LoraArguments, UsageError
from ..model.specs_baichuan import ALL_LINEAR, LINEAR_LAYER_NAMES


def check_targets(model, targets: str | list[str]) -> None:
    """`UsageError` naming every ``--lora_target_modules`` entry that is no module of `model`.

    The flag's names were checked against Baichuan2's when parsed (`plan.parse_lora_targets`); this
    catches a model directory whose modules are named otherwise.
    """
    if targets == ALL_LINEAR:
        return
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        raise UsageError(f"--lora_target_modules: no module named {', '.join(missing)} in the model "
                         f"(Baichuan2 has {', '.join(LINEAR_LAYER_NAMES)})")


def add_lora(model, lora: LoraArguments, quantized: bool, activation_checkpointing: bool, report: bool = False):
    """`model` as a ``PeftModel`` whose only trainable weights are LoRA adapters on `lora`'s targets.

    `quantized`: the base was loaded in 4 bits (QLoRA) and gets peft's k-bit training preparation.
    `report`: print the trainable parameter count (on the main process only).
    """
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(model, activation_checkpointing)
    targets = lora.target_modules
    check_targets(model, targets)
    if activation_checkpointing:
        model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        target_modules=targets,
        inference_mode=False,
        r=lora.lora_r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
    )
    model = get_peft_model(model, config)
    if report:
        model.print_trainable_parameters()
    return model
