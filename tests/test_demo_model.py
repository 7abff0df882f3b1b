"""The embedded demo model: `pdlm-infer --demo` out of the box, and the from-scratch init options it was
trained with."""

import json
import re
from pathlib import Path

import numpy as np

from infer.cli import main as infer_main
from pdlm_jax import DEMO_BASE_MODEL, DEMO_MODEL, DEMO_SCENE
from train import synthetic
from train.step import sincos_2d


def test_demo_command_captions_the_bundled_scene(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # --demo writes demo_result.json and demo_overlay.png to the cwd
    assert infer_main(["--demo", "--quiet"]) == 0
    result = json.loads((tmp_path / "demo_result.json").read_text())
    truth = json.loads((DEMO_SCENE / "captions.json").read_text())
    sampler = json.loads((DEMO_MODEL / "sampler.json").read_text())
    assert (result["gen_length"], result["steps"]) == (sampler["gen_length"], sampler["steps"])
    assert [r["caption"] for r in result["regions"]] == truth  # regions come back in mask order
    assert all(synthetic.parse_caption(c) for c in truth)  # the sentence grammar
    assert (tmp_path / "demo_overlay.png").stat().st_size > 0


def test_demo_question_is_answered_by_the_base_demo_model(tmp_path, capsys):
    """`pdlm-infer --demo --question` with no --checkpoint: the embedded Base demo model answers about the scene."""
    from train.demo import DEMO_SCENE_INDEX, DEMO_SCENE_SEED

    scene = synthetic.make_scene(DEMO_SCENE_SEED, DEMO_SCENE_INDEX, num_shapes=5, task="sentences")
    question, truth = next((q, a) for kind, q, a in synthetic.questions(scene) if kind == "count")
    out = tmp_path / "answer.json"
    assert infer_main(["--demo", "--question", question, "--output", str(out), "--quiet"]) == 0
    result = json.loads(out.read_text())
    sampler = json.loads((DEMO_BASE_MODEL / "sampler.json").read_text())
    assert (result["gen_length"], result["block_length"], result["steps"]) == (
        sampler["gen_length"], sampler["block_length"], sampler["steps"])
    assert result["answer"] == truth == "five"
    assert capsys.readouterr().out.splitlines()[0] == f"{question} five"


def test_usage_snippet_of_the_base_demo_model_prints_its_count(capsys):
    usage = (Path(__file__).resolve().parents[1] / "docs" / "USAGE.md").read_text()
    snippet = next(b for b in re.findall(r"```python\n(.*?)```", usage, re.S) if "DEMO_BASE_MODEL" in b)
    exec(snippet, {"pdlm_jax": __import__("pdlm_jax")})
    assert capsys.readouterr().out.splitlines() == ["five"]


def test_usage_snippet_prints_the_true_captions(capsys):
    """docs/USAGE.md's `pdlm_jax.load()` snippet runs as written: the demo model with its own sampler settings."""
    usage = (Path(__file__).resolve().parents[1] / "docs" / "USAGE.md").read_text()
    snippet = next(b for b in re.findall(r"```python\n(.*?)```", usage, re.S) if "pdlm_jax.load()" in b)
    namespace: dict = {}
    exec(snippet, namespace)
    assert capsys.readouterr().out.splitlines() == json.loads((DEMO_SCENE / "captions.json").read_text())
    sampler = json.loads((DEMO_MODEL / "sampler.json").read_text())
    assert (namespace["result"]["gen_length"], namespace["result"]["steps"]) == (sampler["gen_length"],
                                                                                  sampler["steps"])


def test_demo_scene_matches_the_task_generator():
    """The bundled scene is exactly what `python -m train.demo scene` writes (so it can be rebuilt)."""
    from train.demo import DEMO_SCENE_INDEX, DEMO_SCENE_SEED
    from PIL import Image

    scene = synthetic.make_scene(DEMO_SCENE_SEED, DEMO_SCENE_INDEX, num_shapes=5, task="sentences")
    assert np.array_equal(np.asarray(Image.open(DEMO_SCENE / "image.png")), scene.image)
    for i, m in enumerate(scene.masks):
        assert np.array_equal(np.asarray(Image.open(DEMO_SCENE / f"mask_{i}.png")) > 0, m)


def test_sincos_position_table():
    table = sincos_2d(4, 12)
    assert table.shape == (16, 12) and table.dtype == np.float32
    # row r·4 + c: the first half encodes the row, the second half the column
    assert np.allclose(table[1, :6], table[0, :6]) and not np.allclose(table[1, 6:], table[0, 6:])
    assert np.allclose(table[4, 6:], table[0, 6:]) and not np.allclose(table[4, :6], table[0, :6])
    assert len({tuple(np.round(r, 6)) for r in table}) == 16  # every patch has its own code


def test_init_options_of_a_from_scratch_run():
    import jax
    import pytest

    from pdlm_jax import sharding as shd
    from pdlm_jax.config import preset
    from pdlm_jax.errors import PDLMError
    from train.step import init_params

    cfg = preset("tiny")
    mesh = shd.make_mesh("data:1", jax.devices()[:1])
    params = jax.device_get(init_params(cfg, 0, mesh, mask_embed_std=0.1, vision_pos_embed="sincos"))
    assert abs(float(np.std(params["mask_embed"]["embedding"])) - 0.1) < 0.02
    grid = cfg.vision.image_size // cfg.vision.patch_size
    assert np.array_equal(params["vision"]["pos_embed"]["embedding"], sincos_2d(grid, cfg.vision.hidden_size))
    default = jax.device_get(init_params(cfg, 0, mesh))
    assert abs(float(np.std(default["mask_embed"]["embedding"])) - 1.0) < 0.2  # the reference's N(0, 1)
    with pytest.raises(PDLMError, match="vision_pos_embed_init"):
        init_params(cfg, 0, mesh, vision_pos_embed="learned")


def test_a_relative_checkpoint_path_loads(monkeypatch):
    """Orbax needs absolute paths; `--checkpoint runs/x/export` from the shell must still work."""
    from pdlm_jax.checkpoint import params_metadata, restore_params

    monkeypatch.chdir(DEMO_MODEL.parent)
    meta = params_metadata(DEMO_MODEL.name)
    cfg, params = restore_params(DEMO_MODEL.name)
    assert meta and params["lm"]["embed"]["embedding"].shape[0] == cfg.lm.vocab_size


def test_demo_assets_carry_the_configs_that_made_them():
    """Each embedded model ships the committed config that trained it, the region model has its Base's
    architecture, and the from-scratch comparison trains that same architecture."""
    import yaml

    root = Path(__file__).resolve().parents[1]
    for asset, config in ((DEMO_BASE_MODEL, "demo2_base"), (DEMO_MODEL, "demo2")):
        assert (asset / "training_config.yaml").read_text() == (root / "configs" / f"{config}.yaml").read_text()
    base, region = (json.loads((m / "config.json").read_text()) for m in (DEMO_BASE_MODEL, DEMO_MODEL))
    scratch = yaml.safe_load((root / "configs" / "demo2_scratch.yaml").read_text())["model"]["config"]
    for part in ("vision", "lm"):
        assert region[part] == base[part]
        assert scratch[part].items() <= base[part].items()
