"""PerceptionDLM-Base training (SPEC-train-base T4–T7): conversation records, the training template and labels
against hand-written token spans, the objective recomputed independently, frozen modules, and the region model
initialised from a Base checkpoint."""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import fixture_dir
from PIL import Image

from pdlm_jax import checkpoint as pdlm_ckpt
from pdlm_jax.config import Quirks, SamplerConfig
from pdlm_jax.errors import PDLMError
from pdlm_jax.regions.tokenizer import REGION_TOKENS, Tokenizer
from train import conversations
from train.conversations import TextFormat
from train.loss import IGNORE

SYSTEM = "<|start_header_id|>system<|end_header_id|>\nYou are a helpful assistant.<|eot_id|>\n"
USER = "<|start_header_id|>user<|end_header_id|>\n"
ASSISTANT = "<|start_header_id|>assistant<|end_header_id|>\n"


@pytest.fixture(scope="module")
def base_tok():
    return Tokenizer(fixture_dir("base_tiny"), base=True)


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory):
    """base_tiny converted in bfloat16 (as released checkpoints are), so float32 reads are exact."""
    from convert.writer import convert

    out = tmp_path_factory.mktemp("base") / "base_tiny"
    convert(fixture_dir("base_tiny"), out, dtype="bfloat16")
    return out


@pytest.fixture(scope="module")
def base_cfg(base_ckpt):
    return pdlm_ckpt.load_config(base_ckpt)


def _expected(pieces, tok):
    """ids and labels of hand-split text: (text, supervised) pieces tokenized one by one."""
    ids = np.concatenate([tok.encode(text) for text, _ in pieces])
    labels = np.concatenate([tok.encode(text) if sup else np.full(len(tok.encode(text)), IGNORE)
                             for text, sup in pieces])
    return ids, labels


def test_template_and_labels_of_a_multi_turn_record(base_tok, base_cfg):
    record = {"image": "x.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A box."},
        {"from": "human", "value": " And its colour? "}, {"from": "gpt", "value": "Red."}]}
    conv = conversations.parse_conversation(record, "f.json record 0")
    ids, labels = conversations.sample_tokens(conv, 1, base_cfg, base_tok, TextFormat(1000))
    image = "<img>" + "<IMG_CONTEXT>" * base_cfg.region.num_image_tokens + "</img>"
    # T5.1: default system turn; the image glued to the stripped question; "\n" after a user <|eot_id|> only;
    # T5.2: each answer and its <|eot_id|> supervised, nothing else
    pieces = [(SYSTEM + USER + image + "What is this?<|eot_id|>\n" + ASSISTANT, False), ("A box.<|eot_id|>", True),
              (USER + "And its colour?<|eot_id|>\n" + ASSISTANT, False), ("Red.<|eot_id|>", True)]
    want_ids, want_labels = _expected(pieces, base_tok)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(labels, want_labels)
    assert base_tok.decode(ids) == "".join(text for text, _ in pieces)


def test_answer_padding_fills_the_final_answer_with_supervised_eot(base_tok, base_cfg):
    """data.answer_padding: the last answer (with its <|eot_id|>) is extended with <|eot_id|> to that many tokens,
    attended and supervised, as LLaDA's SFT pads with EOS; earlier answers and a text already that long are not."""
    record = {"image": "x.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A box."},
        {"from": "human", "value": "And its colour?"}, {"from": "gpt", "value": "Red."}]}
    conv = conversations.parse_conversation(record, "f.json record 0")
    plain_ids, plain_labels = conversations.sample_tokens(conv, 1, base_cfg, base_tok, TextFormat(1000))
    last = len(base_tok.encode("Red.<|eot_id|>"))
    ids, labels = conversations.sample_tokens(conv, 1, base_cfg, base_tok, TextFormat(1000, answer_padding=last + 5))
    eot = base_tok.special.eot
    np.testing.assert_array_equal(ids, np.concatenate([plain_ids, [eot] * 5]))
    np.testing.assert_array_equal(labels, np.concatenate([plain_labels, [eot] * 5]))
    short = conversations.sample_tokens(conv, 1, base_cfg, base_tok, TextFormat(1000, answer_padding=last))
    np.testing.assert_array_equal(short[0], plain_ids)


