"""Running a training job as a user would: file:// and gs:// paths, data running out
(stop with exit 3, or loop), resume refusing changed settings and trimming log.jsonl, config.yaml kept,
TensorBoard events, periodic evaluation, the profiler switch, and mixing annotation files with the synthetic
task."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import fixture_dir, memory_bucket

from pdlm_jax.errors import PDLMError
from pdlm_jax.files import as_path, atomic_write
from train import cli, config as train_config
from train.batches import build_pipeline
from train.config import DataConfig
from train.sources import AnnotationSource, make_sources

LR = 1e-3
# 8 synthetic scenes, one item each (group_divisor 6), batch 2: 4 steps of data
CONFIG = {
    "model": {"preset": "tiny", "config": {"region": {"max_tiles": 1}}, "tokenizer": str(fixture_dir("tiny_v1")),
              "dtype": "float32", "remat": False},
    "data": {"synthetic_scenes": 8, "batch_size": 2, "group_divisor": 6, "tile_buckets": [1],
             "length_buckets": [160], "threads": 1, "prefetch": 2},
    "optim": {"lr": LR, "warmup_ratio": 0.0},
    "run": {"max_steps": 5, "save_every": 2, "keep": 3, "export": True, "profile_steps": [3, 3]},
    "eval": {"every": 2, "synthetic_scenes": 2, "batch_size": 2, "max_records": 1, "gen_length": 2, "steps": 2},
}


def _events(logdir: Path) -> dict[str, list[int]]:
    """tag -> steps of the scalars in a TensorBoard event directory (TFRecord framing, tensorboardX protos)."""
    from tensorboardX.proto import event_pb2

    tags: dict[str, list[int]] = {}
    for f in sorted(logdir.glob("events.out.tfevents.*")):
        raw = f.read_bytes()
        pos = 0
        while pos < len(raw):
            (n,) = struct.unpack("<Q", raw[pos:pos + 8])
            event = event_pb2.Event.FromString(raw[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for value in event.summary.value:
                tags.setdefault(value.tag, []).append(event.step)
    return tags


def test_run_out_of_data_resume_checks_and_monitoring(tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.chdir(tmp_path)  # a mangled URL would show up as a relative "file:" folder here
    out = tmp_path / "run"
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump({**CONFIG, "run": {**CONFIG["run"], "output_dir": f"file://{out}",
                                                          "compilation_cache": str(tmp_path / "cache")}}))

    class Interrupt(Exception):
        pass

    def stop_at_three(step, record):
        if step == 3:
            raise Interrupt

    with pytest.raises(Interrupt):  # killed after step 3; the last checkpoint is step 2
        cli.train(train_config.load(cfg_file, ["eval.every=0"]), progress=False, callback=stop_at_three)
    assert not (tmp_path / "file:").exists() and (out / "checkpoints" / "2").is_dir()
    assert [json.loads(ln)["step"] for ln in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3]

    # a changed schedule is refused (one line, exit 2) and nothing is touched
    assert cli.main(["--config", str(cfg_file), "--no-progress", "run.max_steps=6"]) == 2
    err = capsys.readouterr().err
    assert "run.max_steps: 5 -> 6" in err and "--allow-changed-settings" in err and err.count("\n") == 1

    # resume with a harmless change: old config kept; 4 steps of data < max_steps 5 -> exit 3
    assert cli.main(["--config", str(cfg_file), "--no-progress", "run.log_every=2"]) == cli.EXIT_INCOMPLETE
    assert "stopped after 4 of run.max_steps=5" in capsys.readouterr().err
    old_config = json.loads((out / "config.step2.yaml").read_text())
    assert (old_config["run"]["log_every"], old_config["eval"]["every"]) == (1, 0)
    assert json.loads((out / "config.yaml").read_text())["run"]["log_every"] == 2

    records = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # step 3 of the killed run replaced, not duplicated
    # the lr schedule is sized for the 4 steps that ran (cosine over 4 steps, no warmup), not for 5
    assert records[-1]["lr"] == pytest.approx(LR * 0.5 * (1 + math.cos(math.pi * 3 / 4)), rel=1e-5)
    evals = {r["step"]: r for r in records if "eval_loss" in r}
    assert sorted(evals) == [4]  # every 2 steps and at the end (step 2 ran without eval before the kill)
    assert all(np.isfinite(r["eval_loss"]) and 0 <= r["eval_accuracy"] <= 1 and r["eval_regions"] > 0
               for r in evals.values())

    assert (out / "checkpoints" / "4").is_dir()  # the final checkpoint of the steps that ran
    provenance = json.loads((out / "export" / "provenance.json").read_text())
    assert (provenance["steps"], provenance["planned_steps"], provenance["complete"]) == (4, 5, False)

    tags = _events(out / "tensorboard")
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/step_time", "train/tokens_per_s"):
        assert sorted(set(tags[tag])) == [1, 2, 3, 4], tag
    assert tags["eval/accuracy"] == [4] and tags["eval/loss"] == [4]
    assert any(p.is_file() for p in (out / "profile").rglob("*"))  # the jax.profiler trace of step 3

    # --allow-changed-settings lets a schedule change through, said loudly, the old config kept
    changed = train_config.load(cfg_file, ["run.max_steps=6", "data.loop=true"]).to_dict()
    cli._check_resume(as_path(out), changed, 4, allow_changes=True, write=True)
    assert "changed config (data.loop: False -> True" in caplog.text and "run.max_steps: 5 -> 6" in caplog.text
    assert (out / "config.step4.yaml").read_text() == (out / "config.yaml").read_text()

    from train.export_step import export_step  # any kept step, through the same checkpoint manager set-up

    exported = export_step(f"file://{out}", tmp_path / "step2", step=2)
    assert json.loads((exported / "provenance.json").read_text())["steps"] == 2
    assert (exported / "params").is_dir() and (exported / "config.json").is_file()


def test_loop_repeats_the_data(tokenizer):
    cfg = train_config.from_dict({**CONFIG, "data": {**CONFIG["data"], "synthetic_scenes": 4, "loop": True}})
    pipe = build_pipeline(cfg.data, cfg.model_config(), tokenizer)
    assert pipe.steps_available is None and pipe.steps_per_epoch == 2
    it = iter(pipe.dataset)
    # three passes over the two batches of data, no StopIteration; every pass holds the 4 scenes once
    passes = [sorted(tuple(row) for _ in range(2) for row in next(it).inputs.input_ids) for _ in range(3)]
    assert passes[0] == passes[1] == passes[2] and len(set(passes[0])) == 4


def test_mixing_annotation_files_with_the_synthetic_task_by_weight(tmp_path, tokenizer, annotation_file):
    annotation_file(tmp_path / "ann.json", seed=11, num_shapes=1, caption="zebra", copies=20)
    cfg = train_config.from_dict({**CONFIG, "data": {**CONFIG["data"], "annotations": [str(tmp_path / "ann.json")],
                                                     "synthetic_scenes": 60, "weights": [1, 3], "batch_size": 1}})
    pipe = build_pipeline(cfg.data, cfg.model_config(), tokenizer)
    assert pipe.steps_available == 80  # 20 annotation items at weight 1/4: the first source to run out
    it = iter(pipe.dataset)
    answers = [tokenizer.decode(b.labels[0][b.labels[0] >= 0]) for b in (next(it) for _ in range(40))]
    assert sum("zebra" in a for a in answers) == 10  # exactly 1 in 4
    with pytest.raises(PDLMError, match="data.weights: give one weight per annotation file plus one"):
        make_sources(DataConfig(annotations=(str(tmp_path / "ann.json"),), synthetic_scenes=5))


def _gs_to(local_root: Path):
    """etils' mock backend mapping gs://bucket/... onto a local folder (no network)."""
    from etils.epath import testing

    def local(p) -> str:
        p = str(p)
        return str(local_root / p[len("gs://"):]) if p.startswith("gs://") else p

    def one(orig, path, *args, **kwargs):
        return orig(local(path), *args, **kwargs)

    def two(orig, path, dst, *args, **kwargs):
        return orig(local(path), local(dst), *args, **kwargs)

    def glob(orig, pattern):
        return ["gs://" + str(Path(p).relative_to(local_root)) for p in orig(local(pattern))]

    def listdir(orig, path):
        return orig(local(path))

    return testing.mock_epath(open=one, exists=one, isdir=one, makedirs=one, mkdir=one, rmtree=one, remove=one,
                              stat=one, walk=one, listdir=listdir, glob=glob, rename=two, replace=two, copy=two)


