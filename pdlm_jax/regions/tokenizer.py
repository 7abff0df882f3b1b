"""The checkpoint's tokenizer (`tokenizer.json`) and every special-token id, resolved by string (SPEC §5.2)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np
from tokenizers import Tokenizer as _HFTokenizer

from pdlm_jax.errors import PDLMError
from pdlm_jax.files import as_path

NUM_MASK_CAP_TOKENS = 16  # <|Mask_Cap_0..15|> exist in the saved tokenizer
NUM_RESERVED_TOKENS = 6  # <|reserved_token_0..5|> are the RoI placeholders (one per prompt id)
# What the region model's processor adds to PerceptionDLM-Base's tokenizer, in this order (SPEC-train-base T7.1-2)
REGION_TOKENS = (*(f"<|Mask_Cap_{i}|>" for i in range(NUM_MASK_CAP_TOKENS)), *(f"<Prompt{i}>" for i in range(6)),
                 "<NO_Prompt>")


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    mask: int  # <|mdm_mask|>
    eot: int  # <|eot_id|>
    start_header: int  # <|start_header_id|>
    end_header: int  # <|end_header_id|>
    image_context: int  # <IMG_CONTEXT>
    image_start: int  # <img>
    image_end: int  # </img>
    reserved: tuple[int, ...]  # <|reserved_token_i|>, i < NUM_RESERVED_TOKENS
    mask_cap: tuple[int, ...]  # <|Mask_Cap_i|>, i < NUM_MASK_CAP_TOKENS

    def all_ids(self) -> frozenset[int]:
        return frozenset((self.mask, self.eot, self.start_header, self.end_header, self.image_context,
                          self.image_start, self.image_end, *self.reserved, *self.mask_cap))


@dataclasses.dataclass(frozen=True)
class BaseSpecialTokens:
    """The special tokens PerceptionDLM-Base's prompt and sampler use (its processor adds only the image
    tokens to LLaDA's, SPEC-base §B1)."""

    mask: int  # <|mdm_mask|>
    eot: int  # <|eot_id|>
    image_context: int  # <IMG_CONTEXT>
    image_start: int  # <img>
    image_end: int  # </img>

    def all_ids(self) -> frozenset[int]:
        return frozenset(dataclasses.astuple(self))


class Tokenizer:
    """Encodes like the reference's `tokenizer(prompt_text)`: the tokenizer.json pipeline with its own
    post-processor (a PreTrainedTokenizerFast adds exactly what that post-processor adds, e.g. no BOS for
    LLaDA)."""

    def __init__(self, path: str | Path, base: bool = False):
        path = as_path(path)  # a local path, file:// or a bucket URL
        file = path / "tokenizer.json" if path.is_dir() else path
        try:
            self._tok = _HFTokenizer.from_str(file.read_text())
        except Exception as e:  # tokenizers raises a bare Exception on missing/malformed files
            raise PDLMError(f"cannot load tokenizer {file}: {e}; the checkpoint directory must contain the "
                            "reference tokenizer.json") from e
        self.file = file
        if base:
            self.special = BaseSpecialTokens(*(self.token_id(t) for t in (
                "<|mdm_mask|>", "<|eot_id|>", "<IMG_CONTEXT>", "<img>", "</img>")))
            return
        self.special = SpecialTokens(
            mask=self.token_id("<|mdm_mask|>"),
            eot=self.token_id("<|eot_id|>"),
            start_header=self.token_id("<|start_header_id|>"),
            end_header=self.token_id("<|end_header_id|>"),
            image_context=self.token_id("<IMG_CONTEXT>"),
            image_start=self.token_id("<img>"),
            image_end=self.token_id("</img>"),
            reserved=tuple(self.token_id(f"<|reserved_token_{i}|>") for i in range(NUM_RESERVED_TOKENS)),
            mask_cap=tuple(self.token_id(f"<|Mask_Cap_{i}|>") for i in range(NUM_MASK_CAP_TOKENS)),
        )

    def token_id(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise PDLMError(f"special token {token!r} is missing from {self.file}; use the tokenizer saved with "
                            "the PerceptionDLM checkpoint")
        return i

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=True).ids, dtype=np.int32)

    def encode_marked(self, text: str, spans: Sequence[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, marked): `encode(text)` and, per token, whether it covers a character of one of the [start, end)
        character `spans` — the tokens from `char_to_token(start)` through `char_to_token(end - 1)`, as
        transformers marks a chat template's generation spans."""
        encoding = self._tok.encode(text, add_special_tokens=True)
        marked = np.zeros(len(encoding.ids), bool)
        for start, end in spans:
            first, last = encoding.char_to_token(start), encoding.char_to_token(end - 1)
            if first is not None:
                marked[first:(len(marked) if last is None else last + 1)] = True
        return np.asarray(encoding.ids, dtype=np.int32), marked

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def extended_tokenizer(src: str | Path, tokens: Sequence[str]) -> tuple[str, list[str]]:
    """(tokenizer.json text, tokens added): `src`'s tokenizer with those of `tokens` it lacks added as special
    tokens, in order, after its last id (as transformers' `add_special_tokens`)."""
    from tokenizers import AddedToken

    tok = Tokenizer(src, base=True)._tok
    missing = [t for t in tokens if tok.token_to_id(t) is None]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    return tok.to_str(), missing