def test_chat_template_is_the_inference_prompt(base_tok, base_cfg):
    """data.template: chat renders the first turn exactly as `answer()` prompts (SPEC-base §B3), and later turns
    the same way; the labels are still each answer with its <|eot_id|>."""
    from pdlm_jax.regions.prompt import build_question_text

    record = {"image": "x.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A box."},
        {"from": "human", "value": "And its colour?"}, {"from": "gpt", "value": "Red."}]}
    conv = conversations.parse_conversation(record, "f.json record 0")
    ids, labels = conversations.sample_tokens(conv, 1, base_cfg, base_tok, TextFormat(1000, template="chat"))
    prompt = build_question_text("What is this?", 1, base_cfg.region.num_image_tokens)
    pieces = [(prompt, False), ("A box.<|eot_id|>", True),
              (USER + "And its colour?<|eot_id|>" + ASSISTANT, False), ("Red.<|eot_id|>", True)]
    want_ids, want_labels = _expected(pieces, base_tok)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(labels, want_labels)


def test_synthetic_questions_as_training_samples(base_tok, base_cfg):
    """data.synthetic_scenes on a Base model: the scene's questions as turns, answers supervised, deterministic."""
    from train import synthetic

    source = conversations.SyntheticConversations(8, 3, base_cfg, base_tok, TextFormat(4096, answer_padding=8))
    for i in range(8):
        conv, image = source.sample_input(i)
        scene = synthetic.make_scene(3, i, task="sentences")
        assert np.array_equal(np.asarray(image), scene.image)
        truth = {q: a for _, q, a in synthetic.questions(scene)}
        turns = [(u.text.removeprefix("<image>\n"), a.text) for u, a in zip(conv.turns[::2], conv.turns[1::2])]
        assert len(turns) == 1 and all(truth[q] == a for q, a in turns) and not conv.independent
        sample = conversations.build_sample(conv, image, base_cfg, base_tok, TextFormat(4096, answer_padding=8))
        labels = sample.labels[sample.labels != IGNORE]
        pad = max(8 - len(base_tok.encode(turns[-1][1] + "<|eot_id|>")), 0)  # the last answer, padded to 8 tokens
        assert base_tok.decode(labels).endswith(turns[-1][1] + "<|eot_id|>" * (1 + pad))
        assert source.sample_input(i)[0] == conv
    with pytest.raises(PDLMError, match="length"):
        conversations.SyntheticConversations(8, 3, base_cfg, base_tok, TextFormat(10))  # the image would be cut


def test_synthetic_descriptions(base_tok, base_cfg):
    """data.synthetic_describe: that fraction of samples asks "Describe the image." and is answered with every
    shape's caption once, in reading order; the longest description must fit the length buckets."""
    from train import synthetic

    fmt = TextFormat(4096, answer_padding=8)
    source = conversations.SyntheticConversations(40, 3, base_cfg, base_tok, fmt, describe=0.5)
    kinds = []
    for i in range(40):
        conv, _ = source.sample_input(i)
        scene = synthetic.make_scene(3, i, task="sentences")
        kinds.append(conv.turns[0].text == "<image>\n" + synthetic.DESCRIBE)
        if kinds[-1]:
            captions = conv.turns[1].text.split(", ")
            assert sorted(captions) == sorted(scene.captions)
            order = [(scene.items[scene.captions.index(c)].row, scene.items[scene.captions.index(c)].column)
                     for c in captions]
            assert order == sorted(order)
    assert 10 < sum(kinds) < 30  # about half
    questions_only = conversations.SyntheticConversations(40, 3, base_cfg, base_tok, fmt)
    assert not any(questions_only.sample_input(i)[0].turns[0].text.endswith(synthetic.DESCRIBE) for i in range(40))
    def length(question, answer):
        conv = conversations.Conversation("x", "synthetic", (conversations.Turn("user", "<image>" + question),
                                                             conversations.Turn("assistant", answer)))
        tiles = base_cfg.region.max_tiles + (base_cfg.region.max_tiles > 1)  # the largest image, with a thumbnail
        return len(conversations.sample_tokens(conv, tiles, base_cfg, base_tok, TextFormat(4096))[0])

    one = synthetic.make_scene(0, 0, num_shapes=1, task="sentences")
    question_length = max(length(q, "in the top left") for _, q, _ in synthetic.questions(one))
    assert length(synthetic.DESCRIBE, ", ".join(["a small red circle in the top left"] * 6)) > question_length
    conversations.SyntheticConversations(8, 3, base_cfg, base_tok, TextFormat(question_length))
    with pytest.raises(PDLMError, match="length"):
        conversations.SyntheticConversations(8, 3, base_cfg, base_tok, TextFormat(question_length), describe=0.5)


