"""The region-captioning prompt (SPEC §5.1) and its RoI-expanded token layout (SPEC §7.2, §8).

`PromptLayout` is everything the jitted program needs to know about the sequence: the token ids after RoI
expansion, where image / RoI / generation tokens go, and small per-token segment arrays from which the
structured attention mask is built on device.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from pdlm_jax.errors import PDLMError
from pdlm_jax.regions.tokenizer import SpecialTokens

DEFAULT_QUESTION = "Describe each masked region in detail."  # what the model was trained with (SPEC §5.1)
USER_HEADER = "<|start_header_id|>user<|end_header_id|>\n"
ASSISTANT_HEADER = "<|start_header_id|>assistant<|end_header_id|>\n"  # the answer (caption blocks) follows it


def build_prompt_text(num_tiles: int, num_image_tokens: int, k: int, gen_length: int,
                      question: str = DEFAULT_QUESTION) -> str:
    """Exact prompt string of the reference demo for k regions and G = gen_length slots each."""
    image = "<img>" + "<IMG_CONTEXT>" * (num_image_tokens * num_tiles) + "</img>"
    reserved = "\n".join(f"<|reserved_token_{i}|>" for i in range(k))
    blocks = "\n".join(f"<|Mask_Cap_{i}|>" + "<|mdm_mask|>" * gen_length for i in range(k))
    return ("<|start_header_id|>system<|end_header_id|>\nYou are a helpful assistant.<|eot_id|>\n"
            + USER_HEADER
            + image + reserved + "\n" + question + "<|eot_id|>\n"
            + ASSISTANT_HEADER
            + blocks + "<|eot_id|>")


# chat's turn end: no \n after <|eot_id|>, unlike the region prompt
ASSISTANT_TURN = "<|eot_id|>" + ASSISTANT_HEADER


def build_question_text(question: str, num_tiles: int, num_image_tokens: int) -> str:
    """PerceptionDLM-Base `chat`'s prompt for the demo's question `"<image>\\n" + question` (SPEC-base §B3).

    No system turn. The reference replaces `<image>` on the reversed string, i.e. the LAST `<image>` of the
    text receives the image; an earlier one (e.g. the demo's own prefix when the question has `<image>`)
    stays as plain text.
    """
    text = USER_HEADER + "<image>\n" + question + ASSISTANT_TURN
    at = text.rfind("<image>")
    image = "<img>" + "<IMG_CONTEXT>" * (num_tiles * num_image_tokens) + "</img>"
    return text[:at] + image + text[at + len("<image>"):]


@dataclasses.dataclass(frozen=True)
class PromptLayout:
    input_ids: np.ndarray  # (L,) int32, RoI-expanded (each reserved token repeated roi_tokens times)
    image_positions: np.ndarray  # (T*n,) int32, the <IMG_CONTEXT> positions in order
    roi_positions: np.ndarray  # (k, R²) int32, region c's RoI span
    gen_positions: np.ndarray  # (k, G) int32, region c's <|mdm_mask|> slots
    block_id: np.ndarray  # (L,) int32, caption block of each position, -1 outside blocks (SPEC §8.1-2)
    roi_owner: np.ndarray  # (L,) int32, region whose RoI span holds the position, else -1
    prefix_visible: np.ndarray  # (L,) bool, the "fix prompt" [0, fix_len) ∪ [last_end, m0) (SPEC §8.4)
    valid: np.ndarray  # (L,) bool, False for right padding
    length: int  # unpadded L

    @property
    def num_regions(self) -> int:
        return self.roi_positions.shape[0]


def _only_position(ids: np.ndarray, token: int, name: str) -> int:
    where = np.flatnonzero(ids == token)
    if where.size != 1:
        raise PDLMError(f"the prompt must contain {name} exactly once (found {where.size}); "
                        "do not put special tokens in the question text")
    return int(where[0])


def build_layout(ids: np.ndarray, special: SpecialTokens, k: int, roi_tokens: int, gen_length: int,
                 num_image_tokens: int) -> PromptLayout:
    """Expand the tokenized prompt (RoI replay, SPEC §7.2.6) and derive the mask segments (SPEC §8)."""
    ids = np.asarray(ids, dtype=np.int32)
    if not 1 <= k <= len(special.reserved):
        raise PDLMError(f"a pass captions 1 to {len(special.reserved)} regions (got {k})")
    unused = [t for t in (*special.reserved[k:], *special.mask_cap[k:]) if np.any(ids == t)]
    if unused:
        raise PDLMError(f"the prompt contains region markers for more than {k} regions; do not put special "
                        "tokens in the question text")
    heads = [_only_position(ids, special.reserved[c], f"<|reserved_token_{c}|>") for c in range(k)]
    if heads != sorted(heads):
        raise PDLMError("the <|reserved_token_i|> placeholders are out of order in the prompt")

    # Replace each reserved token by roi_tokens copies, keeping everything else.
    pieces, roi_positions, start = [], [], 0
    for c, head in enumerate(heads):
        pieces += [ids[start:head], np.full(roi_tokens, special.reserved[c], dtype=np.int32)]
        first = sum(p.size for p in pieces) - roi_tokens
        roi_positions.append(np.arange(first, first + roi_tokens, dtype=np.int32))
        start = head + 1
    pieces.append(ids[start:])
    expanded = np.concatenate(pieces)
    length = expanded.size

    image_positions = np.flatnonzero(expanded == special.image_context).astype(np.int32)
    if image_positions.size != num_image_tokens:
        raise PDLMError(f"the prompt has {image_positions.size} <IMG_CONTEXT> tokens, the image needs "
                        f"{num_image_tokens}")

    # Caption blocks: from <|Mask_Cap_c|> to the next marker (or the end); <|eot_id|> is not a boundary.
    starts = [_only_position(expanded, special.mask_cap[c], f"<|Mask_Cap_{c}|>") for c in range(k)]
    if starts != sorted(starts):
        raise PDLMError("the <|Mask_Cap_i|> markers are out of order in the prompt")
    block_id = np.full(length, -1, dtype=np.int32)
    gen_positions = []
    for c, s in enumerate(starts):
        block_id[s:(starts[c + 1] if c + 1 < k else length)] = c
        slots = np.arange(s + 1, s + 1 + gen_length, dtype=np.int32)
        if gen_length and (slots[-1] >= length or np.any(expanded[slots] != special.mask)):  # 0: training
            raise PDLMError(f"caption block {c} does not hold {gen_length} <|mdm_mask|> slots")
        gen_positions.append(slots)

    roi_owner = np.full(length, -1, dtype=np.int32)
    for c, pos in enumerate(roi_positions):
        roi_owner[pos] = c
    fix_len = int(roi_positions[0][0])
    last_end = int(roi_positions[-1][-1]) + 1
    prefix_visible = np.zeros(length, dtype=bool)
    prefix_visible[:fix_len] = True
    prefix_visible[last_end:starts[0]] = True

    return PromptLayout(input_ids=expanded, image_positions=image_positions,
                        roi_positions=np.stack(roi_positions), gen_positions=np.stack(gen_positions),
                        block_id=block_id, roi_owner=roi_owner, prefix_visible=prefix_visible,
                        valid=np.ones(length, dtype=bool), length=length)
