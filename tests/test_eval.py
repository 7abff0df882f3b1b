"""`python -m train.eval`: the fast-mode table, the Base model's questions by type, and the demo tools that build
the sentences-task models (the composed Base start, the training curves)."""

import json
from pathlib import Path

import numpy as np

from pdlm_jax.asset_paths import DEMO_BASE_MODEL, DEMO_MODEL, DEMO_SHAPES_MODEL
from pdlm_jax.errors import PDLMError
from train import demo, eval as train_eval


def test_mode_table_compares_every_mode_with_the_first(tmp_path, capsys):
    out = tmp_path / "modes.json"
    assert train_eval.main(["--scenes", "2", "--repeats", "1", "--modes", "exact,prefix,threshold:0.9",
                            "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["mode"] for r in rows] == ["exact", "prefix", "threshold:0.9"]
    exact, steps = rows[0], json.loads((DEMO_MODEL / "sampler.json").read_text())["steps"]
    assert exact["speedup"] == 1.0 and exact["token_agreement"] == 1.0 and exact["forwards_per_image"] == steps
    assert all(0 <= r["token_agreement"] <= 1 and r["forwards_per_image"] <= steps for r in rows)
    table = capsys.readouterr().out
    assert "| mode | forwards / image |" in table and "| threshold:0.9 |" in table
    # the scenes are of the task each model was trained on (its provenance)
    assert train_eval.trained_task(DEMO_MODEL) == "sentences" and train_eval.trained_task(DEMO_SHAPES_MODEL) == "shapes"


def test_base_model_is_asked_one_question_of_every_type(converted):
    """The random base_tiny fixture answers gibberish; the report still counts every question by type."""
    report = train_eval.evaluate(converted("base_tiny"), scenes=2, gen_length=8, block_length=8, steps=8)
    assert report["kind"] == "base" and report["task"] == "sentences"
    assert list(report["by_type"])[0] == "count" and report["by_type"]["count"]["total"] == 2
    assert report["questions"] == sum(t["total"] for t in report["by_type"].values()) >= 2 * 3


def test_blank_image_asks_about_grey_and_refuses_region_models(converted, capsys, monkeypatch):
    from pdlm_jax.answering import QuestionAnswerer

    seen, answer = [], QuestionAnswerer.answer

    def recording(self, image, *args, **kwargs):
        seen.append(np.unique(image).tolist())
        return answer(self, image, *args, **kwargs)

    monkeypatch.setattr(QuestionAnswerer, "answer", recording)
    report = train_eval.evaluate(converted("base_tiny"), scenes=1, gen_length=8, block_length=8, steps=8, blank=True)
    assert report["blank"] and len(seen) == report["questions"] >= 3 and all(s == [128] for s in seen)
    assert train_eval.main(["--blank-image", "--scenes", "1"]) == 2  # the demo model is a region model
    assert "--blank-image" in capsys.readouterr().err


def test_base_start_composes_a_pretrained_vision_tower_with_a_random_lm(tmp_path, monkeypatch, capsys):
    import jax
    import pytest

    from pdlm_jax.checkpoint import load_config, restore_params

    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the config's tokenizer path is the repository's
    out = demo.base_start("configs/demo2_base.yaml", tmp_path / "start", vision=DEMO_BASE_MODEL)
    assert load_config(out).is_base
    _, start = restore_params(out)
    _, trained = restore_params(DEMO_BASE_MODEL)
    leaves = zip(jax.tree.leaves(start["vision"]), jax.tree.leaves(trained["vision"]))
    assert all(np.array_equal(a, b) for a, b in leaves)
    assert not np.allclose(start["lm"]["embed"]["embedding"], trained["lm"]["embed"]["embedding"])
    with pytest.raises(PDLMError, match="does not fit"):  # 8-px patches where the config has 16
        demo.base_start("configs/demo2_base.yaml", tmp_path / "other", vision=DEMO_SHAPES_MODEL)
    with pytest.raises(SystemExit):
        demo.main(["base-start", "--config", "configs/demo2_base.yaml", "--pretrain-steps", "-1", "--out",
                   str(tmp_path / "negative")])
    assert "--pretrain-steps must be 0" in capsys.readouterr().err and not (tmp_path / "negative").exists()


def test_curve_bins_the_log_and_keeps_the_evaluations(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "loss": float(s)} for s in range(1, 201)] + [{"step": 200, "eval_loss": 1.0, "eval_accuracy": 0.5}]
    (run / "log.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    stem = tmp_path / "curve"
    demo.write_curves([str(run)], ["a run"], stem)
    curve = json.loads(stem.with_suffix(".json").read_text())[0]
    assert curve["loss_per_100_steps"] == {"100": 50.5, "200": 150.5}
    assert curve["evaluations"] == [{"step": 200, "eval_loss": 1.0, "eval_accuracy": 0.5}]
    assert stem.with_suffix(".png").stat().st_size > 0
