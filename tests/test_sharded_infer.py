"""Sharded inference on 8 fake CPU devices: token-exact fixture results under several meshes.

The body runs in the session's subprocess with 8 fake devices (conftest's `fake_devices`), so the rest of the
suite keeps its single device.
"""

import json

import pytest

from helpers import fixture_dir, fixture_oracle

# (fixture, mesh, images per call, cache mode): data larger than the batch, pure fsdp, pure tensor (the
# vocabulary of 402 does not divide 8: replicated), all three axes with a batch that divides data × fsdp and
# one that does not; the prefix-cache mode (compared with its single-device run).
CASES = [
    ("tiny_v1", "data:8", 1, "none"),
    ("tiny_v1", "fsdp:8", 1, "none"),
    ("tiny_v1", "tensor:8", 1, "none"),
    ("tiny_v1", "data:2,fsdp:2,tensor:2", 4, "none"),
    ("tiny_v1_wide", "data:2,fsdp:2,tensor:2", 1, "none"),
    ("tiny_v1_wide", "data:-1,tensor:2", 3, "none"),
    ("tiny_v1", "data:2,fsdp:2,tensor:2", 2, "prefix"),
]


CLI_CASE = ("tiny_v1_roi4", "data:2,fsdp:2,tensor:2")


def _child(checkpoints: dict[str, str], cli_output: str) -> list[dict]:
    import jax

    import pdlm_jax
    from infer.cli import main as infer_main
    from pdlm_jax import sharding

    assert jax.device_count() == 8
    name, mesh = CLI_CASE
    d, oracle = fixture_dir(name), fixture_oracle(name)
    assert infer_main(["--checkpoint", checkpoints[name], "--image", str(d / "image.png"), "--masks",
                       *[str(d / f) for f in oracle["masks"]["files"]], "--gen-length", "8", "--steps", "8",
                       "--mesh", mesh, "--output", cli_output, "--quiet"]) == 0
    out = []
    for name, mesh, copies, cache in CASES:
        d, oracle = fixture_dir(name), fixture_oracle(name)
        gen = oracle["generation"]
        handle = pdlm_jax.load(checkpoints[name], dtype="float32", mesh=mesh)
        q = handle.program.state["lm"]["layers"]["attn"]["q"]["kernel"][...]
        vocab = handle.program.state["lm"]["lm_head"]["kernel"][...]
        item = (d / "image.png", [d / f for f in oracle["masks"]["files"]])
        results = handle.caption_batch([item] * copies, gen_length=gen["gen_length_per_mask"],
                                         steps=gen["steps"], cache=cache)
        out.append(dict(name=name, mesh=mesh, cache=cache, mesh_shape=dict(handle.mesh.shape),
                        q_spec=list(q.sharding.spec), vocab_spec=list(vocab.sharding.spec),
                        expected_q_spec=list(sharding.logical_spec(q.shape, ("layers", "embed", "heads"),
                                                                   handle.mesh)),
                        token_ids=[[r["token_ids"] for r in res["regions"]] for res in results],
                        forwards=[res["forwards"] for res in results]))
    return out


@pytest.fixture(scope="module")
def sharded_results(converted, tmp_path_factory, fake_devices):
    checkpoints = {name: str(converted(name, "float32")) for name in sorted({c[0] for c in CASES} | {CLI_CASE[0]})}
    cli_output = tmp_path_factory.mktemp("sharded") / "cli.json"
    results = {(r["name"], r["mesh"], r["cache"]): r
               for r in fake_devices.run("test_sharded_infer", "_child", checkpoints, str(cli_output))}
    results[CLI_CASE] = json.loads(cli_output.read_text())
    results["checkpoints"] = checkpoints
    return results


def test_cli_mesh_flag_is_token_exact(sharded_results):
    result, oracle = sharded_results[CLI_CASE], fixture_oracle(CLI_CASE[0])
    for c, j in enumerate(oracle["masks"]["sort_idx_desc_area"]):
        assert result["regions"][j]["token_ids"] == oracle["outputs"]["caption_tokens"][c]["token_ids"]


@pytest.mark.parametrize("name, mesh, copies, cache", CASES)
def test_sharded_results_are_token_exact(sharded_results, name, mesh, copies, cache):
    r = sharded_results[(name, mesh, cache)]
    oracle = fixture_oracle(name)
    order = oracle["masks"]["sort_idx_desc_area"]
    if cache == "none":
        want = [oracle["outputs"]["caption_tokens"][c]["token_ids"] for c in range(3)]
    else:  # an approximate mode: the single-device run of the same mode is the reference
        import pdlm_jax

        single = pdlm_jax.load(sharded_results["checkpoints"][name]).caption_regions(
            fixture_dir(name) / "image.png", [fixture_dir(name) / f for f in oracle["masks"]["files"]],
            gen_length=8, steps=8, cache=cache)
        want = [single["regions"][j]["token_ids"] for j in order]
    assert len(r["token_ids"]) == copies
    for ids in r["token_ids"]:
        assert [ids[j] for j in order] == want
    assert r["forwards"] == [oracle["generation"]["num_forwards"]] * copies
    assert r["q_spec"] == r["expected_q_spec"]  # restored straight into the rules' sharding


def test_parameters_are_really_sharded(sharded_results):
    both = sharded_results[("tiny_v1", "data:2,fsdp:2,tensor:2", "none")]
    assert both["mesh_shape"] == {"data": 2, "fsdp": 2, "tensor": 2}
    assert both["q_spec"] == [None, "fsdp", "tensor"]
    assert both["vocab_spec"] == ["fsdp", "tensor"]  # vocab 402 splits over 2
    # 4 heads of 16 = 64 columns over 8 devices do divide, so tensor:8 shards them too.
    assert sharded_results[("tiny_v1", "tensor:8", "none")]["q_spec"] == [None, None, "tensor"]
    # ... but a vocabulary of 402 does not: the lm_head falls back to replication.
    assert sharded_results[("tiny_v1", "tensor:8", "none")]["vocab_spec"] == [None, None]
    assert sharded_results[("tiny_v1_wide", "data:-1,tensor:2", "none")]["mesh_shape"]["data"] == 4
