"""PerceptionDLM-Base training samples: an image and a multi-turn conversation (SPEC-train-base T4–T5).

Records (a JSON list, or JSONL: one record a line), in the LLaVA style:

    {"image": "cat.jpg", "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                                           {"from": "gpt", "value": "A cat."}, ...]}

or with `{"role": ..., "content": ...}` messages. `image` is a path (relative ones: the working directory,
data.image_root, then the file's folder) or a `data:` URL; `images` may hold a list of one. A record without
an image is a text-only sample. The reader is strict: every record is checked when the files load (structure,
image readable, its `<image>` tag, the sample within the largest length bucket) and a bad one raises a
PDLMError naming file and record, or with data.on_bad_record: skip is left out and counted.

The reference's behaviour is reproduced (T8): in `{from, value}` form `system` messages are dropped; in
`{role, content}` form every role but `user`, `system` included, becomes a supervised assistant turn; user
text is split at `<image>`, each piece stripped and glued to the image. The template is the training one
(T5.1: default system turn, `\\n` after each user `<|eot_id|>`, none after an assistant's), unlike the
inference prompt. Labels are every assistant turn and its `<|eot_id|>` (T5.2). A sample longer than the
largest of data.length_buckets (the reference's max_length) is cut there, which the reader refuses for a
record whose image tokens or every answer token would be cut (the reference resamples those, T5.4).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageOps

from pdlm_jax.config import PDLMConfig
from pdlm_jax.errors import PDLMError
from pdlm_jax.files import as_path
from pdlm_jax.region_batch import RegionBatch
from pdlm_jax.regions.tiling import select_grid, tile_image
from pdlm_jax.regions.tokenizer import Tokenizer
from train.loss import IGNORE
from train.samples import TrainBatch
from train.sources import bad_record_policy, open_image_file, resolve_image

SYSTEM_TURN = "<|start_header_id|>system<|end_header_id|>\nYou are a helpful assistant.<|eot_id|>\n"
IMAGE_TAG = "<image>"
EXIF_ORIENTATION = 0x0112  # values 5–8 rotate by 90°: width and height swap
NO_POSITION = 2**30  # image positions of a text-only sample: past any sequence, dropped by the scatter


TEMPLATES = ("training", "chat")


@dataclasses.dataclass(frozen=True)
class TextFormat:
    """How a conversation becomes a sample's tokens (the data section's text settings)."""

    max_length: int  # the largest of data.length_buckets: longer samples are cut (T5.4)
    # data.answer_padding: a conversation ending in an answer gets <|eot_id|> after it, attended and supervised,
    # until that answer spans this many tokens (LLaDA's SFT pads with EOS; SPEC-train-base T8.4)
    answer_padding: int = 0
    # data.template: "training" is the reference's training template (T5.1); "chat" is the prompt the model is
    # asked with at inference (SPEC-base §B3: no system turn, the user's text as written, no newline after a
    # user <|eot_id|>), for a model that learns the prompt from scratch (T8.3)
    template: str = "training"

    @classmethod
    def of(cls, data) -> "TextFormat":
        return cls(max(data.length_buckets), data.answer_padding, data.template)


@dataclasses.dataclass(frozen=True)
class Turn:
    role: str  # "user" or "assistant"
    text: str


@dataclasses.dataclass(frozen=True)
class Conversation:
    where: str  # "FILE record I"
    image: str | None  # path or data URL as written in the record; None: text only
    turns: tuple[Turn, ...]
    # each (user, assistant) pair is a question of its own about the image (data.synthetic_questions), packed
    # into one sample by `build_sample`
    independent: bool = False


# ---- reading --------------------------------------------------------------------------------------


def read_conversation_file(path: Any) -> list[tuple[str, Any]]:
    """(where, raw record) of a JSON list or a JSONL file; PDLMError naming the file (and line) if unreadable."""
    path = as_path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise PDLMError(f"conversation file {path}: cannot read it ({e})") from e
    if str(path).endswith(".jsonl"):
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append((f"{path} line {n}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise PDLMError(f"{path} line {n}: not a JSON record ({e})") from e
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise PDLMError(f"conversation file {path}: not a JSON file ({e}); JSON Lines files end in .jsonl") from e
    if not isinstance(data, list):
        raise PDLMError(f"conversation file {path}: expected a JSON list of records, got {type(data).__name__}")
    return [(f"{path} record {i}", raw) for i, raw in enumerate(data)]


def _messages(raw: dict, where: str) -> list[Turn]:
    """The record's turns, read as the reference's `convert_type` + `LlavaParquetDataset.get_conv` do."""
    messages = raw.get("conversations")
    if isinstance(messages, str):  # the reference accepts a JSON string too
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError as e:
            raise PDLMError(f"{where}: 'conversations' is a string but not JSON ({e})") from None
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise PDLMError(f"{where}: 'conversations' must be a non-empty list of messages "
                        '({"from": "human"|"gpt", "value": ...} or {"role": ..., "content": ...})')
    if messages[0].get("value") is not None:  # {from, value}: human -> user, gpt -> assistant, system dropped
        turns = []
        for i, m in enumerate(messages):
            role, text = m.get("from"), m.get("value")
            if role not in ("human", "gpt", "system") or not isinstance(text, str):
                raise PDLMError(f"{where}: message {i} must be {{\"from\": \"human\"|\"gpt\"|\"system\", \"value\": "
                                f"str}}, got {json.dumps(m)[:200]}")
            if role != "system" and not text:
                raise PDLMError(f"{where}: message {i} is empty")
            if role != "system":
                turns.append(Turn("user" if role == "human" else "assistant", text))
        return turns
    turns = []
    for i, m in enumerate(messages):  # {role, content}: every role but "user" is the assistant (T8.7)
        role, text = m.get("role"), m.get("content")
        if not isinstance(role, str) or not isinstance(text, str):
            raise PDLMError(f"{where}: message {i} must be {{\"role\": str, \"content\": str}} or "
                            f"{{\"from\": ..., \"value\": ...}}, got {json.dumps(m)[:200]}")
        if not text:
            raise PDLMError(f"{where}: message {i} is empty")
        turns.append(Turn("user" if role == "user" else "assistant", text))
    return turns


def parse_conversation(raw: Any, where: str) -> Conversation:
    """One record, checked for structure; PDLMError naming it if malformed."""
    if not isinstance(raw, dict):
        raise PDLMError(f"{where}: expected an object with 'conversations' (and 'image'), got {type(raw).__name__}")
    image = raw.get("image", raw.get("images"))
    if isinstance(image, list):
        if len(image) > 1:
            raise PDLMError(f"{where}: {len(image)} images; records of several images are not supported (one "
                            "image, or none)")
        image = image[0] if image else None
    if image is not None and (not isinstance(image, str) or not image):
        raise PDLMError(f"{where}: 'image' must be a path or a data: URL, got {image!r}")
    turns = _messages(raw, where)
    tags = sum(t.text.count(IMAGE_TAG) for t in turns if t.role == "user")
    if tags != (image is not None):
        raise PDLMError(f"{where}: {tags} '{IMAGE_TAG}' tags in the user messages for {int(image is not None)} "
                        f"image(s); put exactly one '{IMAGE_TAG}' where the image goes"
                        + ("" if image is not None else ", or give the record an 'image'"))
    if not any(t.role == "assistant" for t in turns):
        raise PDLMError(f"{where}: no assistant message: nothing to learn")
    return Conversation(where, image, tuple(turns))


# ---- text and labels (T5.1–T5.2, T5.4) --------------------------------------------------------------


def _user_text(text: str, image_text: str | None) -> str:
    """User content: pieces around `<image>` stripped, empty ones dropped, the image where the tag was."""
    pieces, out = text.split(IMAGE_TAG), []
    for i, piece in enumerate(pieces):
        if piece.strip():
            out.append(piece.strip())
        if i < len(pieces) - 1 and image_text is not None:
            out.append(image_text)
    return "".join(out)


def render(turns: Sequence[Turn], image_text: str | None,
           template: str = "training") -> tuple[str, list[tuple[int, int]]]:
    """(text, spans): the conversation in `template` (TextFormat) and the [start, end) characters of every
    assistant answer with its `<|eot_id|>` (the template's generation spans)."""
    chat = template == "chat"
    text, spans = "" if chat else SYSTEM_TURN, []
    for turn in turns:
        text += f"<|start_header_id|>{turn.role}<|end_header_id|>\n"
        if turn.role == "assistant":
            spans.append((len(text), len(text) + len(turn.text) + len("<|eot_id|>")))
            text += turn.text + "<|eot_id|>"
        elif chat:
            text += (turn.text if image_text is None else turn.text.replace(IMAGE_TAG, image_text)) + "<|eot_id|>"
        else:
            text += _user_text(turn.text, image_text) + "<|eot_id|>\n"
    return text, spans


def sample_tokens(conv: Conversation, num_tiles: int, cfg: PDLMConfig, tokenizer: Tokenizer,
                  fmt: TextFormat) -> tuple[np.ndarray, np.ndarray]:
    """(ids, labels) of a conversation whose image has `num_tiles` tiles in `fmt`, cut to fmt.max_length tokens;
    PDLMError if the cut would drop image tokens or every answer token."""
    n = num_tiles * cfg.region.num_image_tokens if conv.image is not None else 0
    image_text = "<img>" + "<IMG_CONTEXT>" * n + "</img>" if conv.image is not None else None
    ids, answer = tokenizer.encode_marked(*render(conv.turns, image_text, fmt.template))
    image_token = tokenizer.special.image_context
    if int(np.sum(ids == image_token)) != n:
        raise PDLMError("the text contains '<IMG_CONTEXT>', reserved for image features; remove it")
    labels = np.where(answer & (ids != image_token), ids, IGNORE).astype(np.int32)
    if fmt.answer_padding and labels[-1] != IGNORE:
        last = len(ids) - np.flatnonzero(labels[::-1] == IGNORE)[0]  # where the final answer starts
        pad = np.full(max(fmt.answer_padding - (len(ids) - last), 0), tokenizer.special.eot, ids.dtype)
        ids, labels = np.concatenate([ids, pad]), np.concatenate([labels, pad.astype(np.int32)])
    max_length = fmt.max_length
    if len(ids) > max_length:
        if np.any(ids[max_length:] == image_token):
            raise PDLMError(f"the sample has {len(ids)} tokens and its image ends past the largest of "
                            f"data.length_buckets ({max_length}); add a larger bucket or shorten the text")
        ids, labels = ids[:max_length], labels[:max_length]
        if np.all(labels == IGNORE):
            raise PDLMError(f"the sample has {len(ids)} tokens and no answer token within the largest of "
                            f"data.length_buckets ({max_length}); add a larger bucket or shorten the text")
    return ids, labels


# ---- images ------------------------------------------------------------------------------------------


def _num_tiles(size: tuple[int, int], cfg: PDLMConfig) -> int:
    cols, rows = select_grid(size[0], size[1], cfg.region)
    return cols * rows + (1 if cfg.region.use_thumbnail and cols * rows > 1 else 0)


def _image_size(ref: Any) -> tuple[int, int]:
    """(width, height) after the EXIF orientation the reference's `load_image` applies, from the header."""
    with open_image_file(ref) as im:
        w, h = im.size
        return (h, w) if im.getexif().get(EXIF_ORIENTATION) in (5, 6, 7, 8) else (w, h)


def _load_image(ref: Any) -> Image.Image:
    with open_image_file(ref) as im:
        return ImageOps.exif_transpose(im).convert("RGB")


# ---- samples -----------------------------------------------------------------------------------------


def build_sample(conv: Conversation, image: Image.Image | None, cfg: PDLMConfig, tokenizer: Tokenizer,
                 fmt: TextFormat):
    """One unpadded training sample (train.samples.TrainBatch, without regions): full attention among its
    tokens, or for an independent conversation (`Conversation.independent`) its questions packed."""
    region = cfg.region
    if image is not None:
        tiled = tile_image(image, region)
        pixels, grid, num_tiles = tiled.pixel_values, tiled.grid, tiled.num_tiles
    else:  # the reference's all-zero dummy tile, whose features go nowhere
        pixels, grid, num_tiles = np.zeros((1, region.image_size, region.image_size, 3), np.float32), (1, 1), 1
    ids, labels, block_id = conversation_tokens(conv, num_tiles, cfg, tokenizer, fmt)
    L, n, g = len(ids), num_tiles * region.num_image_tokens, cfg.vision.grid_size
    image_positions = np.flatnonzero(ids == tokenizer.special.image_context).astype(np.int32)
    if image is None:
        image_positions = np.full(n, NO_POSITION, np.int32)
    inputs = RegionBatch(
        pixel_values=pixels,
        mask_patches=np.zeros((0, num_tiles, g, g), bool),
        prompt_ids=np.zeros((0,), np.int32),
        grid=np.asarray(grid, np.int32),
        num_tiles=np.int32(num_tiles),
        roi_boxes=np.zeros((0, 4), np.float32),
        input_ids=ids,
        image_positions=image_positions,
        roi_positions=np.zeros((0, region.roi_tokens), np.int32),
        block_id=block_id,
        roi_owner=np.full(L, -1, np.int32),
        prefix_visible=block_id == 0,
        valid=np.ones(L, bool),
    )
    return TrainBatch(inputs=inputs, labels=labels, answer_positions=np.flatnonzero(labels != IGNORE).astype(np.int32))


def conversation_tokens(conv: Conversation, num_tiles: int, cfg: PDLMConfig, tokenizer: Tokenizer,
                        fmt: TextFormat) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, labels, block_id) of a conversation: block_id -1 everywhere (no caption blocks: every token sees
    every valid token), or for an independent conversation its questions packed after one image prompt.

    Packing: each (question, answer) pair tokenizes as a conversation of its own; the tokens they all begin with
    (through the image and whatever text before the questions differ) are held once as block 0, every pair's
    remaining tokens follow as block 1, 2, ... The structured mask (`RegionBatch.attention_mask`) lets block 0
    see itself and block k see block 0 and itself, and `train.loss.packed_layout` gives block k the positions it
    has alone: each pair trains as its own one-question sample would, except that the prompt does not attend to
    the question."""
    if not conv.independent:
        ids, labels = sample_tokens(conv, num_tiles, cfg, tokenizer, fmt)
        return ids, labels, np.full(len(ids), -1, np.int32)
    pairs = zip(conv.turns[::2], conv.turns[1::2])
    parts = [sample_tokens(Conversation(conv.where, conv.image, (
        Turn("user", u.text if IMAGE_TAG in u.text else IMAGE_TAG + u.text), a)), num_tiles, cfg, tokenizer, fmt)
        for u, a in pairs]
    ids0 = parts[0][0]
    shared = min(len(ids) for ids, _ in parts)
    for ids, _ in parts[1:]:
        differ = np.flatnonzero(ids[:shared] != ids0[:shared])
        shared = int(differ[0]) if differ.size else shared
    if any(np.any(ids[shared:] == tokenizer.special.image_context) or np.any(labels[:shared] != IGNORE)
           for ids, labels in parts):
        raise PDLMError("the questions of an independent conversation must share the image and every token before "
                        "it, and no answer")
    block_id = np.concatenate([np.zeros(shared, np.int32)]
                              + [np.full(len(ids) - shared, k + 1, np.int32) for k, (ids, _) in enumerate(parts)])
    ids = np.concatenate([ids0[:shared]] + [ids[shared:] for ids, _ in parts])
    labels = np.concatenate([parts[0][1][:shared]] + [labels[shared:] for _, labels in parts])
    return ids, labels, block_id


def one_item_per_record(n: int) -> np.ndarray:
    """(n, 3) items in the layout of train.sources.build_items: one per record, (record, 0, 1)."""
    return np.stack([np.arange(n), np.zeros(n, int), np.ones(n, int)], 1)


class ConversationSource:
    """The conversation records of one or more files, every one validated when loaded (see the module
    docstring); `skipped` lists the messages of the records left out with on_bad_record="skip"."""

    def __init__(self, paths: Sequence[str], cfg: PDLMConfig, tokenizer: Tokenizer, fmt: TextFormat,
                 max_tiles: int, image_root: str | None = None, on_bad_record: str = "error"):
        self.name = ", ".join(map(str, paths))
        self.records: list[tuple[Conversation, Any]] = []  # (conversation, resolved image or None)
        self.skipped: list[str] = []
        for path in paths:
            for where, raw in read_conversation_file(path):
                with bad_record_policy(on_bad_record, self.skipped):
                    conv = parse_conversation(raw, where)
                    try:
                        image = self._check(conv, as_path(path).parent, image_root, cfg, tokenizer, fmt,
                                            max_tiles)
                    except PDLMError as e:
                        raise PDLMError(f"{where}: {e}") from None
                    self.records.append((conv, image))
        if not self.records:
            raise PDLMError(f"no usable conversation records in {', '.join(map(str, paths))}"
                            + (f" ({len(self.skipped)} skipped; first: {self.skipped[0]})" if self.skipped else ""))

    @staticmethod
    def _check(conv: Conversation, base, image_root, cfg, tokenizer, fmt: TextFormat, max_tiles: int) -> Any:
        """The record's image (resolved path, data URL or None) if its sample fits, else PDLMError."""
        image, tiles = None, 1
        if conv.image is not None:
            image = resolve_image(conv.image, base, image_root)
            tiles = _num_tiles(_image_size(image), cfg)
        if tiles > max_tiles:
            raise PDLMError(f"the image needs {tiles} tiles but the largest of data.tile_buckets is {max_tiles}")
        sample_tokens(conv, tiles, cfg, tokenizer, fmt)
        return image

    def __len__(self) -> int:
        return len(self.records)

    def label(self, index: int) -> str:
        return self.records[index][0].where

    def sample_input(self, index: int) -> tuple[Conversation, Image.Image | None]:
        conv, image_ref = self.records[index]
        return conv, _load_image(image_ref) if image_ref is not None else None

    def items(self) -> np.ndarray:
        return one_item_per_record(len(self))


