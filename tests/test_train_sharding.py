"""A sharded train step equals the single-device step (8 fake CPU devices, in a subprocess).

The body runs in the session's subprocess with 8 fake devices (conftest's `fake_devices`), so the rest of the
test session keeps one device. It runs the same step (same batch, same noise, no warmup so the update is
not zero) on a 1-device mesh, on fsdp=4 × tensor=2 and on data=8, and reports the largest differences of
the updated parameters, the loss and the gradient norm.
"""

from __future__ import annotations

import pytest
from helpers import fixture_dir

from pdlm_jax.errors import PDLMError


def _child() -> dict:
    import jax
    import numpy as np

    from pdlm_jax import sharding as shd
    from pdlm_jax.config import preset
    from pdlm_jax.regions.tokenizer import Tokenizer
    from train import step as step_lib
    from train.batches import build_pipeline
    from train.config import DataConfig, OptimConfig

    assert jax.device_count() == 8
    cfg = preset("tiny")
    tokenizer = Tokenizer(fixture_dir("tiny_v1"))
    dcfg = DataConfig(synthetic_scenes=8, batch_size=8, group_divisor=6, tile_buckets=(7,),
                      length_buckets=(320,), threads=1, prefetch=1)
    batch = next(iter(build_pipeline(dcfg, cfg, tokenizer).dataset))
    params = jax.device_get(step_lib.init_params(cfg, 0, shd.make_mesh("data:1", jax.devices()[:1])))

    results = {}
    for name, spec, devices in [("single", "data:1", jax.devices()[:1]),
                                ("fsdp4_tensor2", "fsdp:4,tensor:2", None), ("data8", "data:8", None)]:
        mesh = shd.make_mesh(spec, devices)
        trainer = step_lib.make_trainer(cfg, "float32", mesh, OptimConfig(warmup_ratio=0.0), 10,
                                        tokenizer.special.mask)
        state = trainer.init_state(params, ())
        if name == "fsdp4_tensor2":  # the big matrices really are split
            spec_q = state["params"]["lm"]["layers"]["attn"]["q"]["kernel"].sharding.spec
            assert tuple(spec_q) == (None, "fsdp", "tensor"), spec_q
        new, metrics = trainer.step(state, trainer.put_batch(batch))
        results[name] = (jax.device_get(new["params"]), float(metrics["loss"]), float(metrics["grad_norm"]))

    ref_params, ref_loss, ref_norm = results.pop("single")
    report = {}
    for name, (p, loss, norm) in results.items():
        diffs = [float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(ref_params))]
        report[name] = {"param_max_abs_diff": max(diffs), "loss_diff": abs(loss - ref_loss),
                        "grad_norm_rel_diff": abs(norm - ref_norm) / ref_norm}
    return report


def test_sharded_step_equals_single_device(fake_devices):
    report = fake_devices.run("test_train_sharding", "_child")
    print(report)
    for name in ("fsdp4_tensor2", "data8"):
        r = report[name]
        assert r["param_max_abs_diff"] <= 1e-5, (name, r)
        assert r["loss_diff"] <= 1e-5 and r["grad_norm_rel_diff"] <= 1e-5, (name, r)


def test_mesh_spec_errors():
    from pdlm_jax import sharding as shd

    assert shd.parse_mesh("fsdp:4,tensor:2", 8) == {"data": 1, "fsdp": 4, "tensor": 2}
    assert shd.parse_mesh("data:-1,tensor:2", 8) == {"data": 4, "fsdp": 1, "tensor": 2}
    for bad in ("data:3", "model:2", "data=2", "data:-1,fsdp:-1"):
        with pytest.raises(PDLMError):
            shd.parse_mesh(bad, 8)
