"""Fine-tuning toolkit for Baichuan2 chat models.

Importing the package registers our native Baichuan2 config, model and tokenizer with the
transformers Auto classes, so official checkpoint directories load with our code, never with
their outdated remote code.
"""

# The package's layers, lowest first: one folder each. A module imports only modules of its own folder
# or of folders before it, without cycles; model/ imports nothing else (its files are copied next to
# saved weights). tests/test_architecture.py reads this tuple and checks the import graph against it.
LAYERS = ("model", "core", "objectives", "data", "options", "checkpoints", "evaluation", "training", "tools", "builder", "cli")

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .model.configuration_baichuan import BaichuanConfig
from .model.modeling_baichuan import BaichuanForCausalLM
from .model.tokenization_baichuan import BaichuanTokenizer

AutoConfig.register("baichuan", BaichuanConfig, exist_ok=True)
AutoModelForCausalLM.register(BaichuanConfig, BaichuanForCausalLM, exist_ok=True)
AutoTokenizer.register(BaichuanConfig, slow_tokenizer_class=BaichuanTokenizer, exist_ok=True)

# save_pretrained then copies our self-contained modules next to the weights and writes auto_map,
# so saved directories load with trust_remote_code=True where this package is not installed.
BaichuanConfig.register_for_auto_class()
BaichuanForCausalLM.register_for_auto_class("AutoModelForCausalLM")
BaichuanTokenizer.register_for_auto_class("AutoTokenizer")

__all__ = ["BaichuanConfig", "BaichuanForCausalLM", "BaichuanTokenizer"]
