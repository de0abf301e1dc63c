"""Baichuan2 sentencepiece tokenizer for current transformers.

Self-contained: this file is copied next to saved weights so that
``AutoTokenizer.from_pretrained(dir, trust_remote_code=True)`` works without our package.

Plain text encodes exactly as ``sentencepiece.encode(text)``: no bos/eos (the official config has
``add_bos_token``/``add_eos_token`` false), no normalisation, and literal ``</s>``, ``<s>``,
``<unk>`` in text stay text (``split_special_tokens`` is on), never control ids.
"""

import os
import shutil
from typing import Any

import sentencepiece as spm
from transformers import PreTrainedTokenizer

VOCAB_FILES_NAMES = {"vocab_file": "tokenizer.model"}
# Ids that text must never produce inside a turn: unk, bos, eos and the user/assistant role tokens.
CONTROL_IDS = frozenset({0, 1, 2, 195, 196})


def encode_plain_texts(sp_model: spm.SentencePieceProcessor, texts: list[str]) -> list[list[int]]:
    """Sentencepiece ids of each text, with role/control ids replaced by byte pieces.

    The real vocabulary maps the literal strings ``<reserved_106>``/``<reserved_107>`` to the role
    ids 195/196. Such a piece is re-encoded as the byte pieces ``<0xNN>`` of its text, so user
    data can never forge a turn boundary; it still decodes to the same text. Every other text
    encodes exactly as ``sp_model.encode``.
    """
    encoded = sp_model.encode(texts)
    for n, ids in enumerate(encoded):
        if not CONTROL_IDS.isdisjoint(ids):
            encoded[n] = respell_control_pieces(sp_model, texts[n])
    return encoded


def respell_control_pieces(sp_model: spm.SentencePieceProcessor, text: str) -> list[int]:
    """``sp_model.encode(text)`` with each CONTROL_IDS piece spelled as the byte pieces of its span.

    The span comes from the text itself (not the piece's name), so an unknown character that
    became ``<unk>`` keeps its own bytes. Needs a vocabulary with byte pieces.
    """
    raw = text.encode("utf-8")
    out: list[int] = []
    for piece in sp_model.encode(text, return_type="proto").pieces:
        if piece.id in CONTROL_IDS:
            out.extend(sp_model.piece_to_id(f"<0x{b:02X}>") for b in raw[piece.begin : piece.end])
        else:
            out.append(piece.id)
    return out


class BaichuanTokenizer(PreTrainedTokenizer):
    """Sentencepiece tokenizer with the Baichuan2 id layout (pad/unk 0, bos 1, eos 2)."""

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str,
        unk_token: str = "<unk>",
        bos_token: str = "<s>",
        eos_token: str = "</s>",
        pad_token: str | None = "<unk>",
        sp_model_kwargs: dict[str, Any] | None = None,
        add_bos_token: bool = False,
        add_eos_token: bool = False,
        clean_up_tokenization_spaces: bool = False,
        **kwargs,
    ):
        self.vocab_file = vocab_file
        self.sp_model_kwargs = sp_model_kwargs or {}
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        # The official tokenizer set sp_model after super().__init__, which reads the vocabulary:
        # that is the "'BaichuanTokenizer' object has no attribute 'sp_model'" failure since 4.34.
        self.sp_model = spm.SentencePieceProcessor(**self.sp_model_kwargs)
        self.sp_model.Load(vocab_file)
        # Text is never split on special-token strings: "</s>" written by a user is text.
        kwargs.setdefault("split_special_tokens", True)
        super().__init__(
            unk_token=unk_token,
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            add_bos_token=add_bos_token,
            add_eos_token=add_eos_token,
            sp_model_kwargs=self.sp_model_kwargs,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **kwargs,
        )

    def __getstate__(self):
        state = self.__dict__.copy()
        state["sp_model"] = None
        state["sp_model_proto"] = self.sp_model.serialized_model_proto()
        return state

    def __setstate__(self, state):
        proto = state.pop("sp_model_proto")
        self.__dict__.update(state)
        self.sp_model = spm.SentencePieceProcessor(**self.sp_model_kwargs)
        self.sp_model.LoadFromSerializedProto(proto)

    @property
    def vocab_size(self) -> int:
        return self.sp_model.get_piece_size()

    def get_vocab(self) -> dict[str, int]:
        vocab = {self.sp_model.id_to_piece(i): i for i in range(self.vocab_size)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def encode_plain_text(self, text: str) -> list[int]:
        """Ids of user text that can never contain role or control ids (see ``encode_plain_texts``)."""
        return encode_plain_texts(self.sp_model, [text])[0]

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return self.sp_model.encode(text, out_type=str)

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp_model.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp_model.id_to_piece(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        # Control pieces decode to "" in sentencepiece; keep special tokens visible as text.
        out, pending = [], []
        for token in tokens:
            if token in self.all_special_tokens:
                out.append(self.sp_model.decode(pending))
                out.append(token)
                pending = []
            else:
                pending.append(token)
        out.append(self.sp_model.decode(pending))
        return "".join(out)

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        output = bos + token_ids_0 + eos
        if token_ids_1 is not None:
            output = output + bos + token_ids_1 + eos
        return output

    def get_special_tokens_mask(
        self,
        token_ids_0: list[int],
        token_ids_1: list[int] | None = None,
        already_has_special_tokens: bool = False,
    ) -> list[int]:
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        bos = [1] if self.add_bos_token else []
        eos = [1] if self.add_eos_token else []
        mask = bos + [0] * len(token_ids_0) + eos
        if token_ids_1 is not None:
            mask = mask + bos + [0] * len(token_ids_1) + eos
        return mask

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        if not os.path.isdir(save_directory):
            raise ValueError(f"Vocabulary path ({save_directory}) should be a directory")
        out_file = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + "tokenizer.model")
        if os.path.abspath(self.vocab_file) != os.path.abspath(out_file) and os.path.isfile(self.vocab_file):
            shutil.copyfile(self.vocab_file, out_file)
        elif not os.path.isfile(self.vocab_file):
            with open(out_file, "wb") as f:
                f.write(self.sp_model.serialized_model_proto())
        return (out_file,)
