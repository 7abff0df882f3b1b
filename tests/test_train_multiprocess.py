"""Multi-host training: 2 CPU processes joined by `jax.distributed.initialize` train exactly like 1 process.

Two worker subprocesses (1 CPU device each) go through the CLI's `_init_distributed` (coordinator on a
free localhost port, gloo CPU collectives) and run `train.cli.train` on the same synthetic config with
mesh `data:-1` and a global batch of 2, so each process loads its own half of every batch (the data
pipeline splits it by process) and the gradients are all-reduced across processes. They share one
output directory, as hosts share storage, so the Orbax training checkpoints and the final export go
through their multi-process path. The reference is the same config in one process with 2 fake CPU devices
(another subprocess, so XLA_FLAGS takes effect; it runs alongside the pair). Per-step losses and a
float64 sum of squares of every final parameter must agree between the two processes and with the reference.

Global batch 2 = one sample per process: the pipeline gives process p the items p, p + n, ... so for a
larger per-process batch the global batch would hold the same samples in another order, and the
noise (drawn per batch row) would differ from the single-process run.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from helpers import fake_devices_env

HERE = Path(__file__).resolve().parent
STEPS = 3
TIMEOUT_S = 1200  # all workers together: a bound for a hang, generous for a loaded 2-core machine


def _config(out: Path) -> dict:
    return {
        "model": {"preset": "tiny", "tokenizer": str(HERE / "fixtures" / "tiny_v1"), "dtype": "float32",
                  "remat": False},
        "data": {"synthetic_scenes": 12, "batch_size": 2, "group_divisor": 6, "tile_buckets": [7],
                 "length_buckets": [320], "threads": 1, "prefetch": 1},
        "optim": {"lr": 1e-3, "warmup_ratio": 0.0},
        "run": {"output_dir": str(out), "mesh": "data:-1", "max_steps": STEPS, "save_every": 2, "keep": 1,
                "export": True},
    }


def _worker(argv: list[str]) -> None:
    """argv: CONFIG_JSON RESULT_JSON [pdlm-train distributed flags]."""
    import jax

    from train import checkpointing, cli, config as train_config

    cfg_path, result_path, *flags = argv
    args = cli.build_parser().parse_args(flags)
    cli._init_distributed(args)
    cfg = train_config.from_dict(json.loads(Path(cfg_path).read_text()))
    out = cli.train(cfg, progress=False)

    params = checkpointing.full_params(out["state"])
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        params = multihost_utils.process_allgather(params, tiled=True)

    result = {"process_index": jax.process_index(), "process_count": jax.process_count(),
              "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
              "losses": out["losses"], "params_sumsq": _sumsq(params),
              "export": None if out["export"] is None else str(out["export"])}
    Path(result_path).write_text(json.dumps(result))


def _sumsq(tree) -> dict[str, float]:
    """{leaf path: float64 sum of squares} of a param tree."""
    import jax

    from pdlm_jax import trees

    return {k: float(np.sum(np.square(np.asarray(jax.device_get(v), np.float64))))
            for k, v in trees.flatten(tree).items()}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path: Path, jobs: dict[str, tuple[int, list[list[str]]]]) -> dict[str, list[dict]]:
    """Start every worker of every job at once (name -> (CPU devices per process, one flag list per process)),
    wait for all of them and return their results by job; fails with the workers' output."""
    procs = []  # (name, rank, Popen, log file)
    for name, (devices, flags) in jobs.items():
        cfg_file = tmp_path / f"{name}_config.json"
        cfg_file.write_text(json.dumps(_config(tmp_path / name)))
        env = fake_devices_env(devices)
        for rank, f in enumerate(flags):
            log = open(tmp_path / f"{name}_{rank}.log", "w+")
            cmd = [sys.executable, __file__, str(cfg_file), str(tmp_path / f"{name}_{rank}.json"), *f]
            procs.append((name, rank, subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                       cwd=HERE.parent), log))
    deadline = time.monotonic() + TIMEOUT_S
    timed_out = False
    for _, _, p, _ in procs:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            timed_out = True
            break
    for _, _, p, _ in procs:  # a process whose peer died may block in a collective: stop the stragglers
        if p.poll() is None:
            p.kill()
            p.wait()
    report = []
    for name, rank, p, log in procs:
        log.seek(0)
        report.append(f"--- {name} process {rank} (rc={p.returncode}) ---\n{log.read()[-4000:]}")
        log.close()
    failed = timed_out or any(p.returncode != 0 for _, _, p, _ in procs)
    assert not failed, (f"timed out after {TIMEOUT_S}s\n" if timed_out else "") + "\n".join(report)
    return {name: [json.loads((tmp_path / f"{name}_{rank}.json").read_text()) for rank in range(len(flags))]
            for name, (_, flags) in jobs.items()}


def _assert_close(a: dict[str, float], b: dict[str, float], what: str) -> None:
    assert sorted(a) == sorted(b), what
    keys = sorted(a)
    np.testing.assert_allclose([a[k] for k in keys], [b[k] for k in keys], rtol=1e-5, atol=1e-8, err_msg=what)


def test_two_process_training_matches_single_process(tmp_path):
    coordinator = ["--coordinator", f"127.0.0.1:{_free_port()}", "--num-processes", "2"]
    results = _launch(tmp_path, {
        "multi": (1, [coordinator + ["--process-id", str(rank)] for rank in range(2)]),  # 2 processes x 1 device
        "single": (2, [[]]),  # 1 process x 2 devices
    })
    multi, (single,) = results["multi"], results["single"]

    assert (single["process_count"], single["device_count"]) == (1, 2)
    for rank, r in enumerate(multi):  # really two processes, one device each, one global mesh of 2
        assert (r["process_index"], r["process_count"], r["device_count"], r["local_device_count"]) == (rank, 2, 2, 1)
        assert len(r["losses"]) == STEPS and all(np.isfinite(r["losses"]))
    assert len(single["losses"]) == STEPS and len(set(single["losses"])) == STEPS  # training moves

    # both processes see the same (globally reduced) losses and parameters...
    assert multi[0]["losses"] == multi[1]["losses"], (multi[0]["losses"], multi[1]["losses"])
    _assert_close(multi[0]["params_sumsq"], multi[1]["params_sumsq"], "process 0 vs 1 params")
    # ...equal to those of the single-process run on the same number of devices
    np.testing.assert_allclose(multi[0]["losses"], single["losses"], rtol=1e-5, err_msg="losses multi vs single")
    _assert_close(multi[0]["params_sumsq"], single["params_sumsq"], "params multi vs single")

    # the shared output directory: process 0's log of every step, the checkpoints both processes saved
    logged = [json.loads(x)["loss"] for x in (tmp_path / "multi" / "log.jsonl").read_text().splitlines()]
    assert logged == multi[0]["losses"]
    ckpts = tmp_path / "multi" / "checkpoints"
    assert sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) == [STEPS]  # step 2's was pruned

    # process 0 reports the export, which holds the trained params
    from pdlm_jax import checkpoint as pdlm_ckpt

    assert multi[1]["export"] is None and multi[0]["export"] and single["export"]
    _, exported = pdlm_ckpt.restore_params(multi[0]["export"], dtype=np.float32)
    _assert_close(_sumsq(exported), multi[0]["params_sumsq"], "multi export vs trained params")


if __name__ == "__main__":
    _worker(sys.argv[1:])
