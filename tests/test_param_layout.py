"""The model is the one source of its parameters: the converter's contract (keymap), the name rules and
the shardings all agree with the module tree, for every preset (the 8B one abstractly: nothing allocated)."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re

import jax
import numpy as np
import pytest
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AbstractMesh, PartitionSpec

from pdlm_jax import keymap, sharding
from pdlm_jax.config import PRESETS, preset
from pdlm_jax.errors import PDLMError
from pdlm_jax.modeling import PerceptionDLM, param_layout
from pdlm_jax.modeling.layout import abstract_params, model_shardings, param_specs
from pdlm_jax.trees import nest


def _configs():
    for name in PRESETS:
        yield name, preset(name)
    tiny, big = preset("tiny"), preset("perceptiondlm-8b")
    yield "tiny-base", dataclasses.replace(tiny, variant="base")
    yield "8b-base", dataclasses.replace(big, variant="base")
    yield "tiny-post-ln", tiny.replace(region=dataclasses.replace(tiny.region, vision_select_layer=-1))


CONFIGS = dict(_configs())
MESHES = [AbstractMesh(shape, sharding.MESH_AXES) for shape in [(1, 8, 1), (1, 4, 2), (2, 2, 2)]]


@pytest.mark.parametrize("name", CONFIGS)
def test_converter_rules_and_module_tree_agree(name):
    cfg = CONFIGS[name]
    model = nnx.eval_shape(lambda: PerceptionDLM(cfg, rngs=nnx.Rngs(0)))
    tree = {"/".join(map(str, p)): tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert keymap.expected_shapes(cfg) == tree
    assert not nnx.state(model, lambda path, v: not isinstance(v, nnx.Param))  # no stray state

    # every leaf is the target of exactly one name rule of this variant, and every such rule has its leaf
    rules = [r for r in keymap.RULES if cfg.variant in r.variants]
    targets = [r.target for r in rules]
    assert sorted(set(targets)) == sorted(targets)
    assert set(tree) <= set(targets), set(tree) - set(targets)
    unused = {"vision/post_ln/scale", "vision/post_ln/bias"} if not cfg.uses_post_layernorm else set()
    assert set(targets) - set(tree) == unused
    layout = param_layout(cfg)
    for rule in rules:
        if rule.target in tree:  # stacked reference tensors <-> the leading 'layers' axis, one per layer
            info = layout[rule.target]
            assert rule.stacked == (info.axes[:1] == ("layers",)), rule
            if rule.stacked:
                assert info.shape[0] == keymap.num_layers_for(cfg, rule.target)
    # the generated reference names map back onto their leaves
    for ref_name, (target, layer, transform) in keymap.reference_names(cfg).items():
        assert keymap.match(cfg, ref_name) == keymap.Match(ref_name, target, layer, transform)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_param_has_logical_axes_and_shardings(name):
    cfg = CONFIGS[name]
    layout = param_layout(cfg)
    for path, info in layout.items():
        assert len(info.axes) == len(info.shape), (path, info)
        assert set(info.axes) - {None} <= set(sharding.DEFAULT_RULES), (path, info.axes)
    for mesh in MESHES:
        shardings = _flat(model_shardings(cfg, mesh))
        assert set(shardings) == set(layout)
        per_device = 0
        for path, info in layout.items():
            shard = shardings[path].shard_shape(info.shape)  # raises if a dimension does not divide
            per_device += math.prod(shard)
        total = sum(math.prod(i.shape) for i in layout.values())
        if name == "perceptiondlm-8b":  # the 8B weights really are split 8 ways (only small leaves whole)
            parts = math.prod(mesh.shape[a] for a in ("fsdp", "tensor"))
            assert per_device < 1.01 * total / parts, (dict(mesh.shape), per_device / total)


@pytest.mark.parametrize("name", ["tiny", "perceptiondlm-8b"])
def test_logical_names_mean_one_size_per_tower(name):
    """Within the LM and within the vision tower a logical name is one dimension of the architecture, so an
    annotation on the wrong axis (a transposed kernel's names, 'embed' on an 'mlp' axis) fails here."""
    cfg = CONFIGS[name]
    lm, v = cfg.lm, cfg.vision
    sizes = {"lm": {"layers": lm.num_layers, "embed": lm.hidden_size, "norm": lm.hidden_size,
                    "heads": lm.num_heads * lm.head_dim, "mlp": lm.intermediate_size, "vocab": lm.vocab_size},
             "vision": {"layers": cfg.num_vision_layers_used, "embed": v.hidden_size, "norm": v.hidden_size,
                        "heads": v.num_heads * v.head_dim, "mlp": v.intermediate_size}}
    for path, info in param_layout(cfg).items():
        tower = sizes.get(path.split("/")[0])
        if tower is None:
            continue
        for size, axis in zip(info.shape, info.axes):
            if axis is not None:
                assert size == tower[axis], (path, info)


def _flat(tree):
    return {sharding.path_str(kp): s for kp, s in jax.tree_util.tree_leaves_with_path(tree)}


def test_annotations_reach_the_shardings():
    """Each parameter's own annotation is what sharding uses, in the model and in a train state, whose
    optimizer moments take their parameter's spec."""
    from train import config as train_config
    from train import step as step_lib

    cfg = preset("perceptiondlm-8b")
    mesh = AbstractMesh((1, 4, 2), sharding.MESH_AXES)
    specs = _flat(nnx.to_pure_dict(param_specs(abstract_params(cfg), mesh)))
    assert specs["lm/layers/attn/q/kernel"] == PartitionSpec(None, "fsdp", "tensor")
    assert specs["projector/fc1/kernel"] == PartitionSpec("fsdp", "tensor")
    assert specs["lm/layers/input_norm/scale"] == PartitionSpec(None, None)  # 'norm': replicated
    assert specs["vision/layers/mlp/fc2/bias"] == PartitionSpec(None, "fsdp")  # follows fc2's output

    trainer = step_lib.make_trainer(cfg, "bfloat16", mesh, train_config.load(None, []).optim, 10, 0)
    shapes = nest({p: jax.ShapeDtypeStruct(i.shape, np.float32) for p, i in param_layout(cfg).items()})
    abstract = jax.eval_shape(lambda p: trainer._new_state(p, ("vision",)), shapes)
    state = _flat(trainer.state_specs(abstract))
    assert {p: s for p, s in state.items() if p.startswith(("params/", "frozen/"))} == {
        p: s for p, s in ((f"{'frozen' if p.startswith('vision/') else 'params'}/{p}", s) for p, s in specs.items())}
    moments = {p: s for p, s in state.items() if re.fullmatch(r"opt/.*/(mu|nu)/.*", p)}
    assert len(moments) == 2 * sum(p.startswith("params/") for p in state)
    for path, spec in moments.items():  # optimizer moments follow their parameter
        assert spec == state["params/" + re.sub(r"opt/.*?/(mu|nu)/", "", path)], path
    assert state["step"] == PartitionSpec() and all(s == PartitionSpec() for p, s in state.items()
                                                    if p.startswith("opt/") and p not in moments)


def test_a_leaf_without_logical_axes_is_an_error():
    """Only declared leaves are replicated: a variable that carries no logical axes (or axes of another rank)
    raises, naming the leaf, instead of being silently whole on every device."""
    mesh = AbstractMesh((1, 2, 1), sharding.MESH_AXES)
    leaf = jax.ShapeDtypeStruct((8, 16), np.float32)
    with pytest.raises(PDLMError, match="'lm/embed/extra_table' has no logical axes"):
        param_specs(nnx.State({"lm": {"embed": {"extra_table": nnx.Param(leaf)}}}), mesh)
    with pytest.raises(PDLMError, match="'lm/embed/embedding' has 2 dimension.*3 logical axes"):
        wrong = nnx.Param(leaf, out_sharding=("layers", "vocab", "embed"), eager_sharding=False)
        param_specs(nnx.State({"lm": {"embed": {"embedding": wrong}}}), mesh)
    # declared: LoRA adapters, qwix's quantized kernels and scales, scalars
    declared = nnx.State({"lm": {"q": {"kernel_lora_a": nnx.LoRAParam(leaf), "kernel": {"array": {
        "qvalue": leaf, "scale": leaf}}}, "count": nnx.Param(jax.ShapeDtypeStruct((), np.int32))}})
    for path, spec in _flat(param_specs(declared, mesh)).items():
        assert all(axis is None for axis in spec), (path, spec)


# ---- make_mesh: jax's device order, its real errors out ---------------------------------------------------


def test_make_mesh_lets_unexpected_errors_out(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("device query failed")

    monkeypatch.setattr(mesh_utils, "create_device_mesh", broken)
    # only jax's torus check falls back to the devices' given order; any other error is a real one
    with pytest.raises(RuntimeError, match="device query failed"):
        sharding.make_mesh("data:1", jax.devices()[:1])


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs the aot extra (libtpu)")
def test_make_mesh_follows_the_tpu_torus_for_any_split(caplog):
    from pdlm_jax import hardware

    target = hardware.target("v5p:4x4x4")
    hardware.quiet_tpu_environment(target)
    devices = target.devices()  # compile-only devices with torus coordinates
    # data:2 splits a physical axis of 4: jax refuses that unless asked, and make_mesh must not fall back to
    # plain row-major order silently
    mesh = sharding.make_mesh("data:2,fsdp:32", devices)
    assert mesh.shape == {"data": 2, "fsdp": 32, "tensor": 1}
    assert (mesh.devices != np.asarray(devices).reshape(mesh.devices.shape)).any()
    # three chips in an L, (0,0,0) (1,0,0) (0,1,0), are no block of the torus: the order given, with a warning
    subset = devices[:3]
    assert [tuple(d.coords) for d in subset] == [(0, 0, 0), (1, 0, 0), (0, 1, 0)]
    with caplog.at_level("WARNING", logger="pdlm_jax.sharding"):
        mesh = sharding.make_mesh("data:3", subset)
    assert list(mesh.devices.flat) == subset and "not a whole block of the TPU torus" in caplog.text