class SyntheticConversations:
    """The synthetic shapes task (train.synthetic) as Base conversations: scene `i` of data.synthetic_seed and
    `questions` different questions about it (`train.synthetic.pick_questions`), drawn from (seed, i) alone.

    Several questions are independent turns (`Conversation.independent`): as turns of one conversation every
    turn would attend to every other (full attention) and a later answer could be read off earlier ones
    ("Which shape is blue? square" then "Is there a blue square?"), a shortcut not there when one question is
    asked."""

    def __init__(self, num_scenes: int, seed: int, cfg: PDLMConfig, tokenizer: Tokenizer, fmt: TextFormat,
                 describe: float = 0.0, questions: int = 1):
        from train import synthetic

        self.name, self.num_scenes, self.seed, self.skipped = "synthetic task", int(num_scenes), int(seed), []
        self.describe = float(describe)  # data.synthetic_describe: the fraction asking "Describe the image."
        self.questions = int(questions)  # data.synthetic_questions
        # the longest sample there can be must fit whole: a generated sample is never cut
        answer = synthetic.Item("circle", "red", "small", 0, 0).place  # "in the top left": the longest answer
        by_length = sorted(synthetic.every_question(), key=lambda q: len(tokenizer.encode(q)), reverse=True)
        longest = [[(q, answer) for q in by_length[:self.questions]]]
        if self.describe:  # six of the longest captions
            caption = synthetic.Item("triangle", "yellow", "small", 0, 0).caption
            longest.append([(synthetic.DESCRIBE, ", ".join([caption] * synthetic.MAX_SHAPES))])
        region = cfg.region
        tiles = region.max_tiles + (region.use_thumbnail and region.max_tiles > 1)
        for pairs in longest:
            turns = tuple(t for q, a in pairs for t in (Turn("user", IMAGE_TAG + q), Turn("assistant", a)))
            conv = Conversation(self.name, "synthetic", turns, independent=len(pairs) > 1)
            uncut = dataclasses.replace(fmt, max_length=2**31)
            length = len(conversation_tokens(conv, tiles, cfg, tokenizer, uncut)[0])
            if length > fmt.max_length:
                asked = f"{len(pairs)} questions like {pairs[0][0]!r}" if len(pairs) > 1 else repr(pairs[0][0])
                raise PDLMError(f"synthetic task: a sample asking {asked} can take {length} tokens; make the largest "
                                f"of data.length_buckets ({fmt.max_length}) at least that")

    def __len__(self) -> int:
        return self.num_scenes

    def label(self, index: int) -> str:
        return f"synthetic scene {index}"

    def sample_input(self, index: int) -> tuple[Conversation, Image.Image]:
        from train import synthetic

        scene = synthetic.make_scene(self.seed, index, task="sentences")
        messages = synthetic.conversation(scene, np.random.default_rng([self.seed, index, 1]), self.questions,
                                          self.describe)
        conv = parse_conversation({"image": "synthetic", "conversations": messages}, self.label(index))
        return dataclasses.replace(conv, independent=len(conv.turns) > 2), Image.fromarray(scene.image)

    def items(self) -> np.ndarray:
        return one_item_per_record(len(self))


