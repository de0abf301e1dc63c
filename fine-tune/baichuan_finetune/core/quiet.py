"""Library messages that tell our users nothing, filtered in one place.

Every entry point calls `install()` before it imports the libraries (``fine-tune.py`` first thing;
the tools through ``arguments``, which every tool imports via ``loading`` -> ``preflight``). Each
filter matches one known message exactly and says why it is dropped; anything else a library says
is still shown. Standard library only, so installing costs nothing.
"""

from __future__ import annotations

import logging
import warnings


class _DropMessages(logging.Filter):
    """Drops a logger's records whose message starts with one of `prefixes`."""

    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def _drop(logger_name: str, prefix: str) -> None:
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, _DropMessages) and f.prefixes == (prefix,) for f in logger.filters):
        logger.addFilter(_DropMessages(prefix))


def install() -> None:
    """Add the filters below; calling it again is harmless (warnings filters are re-added, since
    ``warnings.catch_warnings`` blocks, pytest's among them, restore the list they found)."""

    # bitsandbytes (imported by peft, which transformers imports for TrainingArguments, so on every
    # run and tool whenever requirements-quant.txt is installed) warns at import on CPUs with
    # avx512_bf16 that an optional faster 4-bit CPU kernel (the `kernels` package) is missing. Its own
    # CPU kernel is used instead; nothing is wrong, and most runs never use 4-bit at all. A filter on
    # the logger works before bitsandbytes exists: getLogger returns the same object to it later.
    _drop("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community")

    # transformers warns when a generation config holds sampling values (temperature, top_p) with
    # do_sample=False. The official Baichuan2 generation_config.json does exactly that and our tools
    # pass do_sample explicitly per request, so the warning would show on every load of every model.
    _drop("transformers.generation.configuration_utils", "The following generation flags are not valid")

    # transformers 5 renamed is_gradient_checkpointing to is_activation_checkpointing; the Trainer
    # and peft still read the old name every run. Not our code, nothing for the user to change.
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)

    # DeepSpeed's ZeRO calls these torch.distributed functions every step (not our code either).
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated", category=FutureWarning)

    # The official command line uses --gradient_checkpointing, an alias transformers 5 still accepts
    # (our --activation_checkpointing is the same flag); it should not warn on the official recipe.
    warnings.filterwarnings("ignore", message="`gradient_checkpointing.*` is deprecated", category=FutureWarning)
