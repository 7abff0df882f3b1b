"""The diffusion objective (SPEC §11.1): loss and gradient against an independent torch computation.

Oracle: transformers' LlamaForCausalLM (a LLaDA block is a Llama block without the causal mask) loaded
with the tiny_v1 fixture's LM weights, the same clean input embeddings and structured mask, and the
§11.1 formula written in torch. The noise draw (t and the per-position uniforms) is fixed and shared.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from helpers import fixture_config, fixture_dir, fixture_tensors, load_reference_tree

from pdlm_jax.config import preset
from pdlm_jax.errors import PDLMError
from pdlm_jax.modeling.pdm import from_tree
from pdlm_jax.regions.tokenizer import Tokenizer
from train.batches import Collate
from train.samples import build_sample
from train.sources import SyntheticRecords
from train.loss import EPS, IGNORE, answer_positions, diffusion_loss, draw_noise, lm_diffusion_loss, noise_embeddings

NAME = "tiny_v1"


@pytest.fixture(scope="module")
def setup():
    cfg = fixture_config(NAME)
    tree = load_reference_tree(fixture_dir(NAME), cfg)
    tensors = fixture_tensors(NAME)
    special = Tokenizer(fixture_dir(NAME)).special
    ids = tensors["input_ids_after_replay"][0].astype(np.int64)
    embed_table = tree["lm"]["embed"]["embedding"]
    # Turn the inference prompt into two training samples: the <|mdm_mask|> slots become caption tokens.
    rng = np.random.default_rng(0)
    answer_start = int(np.flatnonzero(ids == special.mask_cap[0])[0])
    batch_ids, batch_embeds, batch_labels = [], [], []
    for b in range(2):
        sample = ids.copy()
        slots = np.flatnonzero(sample == special.mask)
        sample[slots] = rng.integers(0, 300, size=slots.size)
        embeds = tensors["inputs_embeds"][0].copy()
        embeds[slots] = embed_table[sample[slots]]
        labels = np.full_like(sample, IGNORE)
        labels[answer_start:] = sample[answer_start:]  # through the final <|eot_id|> (the last token)
        if b == 1:  # a shorter answer: only the first block is labelled
            labels[int(np.flatnonzero(ids == special.mask_cap[1])[0]):] = IGNORE
        batch_ids.append(sample), batch_embeds.append(embeds), batch_labels.append(labels)
    allowed = np.repeat(tensors["attention_allowed"][:, 0], 2, axis=0)
    _, u = draw_noise(jax.random.key(3), (2, ids.size))
    t = np.array([0.35, 0.8], np.float32)  # fixed draw: a light and a heavy masking rate
    labels = np.stack(batch_labels)
    answer = int((labels != IGNORE).sum(-1).max())
    positions = np.stack([answer_positions(row, answer + 5) for row in labels])  # 5 padding rows at least
    return dict(cfg=cfg, tree=tree, embeds=np.stack(batch_embeds), labels=labels, positions=positions,
                allowed=allowed, t=np.asarray(t), u=np.asarray(u), mask_id=special.mask)


def _full_logits_loss(lm, embeds, labels, allowed, t, u, mask_id):
    """The objective as it was before the answer-position gather: lm_head on all L rows."""
    noisy, masked = noise_embeddings(embeds, labels, t, u, lm.embed(jnp.asarray(mask_id, jnp.int32)))
    return diffusion_loss(lm.logits(lm(noisy, allowed[:, None])), labels, masked, t)


def _value_and_grads(s, loss_of):
    """Loss and its gradients w.r.t. every LM parameter and the clean input embeddings (through which the
    vision tower, projector and mask embedding get theirs)."""
    lm = from_tree(s["cfg"], s["tree"], dtype=jnp.float32).lm
    graphdef, params = nnx.split(lm)

    def loss_fn(p, embeds):
        args = (jnp.asarray(s["labels"]), jnp.asarray(s["allowed"]), jnp.asarray(s["t"]), jnp.asarray(s["u"]),
                s["mask_id"])
        return loss_of(nnx.merge(graphdef, p), embeds, *args)

    return jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))(nnx.to_pure_dict(params),
                                                                              jnp.asarray(s["embeds"]))


def _ours(s):
    (loss, masked), (grads, _) = _value_and_grads(
        s, lambda *a: lm_diffusion_loss(*a, jnp.asarray(s["positions"])))
    return float(loss), int(masked), grads


def _torch(s):
    lm = s["cfg"].lm
    hf_cfg = transformers.LlamaConfig(
        vocab_size=lm.vocab_size, hidden_size=lm.hidden_size, intermediate_size=lm.intermediate_size,
        num_hidden_layers=lm.num_layers, num_attention_heads=lm.num_heads, num_key_value_heads=lm.num_kv_heads,
        rope_theta=lm.rope_theta, rms_norm_eps=lm.rms_norm_eps, hidden_act="silu", attention_bias=False,
        mlp_bias=False, tie_word_embeddings=False, max_position_embeddings=1024, attn_implementation="eager")
    model = transformers.LlamaForCausalLM(hf_cfg).float()
    tr = s["tree"]["lm"]
    state = {"model.embed_tokens.weight": tr["embed"]["embedding"], "model.norm.weight": tr["final_norm"]["scale"],
             "lm_head.weight": tr["lm_head"]["kernel"].T}
    names = {"input_layernorm.weight": ("input_norm", "scale"), "post_attention_layernorm.weight": ("post_norm", "scale"),
             "self_attn.q_proj.weight": ("attn", "q"), "self_attn.k_proj.weight": ("attn", "k"),
             "self_attn.v_proj.weight": ("attn", "v"), "self_attn.o_proj.weight": ("attn", "o"),
             "mlp.gate_proj.weight": ("mlp", "gate"), "mlp.up_proj.weight": ("mlp", "up"),
             "mlp.down_proj.weight": ("mlp", "down")}
    for i in range(lm.num_layers):
        for hf, (a, b) in names.items():
            w = tr["layers"][a][b][i] if b == "scale" else tr["layers"][a][b]["kernel"][i].T
            state[f"model.layers.{i}.{hf}"] = w
    model.load_state_dict({k: torch.tensor(np.ascontiguousarray(v)) for k, v in state.items()})

    # SPEC §11.1 in torch
    labels = torch.tensor(s["labels"])
    t, u = torch.tensor(s["t"]), torch.tensor(s["u"])
    p = (1 - EPS) * t + EPS
    masked = (u < p[:, None]) & (labels != IGNORE)
    m_emb = model.model.embed_tokens.weight[s["mask_id"]]
    noisy = torch.where(masked[..., None], m_emb, torch.tensor(s["embeds"]))
    additive = torch.where(torch.tensor(s["allowed"])[:, None], 0.0, torch.finfo(torch.float32).min)
    logits = model(inputs_embeds=noisy, attention_mask=additive).logits.float()
    ce = torch.nn.functional.cross_entropy(logits[masked], labels[masked], reduction="none")
    per_sample = torch.zeros(labels.shape[0]).index_add(0, torch.nonzero(masked)[:, 0], ce / p[torch.nonzero(masked)[:, 0]])
    loss = (per_sample / (labels != IGNORE).sum(-1)).mean()
    loss.backward()
    grads = {name: prm.grad.numpy() for name, prm in model.named_parameters()}
    return float(loss.detach()), int(masked.sum()), grads


def test_loss_and_gradient_match_torch(setup):
    loss, masked, grads = _ours(setup)
    t_loss, t_masked, t_grads = _torch(setup)
    assert masked == t_masked > 0
    assert abs(loss - t_loss) <= 1e-5 * abs(t_loss)
    pairs = [(grads["embed"]["embedding"], t_grads["model.embed_tokens.weight"]),
             (grads["lm_head"]["kernel"], t_grads["lm_head.weight"].T),
             (grads["final_norm"]["scale"], t_grads["model.norm.weight"])]
    for i in range(setup["cfg"].lm.num_layers):
        pairs += [(grads["layers"]["attn"]["q"]["kernel"][i], t_grads[f"model.layers.{i}.self_attn.q_proj.weight"].T),
                  (grads["layers"]["attn"]["o"]["kernel"][i], t_grads[f"model.layers.{i}.self_attn.o_proj.weight"].T),
                  (grads["layers"]["mlp"]["down"]["kernel"][i], t_grads[f"model.layers.{i}.mlp.down_proj.weight"].T),
                  (grads["layers"]["input_norm"]["scale"][i], t_grads[f"model.layers.{i}.input_layernorm.weight"])]
    for ours, theirs in pairs:
        scale = np.abs(theirs).max()
        assert scale > 0
        # float32 with different summation orders: measured max error ~3e-5 of the gradient's scale
        np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4 * scale, rtol=0)


def test_answer_gather_equals_full_logits(setup):
    """lm_head at the gathered answer positions gives today's full-logits loss and gradients (every LM
    parameter and the input embeddings), padding rows of the answer bucket included."""
    (full, _), (full_grads, full_embeds) = _value_and_grads(setup, lambda *a: (_full_logits_loss(*a), 0))
    positions = jnp.asarray(setup["positions"])
    (loss, _), (grads, embeds) = _value_and_grads(setup, lambda *a: lm_diffusion_loss(*a, positions))
    assert positions.shape[1] < setup["labels"].shape[1] / 2  # far fewer rows than L...
    assert np.all(setup["positions"][:, -5:] == setup["labels"].shape[1])  # ...some of them padding
    assert abs(float(loss) - float(full)) <= 1e-5 * abs(float(full))
    assert jax.tree.structure(grads) == jax.tree.structure(full_grads)
    for ours, theirs in zip(jax.tree.leaves((grads, embeds)), jax.tree.leaves((full_grads, full_embeds))):
        scale = float(jnp.abs(theirs).max())
        assert scale > 0
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=1e-4 * scale, rtol=0)


def test_collate_gathers_answer_positions_into_buckets():
    tokenizer = Tokenizer(fixture_dir(NAME))
    cfg = preset("tiny")  # as tests/test_train_data.py
    source = SyntheticRecords(4, seed=1)
    samples = [build_sample(source[i], list(range(len(source[i].masks))), np.random.default_rng(i), cfg,
                            tokenizer) for i in range(2)]
    answers = [int(np.sum(s.labels != IGNORE)) for s in samples]
    small = max(answers)  # a bucket exactly the longest answer, one larger, one larger than the sequence
    for buckets, want in [((small, small + 10), small), ((small - 1, small + 10), small + 10), ((), 400),
                          ((1000,), 400)]:
        batch = Collate((7,), (400,), 6, tokenizer.special.eot, buckets)(samples)
        positions = batch.answer_positions
        assert positions.shape == (2, want) and positions.dtype == np.int32
        for row, labels, n in zip(positions, batch.labels, answers):
            np.testing.assert_array_equal(row[:n], np.flatnonzero(labels != IGNORE))
            assert np.all(row[n:] == 400)  # padding: out of range, ignored by the loss
    with pytest.raises(PDLMError, match="answer_buckets"):
        Collate((7,), (400,), 6, tokenizer.special.eot, (small - 1,))(samples)


def test_only_answer_tokens_are_masked_and_rate_follows_t():
    labels = jnp.where(jnp.arange(4000)[None] % 2 == 0, 5, IGNORE).repeat(2, 0)
    t = jnp.array([0.1, 0.9])
    u = jax.random.uniform(jax.random.key(0), labels.shape)
    emb = jnp.ones((2, 4000, 3))
    _, masked = noise_embeddings(emb, labels, t, u, jnp.zeros(3))
    assert not bool(jnp.any(masked & (labels == IGNORE)))
    rate = np.asarray(jnp.sum(masked, 1) / jnp.sum(labels != IGNORE, 1))
    np.testing.assert_allclose(rate, (1 - EPS) * np.asarray(t) + EPS, atol=0.03)


def test_noise_t_min_bounds_the_diffusion_time():
    from train.loss import draw_noise
    t, _ = draw_noise(jax.random.key(1), (20000, 2))
    assert float(t.min()) < 0.01  # the reference: U[0, 1)
    t, u = draw_noise(jax.random.key(1), (20000, 2), t_min=0.4)
    assert 0.4 <= float(t.min()) < 0.41 and float(t.max()) < 1.0 and u.shape == (20000, 2)
    np.testing.assert_allclose(float(t.mean()), 0.7, atol=0.01)