def make_sources(data, cfg: PDLMConfig, tokenizer: Tokenizer) -> list:
    """data.annotations as conversation files (one source, or with data.weights one per file), then the
    synthetic task's questions if data.synthetic_scenes > 0."""
    if not data.annotations and data.synthetic_scenes <= 0:
        raise PDLMError("no training data: set data.annotations to conversation files (JSON or JSONL) and/or "
                        "data.synthetic_scenes")
    n_sources = (len(data.annotations) if data.weights else min(len(data.annotations), 1)) + (data.synthetic_scenes > 0)
    if data.weights and len(data.weights) != n_sources:
        raise PDLMError(f"data.weights: give one weight per conversation file ({len(data.annotations)})"
                        f"{' plus one for the synthetic task' if data.synthetic_scenes > 0 else ''} to mix them, "
                        f"got {list(data.weights)}")
    files = [[f] for f in data.annotations] if data.weights else [list(data.annotations)] if data.annotations else []
    fmt = TextFormat.of(data)
    sources: list = [ConversationSource(f, cfg, tokenizer, fmt, max(data.tile_buckets), data.image_root,
                                        data.on_bad_record) for f in files]
    if data.synthetic_scenes > 0:
        sources.append(SyntheticConversations(data.synthetic_scenes, data.synthetic_seed, cfg, tokenizer, fmt,
                                              data.synthetic_describe, data.synthetic_questions))
    return sources


class SampleBuilder:
    """grain MapWithIndex transform: (global index, item) -> Base sample. Picklable for worker processes."""

    def __init__(self, source: ConversationSource, data, model: PDLMConfig, tokenizer_path: str, num_items: int):
        self.source, self.model, self.fmt = source, model, TextFormat.of(data)
        self.tokenizer_path = tokenizer_path
        self._tokenizer: Tokenizer | None = None

    def __getstate__(self):
        return {**self.__dict__, "_tokenizer": None}

    def __call__(self, index: int, item: np.ndarray):
        if self._tokenizer is None:
            self._tokenizer = Tokenizer(self.tokenizer_path, base=True)
        index = int(item[0])
        try:
            conv, image = self.source.sample_input(index)
            return build_sample(conv, image, self.model, self._tokenizer, self.fmt)
        except PDLMError as e:
            raise PDLMError(f"{self.source.label(index)}: {e}") from e
