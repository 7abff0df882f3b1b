"""int8 and int4 weight-only inference (pdlm_jax.quantize, qwix PTQ): kernels stored as int8 / int4 (with
blockwise scales), the forward close to float, and the embedded demo model still captions its demo scene
correctly through pdlm-infer."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix
from flax import nnx

from infer.cli import main
from pdlm_jax import quantize
from pdlm_jax.asset_paths import DEMO_SCENE
from pdlm_jax.config import preset
from pdlm_jax.errors import PDLMError
from pdlm_jax.modeling.pdm import PerceptionDLM


def weight_bytes(model: nnx.Module) -> int:
    """Bytes of every array in the model's state (parameters and quantization scales; int4 counted packed)."""
    return sum(x.size * jnp.dtype(x.dtype).itemsize if x.dtype != jnp.int4 else (x.size + 1) // 2
               for x in jax.tree.leaves(nnx.state(model)) if hasattr(x, "dtype"))


def test_int8_kernels_and_forward_close_to_float():
    cfg = preset("tiny")
    model = PerceptionDLM(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (1, 7, cfg.lm.hidden_size))
    reference = np.asarray(model.lm(x))
    float_bytes = weight_bytes(model)

    qmodel, tracer = quantize.quantize_model(nnx.clone(model), "int8")
    q = qmodel.lm.layers.mlp.up.kernel.array
    assert q.qvalue.dtype == np.int8 and q.qvalue.shape == (cfg.lm.num_layers, cfg.lm.hidden_size,
                                                            cfg.lm.intermediate_size)
    assert q.scale.shape == (cfg.lm.num_layers, 1, cfg.lm.intermediate_size)  # per layer and output channel
    assert weight_bytes(qmodel) < 0.5 * float_bytes  # embeddings and norms stay float32

    graphdef, state = nnx.split(qmodel)
    out = np.asarray(jax.jit(tracer(lambda s: nnx.merge(graphdef, s).lm(x)))(state))
    err = np.abs(out - reference).max() / np.abs(reference).max()
    assert 0 < err < 0.05, err  # int8 rounding is visible but small


def test_int4_groups_of_input_rows():
    # one scale per output channel and group of 128 input rows (the largest divisor up to 128 elsewhere)
    assert [quantize.group_size(n, "int4") for n in (4096, 12288, 1152, 4304, 96)] == [128, 128, 128, 16, 96]
    assert quantize.group_size(4096, "int8") is None
    kernel = jax.random.normal(jax.random.key(0), (2, 512, 8)) * jnp.linspace(0.1, 10.0, 512)[:, None]
    q = quantize.quantize_kernel(kernel, "int4", quantize.group_size(512, "int4"))
    assert q.qvalue.dtype == jnp.int4 and q.qvalue.shape == kernel.shape and q.scale.shape == (2, 4, 8)
    grouped = np.abs(np.asarray(qwix.dequantize(q))[0, :128] - kernel[0, :128]).mean()
    per_channel = np.abs(np.asarray(qwix.dequantize(qwix.quantize(kernel[0], jnp.int4, channelwise_axes=(1,))))
                         [:128] - kernel[0, :128]).mean()
    assert grouped < 0.5 * per_channel  # rows of very different size: groups keep the small ones' precision


def test_int4_forward_close_to_float():
    cfg = preset("tiny")
    model = PerceptionDLM(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (1, 7, cfg.lm.hidden_size))
    reference = np.asarray(model.lm(x))
    qmodel, tracer = quantize.quantize_model(nnx.clone(model), "int4")
    assert qmodel.lm.layers.mlp.up.kernel.array.qvalue.dtype == jnp.int4
    assert weight_bytes(qmodel) < 0.4 * weight_bytes(model)
    graphdef, state = nnx.split(qmodel)
    out = np.asarray(jax.jit(tracer(lambda s: nnx.merge(graphdef, s).lm(x)))(state))
    err = np.abs(out - reference).max() / np.abs(reference).max()
    assert 0 < err < 0.1, err


def test_unknown_mode():
    with pytest.raises(PDLMError, match="int8, int4"):
        quantize.check_mode("int2")


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_infer_cli_on_demo_model(tmp_path, mode):
    out = tmp_path / "result.json"
    assert main(["--demo", "--quantize", mode, "--output", str(out), "--visualize", str(tmp_path / "o.png"),
                 "--quiet"]) == 0
    captions = [r["caption"] for r in json.loads(out.read_text())["regions"]]
    assert captions == json.loads((DEMO_SCENE / "captions.json").read_text())


def test_abstract_int8_plan_compiles_without_weights():
    cfg = preset("tiny")
    graphdef, state, tracer = quantize.abstract(lambda: PerceptionDLM(cfg, rngs=nnx.Rngs(0)))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(state))
    assert {str(x.dtype) for x in jax.tree.leaves(state)} == {"float32", "int8"}
    x = jax.ShapeDtypeStruct((1, 7, cfg.lm.hidden_size), np.float32)
    compiled = jax.jit(tracer(lambda s, x: nnx.merge(graphdef, s).lm(x))).lower(state, x).compile()
    lm = jax.tree.leaves(state["lm"]["layers"])  # what this program reads: int8 kernels, float32 norms
    as_int8 = sum(x.size * x.dtype.itemsize for x in lm)
    as_float32 = sum(x.size * 4 for x in lm)
    assert as_int8 <= compiled.memory_analysis().argument_size_in_bytes < as_float32
