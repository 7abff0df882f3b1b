"""Exact resume: a run interrupted after step k — by an exception, or by SIGTERM as a preempted machine gets —
and resumed gives the same losses as an uninterrupted run; the exported model loads in the inference API."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from helpers import ROOT, fixture_dir

from train import cli, config as train_config, preemption
from train.cli import train

WAIT_S = 300  # bound on the subprocess reaching a step or exiting (compiling on a loaded 2-core machine)


class Interrupt(Exception):
    pass


def _cfg_dict(out, cache) -> dict:
    return {
        "model": {"preset": "tiny", "tokenizer": str(fixture_dir("tiny_v1")), "dtype": "float32", "remat": True},
        "data": {"synthetic_scenes": 40, "batch_size": 2, "group_divisor": 6, "tile_buckets": [7],
                 "length_buckets": [320], "threads": 1, "prefetch": 2},
        "optim": {"lr": 1e-3, "grad_accum": 2},
        "run": {"output_dir": str(out), "max_steps": 4, "save_every": 2, "keep": 2, "compilation_cache": str(cache),
                "export": True},
    }


def _cfg(out, cache):
    return train_config.from_dict(_cfg_dict(out, cache))


def _losses(out):
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """(output dir, result, compilation cache) of the uninterrupted run every test compares with."""
    root = tmp_path_factory.mktemp("resume")
    cache = root / "cache"
    return root / "a", train(_cfg(root / "a", cache), progress=False), cache


def test_interrupted_and_resumed_run_matches_uninterrupted(tmp_path, uninterrupted):
    full_dir, full, cache = uninterrupted

    def stop_after_two(step, record):
        if step == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(_cfg(tmp_path / "b", cache), progress=False, callback=stop_after_two)
    assert sorted(_losses(tmp_path / "b")) == [1, 2]
    resumed = train(_cfg(tmp_path / "b", cache), progress=False)  # picks up the step-2 checkpoint
    assert len(resumed["losses"]) == 2
    assert _losses(tmp_path / "b") == _losses(full_dir)  # bit-identical losses, steps 1..4

    import pdlm_jax  # the export is a pdlm-infer checkpoint
    from train import synthetic

    model = pdlm_jax.load(full["export"], dtype="float32")
    scene = synthetic.make_scene(5, 0, num_shapes=2)
    result = model.caption_regions(scene.image, scene.masks, gen_length=2, steps=2)
    assert len(result["regions"]) == 2


def test_sigterm_saves_the_step_reached_and_the_same_command_resumes(tmp_path, uninterrupted):
    """pdlm-train in a subprocess, held after step 3 until the test's SIGTERM has arrived (so the signal lands
    mid-run however fast the machine is): it saves step 3 (not a save_every step) and exits with
    EXIT_PREEMPTED; the same command then finishes the run with the uninterrupted run's losses."""
    full_dir, _, cache = uninterrupted
    out, cfg_file = tmp_path / "b", tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(_cfg_dict(out, cache)))
    command = ["--config", str(cfg_file), "--no-progress"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    with open(tmp_path / "train.log", "w+") as output:
        proc = subprocess.Popen([sys.executable, __file__, "3", *command], env=env, stdout=output,
                                stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            deadline = time.monotonic() + WAIT_S
            while not ((out / "log.jsonl").exists() and 3 in _losses(out)):
                assert proc.poll() is None and time.monotonic() < deadline, (output.seek(0), output.read())[1]
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=WAIT_S)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        output.seek(0)
        log = output.read()
    assert rc == preemption.EXIT_PREEMPTED, log
    assert "SIGTERM received" in log and "stopped at step 3 of 4" in log
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == [2, 3]
    assert sorted(_losses(out)) == [1, 2, 3] and not (out / "export").exists()

    assert cli.main(command) == 0  # the same command again: resumes at step 3
    assert _losses(out) == _losses(full_dir)


def _held_run(hold_step: int, argv: list[str]) -> int:
    """pdlm-train that waits after step `hold_step` until it has received a stop signal (at most WAIT_S)."""
    requests = []

    class Recorded(preemption.StopRequest):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            requests.append(self)

    def hold(step, record):
        deadline = time.monotonic() + WAIT_S
        while step == hold_step and not requests[-1].signalled and time.monotonic() < deadline:
            time.sleep(0.01)

    preemption.StopRequest = Recorded
    original = cli.train
    cli.train = lambda *args, **kwargs: original(*args, **kwargs, callback=hold)
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(_held_run(int(sys.argv[1]), sys.argv[2:]))