def test_roles_follow_the_reference(base_tok, base_cfg):
    """{from, value}: system dropped. {role, content}: every role but user, system included, is a supervised
    assistant turn (T8.7)."""
    dropped = conversations.parse_conversation({"conversations": [
        {"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
        {"from": "gpt", "value": "Hello"}]}, "r")
    assert [t.role for t in dropped.turns] == ["user", "assistant"]
    kept = conversations.parse_conversation({"conversations": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"}]}, "r")
    assert [t.role for t in kept.turns] == ["assistant", "user", "assistant"]
    ids, labels = conversations.sample_tokens(kept, 1, base_cfg, base_tok, TextFormat(1000))
    pieces = [(SYSTEM + ASSISTANT, False), ("Be brief.<|eot_id|>", True), (USER + "Hi<|eot_id|>\n" + ASSISTANT, False),
              ("Hello<|eot_id|>", True)]
    want_ids, want_labels = _expected(pieces, base_tok)  # text only: no image tokens
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(labels, want_labels)


def test_truncation_keeps_the_image_and_an_answer(base_tok, base_cfg):
    conv = conversations.parse_conversation({"image": "x.png", "conversations": [
        {"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "one two three four five six"}]}, "r")
    ids, labels = conversations.sample_tokens(conv, 1, base_cfg, base_tok, TextFormat(1000))
    answer = np.flatnonzero(labels != IGNORE)
    cut_ids, cut_labels = conversations.sample_tokens(conv, 1, base_cfg, base_tok, TextFormat(int(answer[2])))
    np.testing.assert_array_equal(cut_ids, ids[:answer[2]])
    assert (cut_labels != IGNORE).sum() == 2  # the answer's tail and its <|eot_id|> are cut (T5.4)
    with pytest.raises(PDLMError, match="no answer token"):
        conversations.sample_tokens(conv, 1, base_cfg, base_tok, TextFormat(int(answer[0])))
    image_end = int(np.flatnonzero(ids == base_tok.special.image_context)[-1])
    with pytest.raises(PDLMError, match="image ends past"):
        conversations.sample_tokens(conv, 1, base_cfg, base_tok, TextFormat(image_end))


BAD_RECORDS = [
    ({"image": "img.png"}, "'conversations' must be a non-empty list"),
    ({"image": "img.png", "conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A"}]},
     "0 '<image>' tags"),
    ({"conversations": [{"from": "human", "value": "<image>Q?"}, {"from": "gpt", "value": "A"}]}, "1 '<image>' tags"),
    ({"image": "img.png", "conversations": [{"from": "human", "value": "<image>Q?"}, {"from": "gpt", "value": ""}]},
     "message 1 is empty"),
    ({"image": "img.png", "conversations": [{"from": "bot", "value": "<image>Q?"}]}, "message 0 must be"),
    ({"images": ["img.png", "img.png"], "conversations": [{"from": "human", "value": "<image><image>"}]},
     "several images are not supported"),
    ({"image": "missing.png", "conversations": [{"from": "human", "value": "<image>Q?"},
                                                {"from": "gpt", "value": "A"}]}, "not found"),
    ({"conversations": [{"role": "user", "content": "Q?"}]}, "no assistant message"),
]


@pytest.mark.parametrize("record,message", BAD_RECORDS)
def test_bad_records_are_named_at_load(tmp_path, base_tok, base_cfg, record, message):
    Image.new("RGB", (64, 64), "white").save(tmp_path / "img.png")
    good = {"image": "img.png", "conversations": [{"from": "human", "value": "<image>\nQ?"},
                                                  {"from": "gpt", "value": "A"}]}
    path = tmp_path / "conv.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(record) + "\n")
    with pytest.raises(PDLMError, match=message) as e:
        conversations.ConversationSource([str(path)], base_cfg, base_tok, TextFormat(512), 7)
    assert f"{path} line 3" in str(e.value) and "on_bad_record" in str(e.value)
    source = conversations.ConversationSource([str(path)], base_cfg, base_tok, TextFormat(512), 7, on_bad_record="skip")
    assert len(source) == 1 and len(source.skipped) == 1


# ---- the objective (T6) --------------------------------------------------------------------------------


def _scene_records(tmp_path, n):
    from train import synthetic

    records = []
    for i in range(n):
        scene = synthetic.make_scene(3, i, num_shapes=1 + i)
        Image.fromarray(scene.image).save(tmp_path / f"s{i}.png")
        records.append({"image": f"s{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nHow many shapes are there?"},
            {"from": "gpt", "value": str(len(scene.captions))},
            {"from": "human", "value": "Name them."}, {"from": "gpt", "value": ", ".join(scene.captions)}]})
    return records


def _batch(tmp_path, cfg, tok, n=2, length=128, tiles=7):
    from train.batches import Collate

    path = tmp_path / "conv.json"
    path.write_text(json.dumps(_scene_records(tmp_path, n)))
    source = conversations.ConversationSource([str(path)], cfg, tok, TextFormat(length), tiles)
    samples = [conversations.build_sample(conv, Image.open(img).convert("RGB"), cfg, tok, TextFormat(length))
               for conv, img in source.records]
    return Collate((tiles,), (length,), 0, tok.special.eot)(samples), samples


def test_loss_matches_the_reference_formula(tmp_path, base_ckpt, base_cfg, base_tok):
    """T6.3 recomputed from the plain pieces: image rows of the inference path scattered at <IMG_CONTEXT>, masked
    answer tokens replaced by embed[<|mdm_mask|>], full attention among the real tokens, per sample
    Σ_masked CE / p_b / A_b, mean over the batch."""
    from flax import nnx

    from pdlm_jax.modeling.pdm import from_tree
    from train.loss import draw_noise, mask_probability
    from train.step import batch_loss

    _, tree = pdlm_ckpt.restore_params(base_ckpt, dtype=np.float32)
    model = from_tree(base_cfg, tree)
    batch, samples = _batch(tmp_path, base_cfg, base_tok)
    assert len({len(s.labels) for s in samples}) == 2  # different lengths: padding is exercised
    key, mask_id = jax.random.key(7), base_tok.special.mask
    loss, masked = nnx.jit(batch_loss, static_argnums=3)(model, jax.tree.map(jnp.asarray, batch), key, mask_id)
    forward = nnx.jit(lambda model, noisy, keys: model.lm.logits(model.lm(noisy, keys)))

    t, u = (np.asarray(x) for x in draw_noise(key, batch.labels.shape))
    p = np.asarray(mask_probability(jnp.asarray(t)))
    L, per_sample, total_masked = batch.labels.shape[1], [], 0
    for b, s in enumerate(samples):
        n, ids, labels = len(s.labels), np.asarray(batch.inputs.input_ids[b]), np.asarray(batch.labels[b])
        embeds = model.lm.embed(jnp.asarray(ids))
        vision = model.encode_tiles(jnp.asarray(s.inputs.pixel_values))
        embeds = embeds.at[np.flatnonzero(ids[:n] == base_tok.special.image_context)].set(
            vision.reshape(-1, vision.shape[-1]))
        chosen = (u[b] < p[b]) & (labels != IGNORE)
        noisy = jnp.where(jnp.asarray(chosen)[:, None], model.lm.embed(jnp.asarray(mask_id)), embeds)
        keys = jnp.asarray(np.arange(L) < n)[None, None, None, :]
        logits = np.asarray(forward(model, noisy[None], keys), np.float64)[0]
        logp = logits - logits.max(-1, keepdims=True)
        logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
        ce = -logp[np.arange(L), np.where(labels == IGNORE, 0, labels)]
        per_sample.append(ce[chosen].sum() / p[b] / (labels != IGNORE).sum())
        total_masked += chosen.sum()
    assert int(masked) == total_masked > 0
    np.testing.assert_allclose(float(loss), np.mean(per_sample), rtol=2e-5)


def test_frozen_modules_keep_their_weights_and_get_no_optimizer_state(tmp_path, base_ckpt, base_cfg, base_tok):
    from types import SimpleNamespace

    from pdlm_jax import sharding as shd
    from pdlm_jax.trees import flatten
    from train.step import make_trainer

    optim = SimpleNamespace(lr=1e-2, warmup_ratio=0.0, end_lr_ratio=0.0, b1=0.9, b2=0.999, eps=1e-8,
                            weight_decay=0.0, clip_norm=1.0, grad_accum=1, noise_t_min=0.0)
    mesh = shd.make_mesh("data:-1")
    base_cfg = base_cfg.replace(region=dataclasses.replace(base_cfg.region, max_tiles=1))  # stage 1's one tile
    trainer = make_trainer(base_cfg, "bfloat16", mesh, optim, total_steps=3, mask_id=base_tok.special.mask)
    _, params = pdlm_ckpt.restore_params(base_ckpt, dtype=np.float32)
    start = {k: np.asarray(v) for k, v in flatten(params).items()}
    state = trainer.init_state(params, ("vision", "lm"))
    assert {l.dtype for l in jax.tree.leaves(state["frozen"])} == {jnp.dtype(jnp.bfloat16)}  # the compute dtype
    opt_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state["opt"])[0]]
    assert opt_paths and not [p for p in opt_paths if "'vision'" in p or "'lm'" in p]
    assert any("'projector'" in p for p in opt_paths)
    batch, _ = _batch(tmp_path, base_cfg, base_tok, tiles=1)
    for _ in range(3):
        state, _ = trainer.step(state, trainer.put_batch(batch))
    after = {k: np.asarray(v, np.float32) for k, v in flatten(trainer.model_params(state)).items()}
    for path, value in after.items():
        same = np.array_equal(value, start[path])  # bf16 checkpoint: the bf16 copy of a frozen weight is exact
        assert same == (not path.startswith("projector/")), path


# ---- the region model from Base (T7) ------------------------------------------------------------------


def test_region_model_from_base_copies_every_base_tensor(tmp_path, base_ckpt):
    """Every Base tensor copied bit for bit; only the mask-id embedding is new, ~ N(0, 1); the tokenizer gains the
    region tokens Base lacks, after its last id (the ids the reference's processor gives them)."""
    from pdlm_jax import sharding as shd
    from pdlm_jax.trees import flatten
    from train import config as train_config
    from train import init_from

    base = tmp_path / "base"  # Base's tokenizer without the region tokens, as LLaDA's + the image tokens
    shutil.copytree(base_ckpt, base)
    tok_json = json.loads((base / "tokenizer.json").read_text())
    tok_json["added_tokens"] = [t for t in tok_json["added_tokens"] if t["content"] not in REGION_TOKENS]
    (base / "tokenizer.json").write_text(json.dumps(tok_json))
    cfg = train_config.from_dict({"model": {"init_from": str(base), "kind": "region"},
                                  "run": {"output_dir": str(tmp_path / "run"), "seed": 3}})
    model_cfg = cfg.model_config()
    assert not model_cfg.is_base and model_cfg.quirks == Quirks() and model_cfg.region.prompt_numbers == 6
    (base / "sampler.json").write_text(json.dumps({"gen_length": 8, "steps": 8, "block_length": 4}))
    assert cfg.exported_sampler(model_cfg) == SamplerConfig(gen_length=8, steps=8)  # no block sampler's setting

    params = flatten(init_from.initial_params(cfg, model_cfg, shd.make_mesh("data:-1")))
    _, stored = pdlm_ckpt.restore_params(base, dtype=np.float32)
    stored = flatten(stored)
    assert sorted(params.keys() - stored.keys()) == ["mask_embed/embedding"]
    assert not stored.keys() - params.keys()
    for path, value in stored.items():
        np.testing.assert_array_equal(np.asarray(params[path]), np.asarray(value), err_msg=path)
    table = np.asarray(params["mask_embed/embedding"])
    assert table.shape == (6, model_cfg.vision.hidden_size) and 0.8 < table.std() < 1.2 and abs(table.mean()) < 0.2

    tokenizer_dir = init_from.training_tokenizer(cfg, model_cfg, tmp_path / "run")
    extended, original = Tokenizer(tokenizer_dir), Tokenizer(fixture_dir("base_tiny"))
    assert [extended.token_id(t) for t in REGION_TOKENS] == [original.token_id(t) for t in REGION_TOKENS]
    assert extended.vocab_size <= model_cfg.lm.vocab_size


def test_packed_questions_train_as_one_question_samples(base_ckpt, base_cfg, base_tok):
    """data.synthetic_questions: one image prompt, then each question and answer, recomputed as separate
    one-question samples: the prompt attends to itself only, each question to the prompt and itself at the
    positions it has alone; every answer has its own t and length, and the batch mean is over answers."""
    from flax import nnx

    from pdlm_jax.modeling.pdm import from_tree
    from train.batches import Collate
    from train.loss import draw_noise, mask_probability, packed_layout
    from train.step import batch_loss

    fmt = TextFormat(4096, answer_padding=8)
    source = conversations.SyntheticConversations(4, 3, base_cfg, base_tok, fmt, questions=3)
    convs = [source.sample_input(i) for i in (0, 1)]
    assert all(conv.independent and len(conv.turns) == 6 for conv, _ in convs)
    samples = [conversations.build_sample(conv, image, base_cfg, base_tok, fmt) for conv, image in convs]
    L = max(len(s.labels) for s in samples)
    batch = Collate((7,), (L,), 0, base_tok.special.eot)(samples)
    gathered = Collate((7,), (L,), 0, base_tok.special.eot, (64,))(samples)  # logits at the answers only
    assert gathered.answer_positions.shape[1] < L
    _, tree = pdlm_ckpt.restore_params(base_ckpt, dtype=np.float32)
    model = from_tree(base_cfg, tree)
    key, mask_id = jax.random.key(3), base_tok.special.mask
    loss, loss_gathered = (nnx.jit(batch_loss, static_argnums=(3, 4, 5, 6))(
        model, jax.tree.map(jnp.asarray, b), key, mask_id, 0.0, None, True)[0] for b in (batch, gathered))

    segment = packed_layout(jnp.asarray(batch.inputs.block_id))[0]
    t, u = (np.asarray(x) for x in draw_noise(key, batch.labels.shape, 0.0, segment))
    p = np.asarray(mask_probability(jnp.asarray(t)))
    forward = nnx.jit(lambda model, noisy, keys: model.lm.logits(model.lm(noisy, keys)))
    per_answer = []
    for b, ((conv, image), s) in enumerate(zip(convs, samples)):
        block = np.asarray(s.inputs.block_id)
        prompt = np.flatnonzero(block == 0)
        # the prompt as an unpacked sample tokenizes it: through the image
        alone = conversations.sample_tokens(dataclasses.replace(conv, turns=conv.turns[:2], independent=False),
                                            int(s.inputs.num_tiles), base_cfg, base_tok, fmt)[0]
        np.testing.assert_array_equal(s.inputs.input_ids[prompt], alone[:len(prompt)])
        vision = model.encode_tiles(jnp.asarray(s.inputs.pixel_values))
        for k in range(1, 4):
            rows = np.concatenate([prompt, np.flatnonzero(block == k)])  # the one-question sample, in order
            ids, labels = s.inputs.input_ids[rows], s.labels[rows]
            embeds = model.lm.embed(jnp.asarray(ids))
            embeds = embeds.at[np.flatnonzero(ids == base_tok.special.image_context)].set(
                vision.reshape(-1, vision.shape[-1]))
            chosen = (u[b, rows] < p[b, rows]) & (labels != IGNORE)
            noisy = jnp.where(jnp.asarray(chosen)[:, None], model.lm.embed(jnp.asarray(mask_id)), embeds)
            n = len(rows)
            sees = np.ones((n, n), bool)
            sees[:len(prompt), len(prompt):] = False  # the shared prompt does not see the question
            logits = np.asarray(forward(model, noisy[None], jnp.asarray(sees)[None, None]), np.float64)[0]
            logp = logits - logits.max(-1, keepdims=True)
            logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
            ce = -logp[np.arange(n), np.where(labels == IGNORE, 0, labels)]
            answer = labels != IGNORE
            assert len(set(t[b, rows][answer])) == 1  # one t per answer
            per_answer.append(ce[chosen].sum() / p[b, rows][answer][0] / answer.sum())
    assert len(set(t[0, samples[0].labels != IGNORE])) == 3  # and each answer its own
    np.testing.assert_allclose(float(loss), np.mean(per_answer), rtol=2e-5)
    np.testing.assert_allclose(float(loss_gathered), np.mean(per_answer), rtol=2e-5)


def test_packed_questions_must_share_the_image(base_tok, base_cfg):
    turns = (conversations.Turn("user", "Look: <image>What is it?"), conversations.Turn("assistant", "A box."),
             conversations.Turn("user", "<image>And its colour?"), conversations.Turn("assistant", "Red."))
    conv = conversations.Conversation("f.json record 0", "x.png", turns, independent=True)
    with pytest.raises(PDLMError, match="share the image"):
        conversations.conversation_tokens(conv, 1, base_cfg, base_tok, TextFormat(4096))
