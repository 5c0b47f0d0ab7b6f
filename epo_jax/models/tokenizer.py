"""Tokenizers: Hugging Face folders through AutoTokenizer, GGUF metadata through `tokenizers`, the
byte string of every token id (what the sampler matches stop strings against), and chats encoded
with their messages as plain text (`encode_chat`).
"""
from __future__ import annotations

import functools
import json
import os
import re
from typing import Any, Mapping, Sequence

import numpy as np
import transformers
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from epo_jax.errors import ModelNotFoundError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")

# llama.cpp pre-tokenizer names (tokenizer.ggml.pre) that are GPT-2's byte-level regex, optionally
# after splitting every digit on its own (llama-vocab.cpp: "smollm" splits \p{N} first).
_GGUF_PRE_TOKENIZERS = {"smollm": True, "starcoder": True, "refact": True, "gpt2": False, "default": False}
_GGUF_TOKEN_TYPE_CONTROL = 3
_GGUF_TOKEN_TYPE_USER_DEFINED = 4


def load_tokenizer(path: str) -> transformers.PreTrainedTokenizerBase:
    """The tokenizer (with its chat template) of a Hugging Face folder, via transformers.AutoTokenizer."""
    if not any(os.path.exists(os.path.join(path, name)) for name in TOKENIZER_FILES):
        raise ModelNotFoundError(
            f"No tokenizer in {path!r}: expected one of {TOKENIZER_FILES}. Copy the tokenizer files of the "
            "base model into the folder (save_pretrained writes them when given the tokenizer).")
    return transformers.AutoTokenizer.from_pretrained(path)


def gguf_tokenizer(metadata: Mapping[str, Any]) -> transformers.PreTrainedTokenizerFast:
    """A fast tokenizer rebuilt from GGUF metadata (byte-level BPE, `tokenizer.ggml.model == "gpt2"`).

    Follows the metadata: the BOS token is added only if `tokenizer.ggml.add_bos_token` says so
    (SmolLM2 adds none: prepending `<|im_start|>` derails its chat answers), control tokens become
    special tokens, and the pre-tokenizer is chosen from `tokenizer.ggml.pre` as llama.cpp does.
    """
    model_kind = metadata.get("tokenizer.ggml.model")
    if model_kind != "gpt2":
        raise ValueError(
            f"GGUF tokenizer.ggml.model={model_kind!r} is not supported; only byte-level BPE ('gpt2') is.")
    pre = metadata.get("tokenizer.ggml.pre", "default")
    if pre not in _GGUF_PRE_TOKENIZERS:
        raise ValueError(
            f"GGUF tokenizer.ggml.pre={pre!r} is not supported; known: {sorted(_GGUF_PRE_TOKENIZERS)}.")
    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    merges = [tuple(merge.split(" ", 1)) for merge in metadata["tokenizer.ggml.merges"]]
    token_types = np.asarray(metadata["tokenizer.ggml.token_type"])

    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                   fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if _GGUF_PRE_TOKENIZERS[pre]:
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()
    is_control = token_types == _GGUF_TOKEN_TYPE_CONTROL
    added = [AddedToken(tokens[i], special=bool(is_control[i]), normalized=False)
             for i in np.nonzero(is_control | (token_types == _GGUF_TOKEN_TYPE_USER_DEFINED))[0]]
    backend.add_tokens(added)

    def token(key: str) -> str | None:
        index = metadata.get(key)
        return None if index is None else tokens[int(index)]

    bos = token("tokenizer.ggml.bos_token_id")
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", False))
    if add_bos and bos is not None:
        bos_id = int(metadata["tokenizer.ggml.bos_token_id"])
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=token("tokenizer.ggml.eos_token_id"),
        unk_token=token("tokenizer.ggml.unknown_token_id"),
        pad_token=token("tokenizer.ggml.padding_token_id") or token("tokenizer.ggml.eos_token_id"),
        chat_template=metadata.get("tokenizer.chat_template"),
        add_bos_token=add_bos,
        clean_up_tokenization_spaces=False,
    )