def test_gs_paths_go_through_epath(tmp_path, monkeypatch, annotation_file):
    """gs:// run and data paths reach the filesystem backend as URLs (here etils' mock backend over a local
    folder): no local 'gs:' folder, annotation files and images read, logs, TensorBoard events, the
    checkpoint folder and config.yaml written under the bucket."""
    from train import checkpointing, monitor

    from orbax.checkpoint._src.path import gcs_utils

    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)  # a GCS API call
    monkeypatch.chdir(tmp_path)
    bucket = tmp_path / "bucket"
    (bucket / "data").mkdir(parents=True)
    annotation_file(bucket / "data" / "ann.json", seed=11, num_shapes=1, caption="zebra", copies=2)
    with _gs_to(bucket):
        source = AnnotationSource(["gs://data/ann.json"])
        assert len(source) == 2 and source.label(1) == "gs://data/ann.json record 1"
        assert source[0].captions == ["zebra"] and source[0].masks[0].any()

        run = as_path("gs://runs/a")
        run.mkdir(parents=True)
        atomic_write(run / "config.yaml", "{}")
        assert train_config.read_saved("gs://runs/a") == {}
        run_log = monitor.RunLog(run, 0, tensorboard=True)
        run_log.write({"step": 1, "loss": 2.5})
        run_log.close()
        with checkpointing.checkpointer("gs://runs/a", keep=1) as ckptr:
            assert str(ckptr.directory) == "gs://runs/a/checkpoints"
    assert not (tmp_path / "gs:").exists()
    assert json.loads((bucket / "runs/a/log.jsonl").read_text()) == {"step": 1, "loss": 2.5}
    assert _events(bucket / "runs/a/tensorboard")["train/loss"] == [1]
    assert (bucket / "runs/a/checkpoints").is_dir()


