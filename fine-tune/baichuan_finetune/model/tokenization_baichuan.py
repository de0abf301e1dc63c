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

from .specs_baichuan import ASSISTANT_ID, BOS_ID, EOS_ID, PAD_ID, USER_ID

VOCAB_FILES_NAMES = {"vocab_file": "tokenizer.model"}

# ----- the chat format: the one owner of turn layout and safe text encoding -----
#
# The ids (pad, bos, eos, user 195, assistant 196) are specs_baichuan's; the layout is described there.
# ``ids(text)`` never contains a role or control id (see ``PlainTextEncoder``), so no text can forge a
# turn boundary.

# Ids that text must never produce inside a turn: unk, bos, eos and the user/assistant role tokens.
CONTROL_IDS = frozenset({PAD_ID, BOS_ID, EOS_ID, USER_ID, ASSISTANT_ID})
USER = "user"
ASSISTANT = "assistant"
SYSTEM = "system"
ROLE_IDS = {USER: USER_ID, ASSISTANT: ASSISTANT_ID}


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


class PlainTextEncoder:
    """Batched sentencepiece encoding of text that never yields a CONTROL_IDS id.

    The real vocabulary maps the literal strings ``<reserved_106>``/``<reserved_107>`` to the role
    ids 195/196. Such a piece is re-encoded as the byte pieces ``<0xNN>`` of its text, so user text
    can never forge a turn boundary; it still decodes to the same text. Every other text encodes
    exactly as ``sp_model.encode``. Training data, chat prompts and evaluation all encode through
    this one policy.
    """

    def __init__(self, sp_model: spm.SentencePieceProcessor):
        self.sp = sp_model
        size = sp_model.get_piece_size()
        # Only user-defined pieces can be matched from raw text; control pieces (<s>, </s>) never are.
        self._control_strings = [
            sp_model.id_to_piece(i)
            for i in sorted(CONTROL_IDS)
            if i < size and not (sp_model.is_control(i) or sp_model.is_unknown(i))
        ]
        self._has_byte_pieces = all(sp_model.is_byte(sp_model.piece_to_id(f"<0x{b:02X}>")) for b in range(256))
        # Without byte fallback, characters outside the vocabulary become unk (0).
        byte_fallback = self._has_byte_pieces and sp_model.encode("\U0010fffd")[0] != sp_model.unk_id()
        self._can_emit_unk = not byte_fallback

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Ids of each text; raises ``ValueError`` where a control id cannot be avoided (no byte pieces)."""
        texts = list(texts)
        ids = self.sp.encode(texts, num_threads=1)
        # Cheap scans first: the safe path is rare and slow (one proto per text).
        suspects: set[int] = set()
        for s in self._control_strings:
            suspects.update(i for i, text in enumerate(texts) if s in text)
        if self._can_emit_unk:
            suspects.update(i for i, x in enumerate(ids) if PAD_ID in x)
        for i in suspects:
            ids[i] = self._encode_safely(texts[i])
        return ids

    def _encode_safely(self, text: str) -> list[int]:
        if self._has_byte_pieces:
            return respell_control_pieces(self.sp, text)
        raw = text.encode("utf-8")
        for piece in self.sp.encode(text, return_type="proto").pieces:
            if piece.id in CONTROL_IDS:
                raise ValueError(
                    f"text {raw[piece.begin:piece.end].decode('utf-8', 'replace')!r} would encode to special id "
                    f"{piece.id} and this tokenizer has no byte pieces <0xNN> to spell it"
                )
        return self.sp.encode(text)


def encode_text(tokenizer, text: str) -> list[int]:
    """Ids of one text in the chat format's safe encoding; any other tokenizer's plain ``encode``."""
    encode = getattr(tokenizer, "encode_plain_text", None)
    return encode(text) if encode is not None else tokenizer.encode(text, add_special_tokens=False)


def turn_ids(role: str, text_ids: list[int]) -> list[int]:
    """One turn in the official layout: its role token, then its text."""
    return [ROLE_IDS[role], *text_ids]


def build_chat_input(tokenizer, messages: list[dict], max_input_tokens: int | None = None) -> list[int]:
    """Prompt ids in the official chat format, as ``model.chat()`` sends them.

    ``messages`` are ``{"role": "system"|"user"|"assistant", "content": str}``; a system message may
    only come first. Its text comes first (no role token); each user message is ``[195] + ids``, each
    assistant message ``[196] + ids``; ``196`` is appended when the last message is not the
    assistant's. With ``max_input_tokens`` (the official rule: ``model_max_length - max_new_tokens``),
    whole rounds are dropped oldest first, the newest round is always kept, then the prompt is cut
    from the left. Raises ``ValueError`` on an unknown role or a misplaced system message.
    """
    system, rounds, current = "", [], []
    for i, message in enumerate(messages):
        role, content = message["role"], message["content"]
        if role == SYSTEM:
            if i != 0:
                raise ValueError("a system message may only come first")
            system = content
            continue
        if role not in ROLE_IDS:
            raise ValueError(f"unknown role {role!r} (expected system, user or assistant)")
        if role == USER and current:
            rounds.append(current)
            current = []
        current.append(message)
    if current:
        rounds.append(current)

    system_ids = encode_text(tokenizer, system) if system else []
    budget = None if max_input_tokens is None else max_input_tokens - len(system_ids)
    history: list[int] = []
    for round_messages in reversed(rounds):
        round_ids: list[int] = []
        for message in round_messages:
            round_ids.extend(turn_ids(message["role"], encode_text(tokenizer, message["content"])))
        if budget is not None and history and len(history) + len(round_ids) > budget:
            break
        history = round_ids + history
        if budget is not None and len(history) >= budget:
            break
    input_ids = system_ids + history
    if not messages or messages[-1]["role"] != ASSISTANT:
        input_ids.append(ASSISTANT_ID)
    if max_input_tokens is not None and max_input_tokens > 0:
        input_ids = input_ids[-max_input_tokens:]
    return input_ids


def chat_template(user_piece: str = "<reserved_106>", assistant_piece: str = "<reserved_107>") -> str:
    """The chat format as a Jinja ``chat_template`` for ``tokenizer.apply_chat_template``.

    Built from this module's layout (system text first, no role token; ``USER_ID`` + user text;
    ``ASSISTANT_ID`` + assistant text; ``ASSISTANT_ID`` to ask for a reply), so it cannot drift from
    `build_chat_input`. The template outputs text; the role pieces are user-defined sentencepiece
    pieces, which the tokenizer maps back to 195/196 (``split_special_tokens`` only concerns the
    added special tokens bos/eos/unk). Two differences from `build_chat_input`, documented in
    docs/deploy.md: a role-piece string typed inside a message becomes a role id here (a text template
    cannot respell it), and there is no truncation to ``model_max_length - max_new_tokens``.
    """
    return (
        "{%- for message in messages -%}"
        "{%- if message['role'] == '" + SYSTEM + "' -%}"
        "{%- if not loop.first -%}{{ raise_exception('a system message may only come first') }}{%- endif -%}"
        "{{ message['content'] }}"
        "{%- elif message['role'] == '" + USER + "' -%}"
        "{{ '" + user_piece + "' + message['content'] }}"
        "{%- elif message['role'] == '" + ASSISTANT + "' -%}"
        "{{ '" + assistant_piece + "' + message['content'] }}"
        "{%- else -%}"
        "{{ raise_exception('unknown role ' + message['role'] + ' (expected system, user or assistant)') }}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt and (messages | length == 0 or messages[-1]['role'] != '" + ASSISTANT + "') -%}"
        "{{ '" + assistant_piece + "' }}"
        "{%- endif -%}"
    )


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
        # Every instance carries the chat format as a template unless a saved one is loaded, so every
        # save_pretrained (tiny model, training output, adapter, merge, a user's own script) writes
        # it, and an official directory loaded through this class gets one too.
        if not kwargs.get("chat_template"):
            kwargs["chat_template"] = chat_template(
                self.sp_model.id_to_piece(USER_ID), self.sp_model.id_to_piece(ASSISTANT_ID)
            ) if self.sp_model.get_piece_size() > ASSISTANT_ID else chat_template()
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
        state["_plain_encoder"] = None
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
        """Ids of user text that can never contain role or control ids (see ``PlainTextEncoder``)."""
        if getattr(self, "_plain_encoder", None) is None:
            self._plain_encoder = PlainTextEncoder(self.sp_model)
        return self._plain_encoder.encode([text])[0]

    def build_chat_input(self, messages: list[dict], max_input_tokens: int | None = None) -> list[int]:
        """Prompt ids of ``messages`` in the official chat format (see the module's ``build_chat_input``)."""
        return build_chat_input(self, messages, max_input_tokens)

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