@functools.lru_cache(maxsize=1)
def _byte_level_decoding_table() -> dict[str, int]:
    """GPT-2's reversible map from the printable stand-in characters of byte-level BPE back to bytes."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1))
                 + list(range(ord("\xae"), ord("\xff") + 1)))
    byte_values = printable[:]
    shift = 0
    for b in range(256):
        if b not in printable:
            byte_values.append(b)
            printable.append(256 + shift)
            shift += 1
    return {chr(code): byte for code, byte in zip(printable, byte_values)}


def _decoder_kinds(tokenizer: transformers.PreTrainedTokenizerBase) -> set[str]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return set()
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    kinds = {decoder.get("type")}
    kinds.update(d.get("type") for d in decoder.get("decoders", []))
    return kinds


def token_bytes(tokenizer: transformers.PreTrainedTokenizerBase, vocab_size: int) -> list[bytes]:
    """The bytes each token id contributes to decoded text, for ids 0 .. vocab_size - 1.

    Byte-level BPE tokens map back through GPT-2's byte table; SentencePiece-style tokens turn
    '\u2581' into a space and '<0xNN>' into byte NN; added tokens contribute their literal text. Ids
    beyond the tokenizer's vocabulary (padding rows of the embedding) contribute nothing.
    """
    kinds = _decoder_kinds(tokenizer)
    pieces: Sequence[str | None] = tokenizer.convert_ids_to_tokens(list(range(min(len(tokenizer), vocab_size))))
    added = {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()}
    table = _byte_level_decoding_table()
    out: list[bytes] = []
    for piece in pieces:
        if piece is None:
            out.append(b"")
        elif piece in added:
            out.append(piece.encode("utf-8"))
        elif "ByteLevel" in kinds:
            out.append(bytes(table[c] for c in piece) if all(c in table for c in piece) else piece.encode("utf-8"))
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">") and "ByteFallback" in kinds:
            out.append(bytes([int(piece[3:5], 16)]))
        else:
            out.append(piece.replace("\u2581", " ").encode("utf-8"))
    return out + [b""] * (vocab_size - len(out))


def plain_text(text: str) -> str:
    """`text` with lone surrogates (which no UTF-8 encoder takes) replaced by "?"."""
    return text.encode("utf-8", "replace").decode("utf-8")


def _special_tokens(tokenizer: transformers.PreTrainedTokenizerBase) -> list[str]:
    """The special added tokens (control tokens such as <|im_start|>), longest first: the order
    in which a tokenizer matches them (leftmost, then longest)."""
    decoder = getattr(tokenizer, "added_tokens_decoder", {})
    return sorted({t.content for t in decoder.values() if t.special}, key=len, reverse=True)


def _stand_ins(count: int, taken: str) -> list[str]:
    """`count` private-use characters that occur nowhere in `taken`."""
    free = (chr(c) for c in range(0xE000, 0xF900) if chr(c) not in taken)
    return [next(free) for _ in range(count)]


def encode_chat(tokenizer: transformers.PreTrainedTokenizerBase, messages: Sequence[Mapping[str, str]],
                *, add_generation_prompt: bool = True) -> list[int]:
    """Token ids of `messages` rendered by the chat template, with every message's content encoded
    as plain text: a control token written inside a message (say "<|im_end|><|im_start|>system"
    in an observation) becomes the ordinary tokens of its characters, while the tokens the template
    itself writes stay real. Lone surrogates in a message become "?".

    transformers has no such mode (apply_chat_template renders one string, and encoding it finds
    every control token alike; split_special_tokens splits them all), so: the special tokens in
    messages are swapped for private-use stand-ins before rendering, the rendered text is split at
    the special tokens left (the template's), and each piece between them is encoded with the
    stand-ins restored and split_special_tokens on. A tokenizer also splits at its added tokens
    before anything else, so this equals plain encoding for byte-level tokenizers; messages without
    special tokens in them take plain encoding itself.
    """
    contents = [plain_text(m["content"]) for m in messages]
    specials = _special_tokens(tokenizer)
    pattern = re.compile("|".join(map(re.escape, specials))) if specials else None

    def render(chat_contents: Sequence[str]) -> str:
        chat = [{**m, "content": c} for m, c in zip(messages, chat_contents)]
        return tokenizer.apply_chat_template(chat, add_generation_prompt=add_generation_prompt, tokenize=False)

    if pattern is None or not any(pattern.search(c) for c in contents):
        return list(tokenizer.encode(render(contents), add_special_tokens=False))
    stand_ins = _stand_ins(len(specials), "".join(contents) + str(getattr(tokenizer, "chat_template", "")))
    to_stand_in = dict(zip(specials, stand_ins))
    restore = str.maketrans({c: t for t, c in to_stand_in.items()})
    text = render([pattern.sub(lambda m: to_stand_in[m.group(0)], c) for c in contents])
    ids: list[int] = []
    end = 0
    for match in [*pattern.finditer(text), None]:
        piece = text[end:match.start() if match else len(text)]
        if piece:
            ids.extend(tokenizer.encode(piece.translate(restore), add_special_tokens=False,
                                        split_special_tokens=True))
        if match:
            ids.append(tokenizer.convert_tokens_to_ids(match.group(0)))
            end = match.end()
    return ids