def test_storage_paths():
    assert str(as_path("file:///tmp/x")) == "/tmp/x" and Path(str(as_path("rel"))).is_absolute()
    with memory_bucket():  # gs:// needs a filesystem package (gcsfs, or this stand-in)
        assert str(as_path("gs://bucket/run")) == "gs://bucket/run"


def test_resume_check_fills_in_entries_older_configs_lack(tmp_path):
    """A run saved by a version without the newer entries resumes without a false 'changed settings'."""
    cfg = train_config.load(None, ["run.max_steps=5"]).to_dict()
    old = json.loads(json.dumps(cfg, default=list))
    del old["eval"], old["data"]["loop"], old["data"]["weights"]
    (tmp_path / "config.yaml").write_text(json.dumps(old))
    cli._check_resume(as_path(tmp_path), cfg, 3, allow_changes=False, write=True)
    assert not (tmp_path / "config.step3.yaml").exists()  # nothing changed
    with pytest.raises(PDLMError, match=r"step 3 .*run.max_steps: 5 -> 6"):
        cli._check_resume(as_path(tmp_path), train_config.load(None, ["run.max_steps=6"]).to_dict(), 3,
                          allow_changes=False, write=True)


@pytest.mark.parametrize("override, message", [
    ("optim.lr=-1", "optim.lr must be a positive learning rate"),
    ("run.max_steps=0", "run.max_steps must be at least 1"),
    ("run.max_steps=abc", "run.max_steps must be an integer, got 'abc'"),
    ("run.mesh=data:2", "run.mesh: mesh spec 'data:2' needs 2 devices but 1 are available"),
    ("run.mesh=data:3,fsdp:-1", "devices do not divide by 3"),
])
def test_bad_settings_stop_before_any_data_is_read(tmp_path, capsys, override, message):
    """One line, exit 2, no run folder; the annotation file does not exist, so reading data would have
    failed with another message."""
    out = tmp_path / "run"
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump({**CONFIG, "data": {**CONFIG["data"], "annotations": ["missing.json"]},
                                        "run": {**CONFIG["run"], "output_dir": str(out)}}))
    assert cli.main(["--config", str(cfg_file), "--no-progress", override]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("pdlm-train: error:") and err.count("\n") == 1, err
    assert not out.exists()


def test_batch_must_split_over_the_batch_axes_of_the_mesh():
    cfg = train_config.load(None, ["run.mesh=data:8", "data.batch_size=2"])
    with pytest.raises(PDLMError, match=r"data.batch_size 2 does not split .*data 8 x fsdp 1 = 8 devices"):
        cli.check_devices(cfg, 8)
    sizes = cli.check_devices(train_config.load(None, ["run.mesh=fsdp:4,tensor:2", "data.batch_size=4"]), 8)
    assert sizes == {"data": 1, "fsdp": 4, "tensor": 2}


def test_too_little_data_names_both_factors_of_the_batch(tokenizer):
    cfg = train_config.from_dict({**CONFIG, "data": {**CONFIG["data"], "batch_size": 4},
                                  "optim": {**CONFIG["optim"], "grad_accum": 4}})
    with pytest.raises(PDLMError, match=r"8 training items are fewer than one batch of 16 = data.batch_size 4 x "
                                        r"optim.grad_accum 4"):
        build_pipeline(cfg.data, cfg.model_config(), tokenizer, grad_accum=cfg.optim.grad_accum)
