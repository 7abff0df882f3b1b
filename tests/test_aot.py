"""pdlm-aot: argument errors (no extra needed), target names, and tiny compiles for a TPU and a GPU target when
the `aot` extra (libtpu, the CUDA plugin) is installed."""

import importlib.util
import json
import re

import pytest

from aot import cli as aot
from pdlm_jax import PDLMError, hardware, programs

HAS_TPU = importlib.util.find_spec("libtpu") is not None
HAS_CUDA = importlib.util.find_spec("jax_cuda13_plugin") is not None or \
    importlib.util.find_spec("jax_cuda12_plugin") is not None
HAS_CUDNN = importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.cudnn") is not None


def run_cli(capsys, *argv):
    code = aot.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_target_names():
    assert hardware.target("h100").num_devices == 1 and hardware.target("h100x8").num_devices == 8
    v5p = hardware.target("v5p:4x4x4")
    assert (v5p.platform, v5p.num_devices, v5p.chip.kind) == ("tpu", 64, "TPU v5p")
    assert hardware.target("v5e:2x4").chip.device_memory_bytes == 16 * 2**30
    assert hardware.target("h200").gpu_spec.read_text().count("device_memory_size: 141000000000") == 1
    for name in ("l4", "rtx4090"):  # the 24 GB cards: compute capability 8.9
        assert "major: 8\n    minor: 9" in hardware.target(name).gpu_spec.read_text()
        assert hardware.target(name).chip.device_memory_bytes == 24 * 10**9
    assert hardware.target("v5e:1x1").num_devices == 1
    with pytest.raises(PDLMError, match="known: h100, h200, h100x8"):
        hardware.target("a100")


@pytest.mark.parametrize("argv, message", [
    (["--target", "k80", "--task", "infer"], "unknown target 'k80'; known: h100"),
    (["--target", "h100", "--task", "infer", "--preset", "tiny", "--masks", "7"], "--masks must be in 1..6"),
    (["--target", "h100", "--task", "infer", "--preset", "tiny", "--mode", "fast"], "--mode 'fast'"),
    (["--target", "h100", "--task", "infer", "--preset", "tiny", "--tiles", "2"], "--tiles 2: this model tiles"),
    (["--target", "h100", "--task", "infer", "--preset", "tiny", "--steps", "99", "--masks", "1",
      "--gen-length", "4"], "steps=99 exceeds"),
    (["--target", "h100", "--task", "infer", "--preset", "nope"], "unknown preset 'nope'"),
    (["--target", "v5e:2x4", "--task", "infer", "--preset", "tiny", "--attention", "splash"], "no splash path"),
    (["--target", "v5p:2x2x1", "--task", "train", "--preset", "tiny", "--set", "optim.nope=1"],
     "unknown keys ['nope']"),
    (["--target", "v5p:2x2x1", "--task", "train", "--preset", "tiny", "--set", "optim.lr"], "expected section.key"),
])
def test_bad_arguments_exit_2_with_one_line(capsys, argv, message):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("pdlm-aot: error: ") and err.count("\n") == 1 and message in err


def check_schema(result: dict, unit: str):
    assert set(aot.SCHEMA_KEYS) <= set(result)
    assert set(result["memory_per_device_bytes"]) >= {"arguments", "outputs", "temporaries", "total"}
    mem = result["memory_per_device_bytes"]
    assert mem["total"] == mem["arguments"] + mem["outputs"] + mem["temporaries"] - mem["aliased"] > 0
    assert result["fits"] == (mem["total"] <= result["device_memory_bytes"])
    assert result[f"model_flops_per_{unit}"] > 0 and result[f"roofline_seconds_per_{unit}"] > 0
    assert result["peak_flops"] > 0 and result["memory_bandwidth"] > 0 and result["compile_seconds"] > 0


@pytest.mark.skipif(not HAS_CUDA, reason="the aot extra's CUDA plugin is not installed (pip install '.[aot]')")
def test_tiny_infer_compiles_for_h100(capsys, tmp_path):
    out = tmp_path / "h100.json"
    argv = ["--target", "h100", "--task", "infer", "--preset", "tiny", "--masks", "2", "--batch", "2",
            "--gen-length", "4", "--steps", "4", "--tiles", "3", "--json", str(out)]
    if not HAS_CUDNN:  # CI installs the compile-only backends without cuDNN's 1.6 GB: the auto choice is refused
        code, _, err = run_cli(capsys, *argv)
        assert code == 2 and "needs cuDNN" in err
        argv += ["--attention", "xla"]
    code, table, _ = run_cli(capsys, *argv)
    assert code == 0 and "fits" in table
    result = json.loads(out.read_text())
    check_schema(result, "image")
    assert result["device_kind"].startswith("NVIDIA H100")
    assert result["settings"]["attention"] == ("cudnn" if HAS_CUDNN else "xla")
    # --quantize int8: the program pdlm-infer --quantize runs, its linear kernels held as int8
    int8_out = tmp_path / "h100_int8.json"
    code, _, _ = run_cli(capsys, *[str(int8_out) if a == str(out) else a for a in argv], "--quantize", "int8")
    int8 = json.loads(int8_out.read_text())
    assert code == 0 and int8["settings"]["quantize"] == "int8"
    assert int8["memory_per_device_bytes"]["arguments"] < result["memory_per_device_bytes"]["arguments"]
    # The analytic count of one loop iteration agrees with XLA's count of the same program on the CPU.
    assert 0.5 < result["flops_check"]["ratio"] < 1.5


def int4_arrays_made(hlo: str) -> list[str]:
    """The int4 arrays a compiled program computes (transposes, copies, fusions) rather than reads or slices."""
    read = {"parameter", "get-tuple-element", "bitcast", "dynamic-slice", "tuple"}
    made = (re.search(r"= (s4\[[^\]]*\]\{[^}]*\}) ([\w-]+)\(", line) for line in hlo.splitlines())
    return [m.group(1) for m in made if m and m.group(2) not in read]


@pytest.mark.skipif(not HAS_CUDA, reason="the aot extra's CUDA plugin is not installed (pip install '.[aot]')")
def test_int4_kernels_keep_the_layout_gpu_matmuls_read(monkeypatch):
    # XLA:GPU's int4 matmuls read a kernel with its contracting axis minor. Given the default layout, the program
    # lays every int4 kernel out again (as much memory as the weights); with the layouts it chooses itself
    # (programs.weight_layouts: pdlm-infer --quantize and pdlm-aot on an accelerator) it computes no int4 array
    target = hardware.target("rtx4090")
    assert programs.weight_layouts("int4", target.platform) == "auto"
    args = aot.build_parser().parse_args(["--target", "rtx4090", "--task", "infer", "--preset", "tiny", "--masks",
                                          "6", "--gen-length", "4", "--steps", "4", "--tiles", "3", "--attention",
                                          "xla", "--quantize", "int4"])
    made, temporaries = {}, {}
    for layouts in ("default", "auto"):
        monkeypatch.setattr(programs, "weight_layouts", lambda quantize, platform: layouts)
        exe = aot.infer_program(args, target)["lower"]().compile()
        made[layouts], temporaries[layouts] = int4_arrays_made(exe.as_text()), exe.memory_analysis().temp_size_in_bytes
    assert made["default"] and not made["auto"]
    assert temporaries["auto"] < temporaries["default"]


@pytest.mark.skipif(not HAS_CUDA, reason="the aot extra's CUDA plugin is not installed (pip install '.[aot]')")
def test_xla_attention_then_output_projection_compiles_for_h100():
    # The 8B prefix-cached captioning program's shapes (k = 6, batch 8: 204 caption rows an image against 2176
    # keys, 32 heads of 128): fused into the output projection's GEMM, the attention output's transpose left
    # XLA:GPU's Triton tiling without a tile ("Couldn't find output tile sizes")
    import jax
    import jax.numpy as jnp

    from pdlm_jax.ops.attention import dot_product_attention

    device = hardware.target("h100").devices()[0]

    def attend_and_project(q, k, v, w, residual):
        out = dot_product_attention(q, k, v, implementation="xla")
        return residual + out.reshape(residual.shape) @ w

    shapes = [(8, 204, 32, 128), (8, 2176, 32, 128), (8, 2176, 32, 128), (4096, 4096), (8 * 204, 4096)]
    sharding = jax.sharding.SingleDeviceSharding(device)
    args = [jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=sharding) for shape in shapes]
    jax.jit(attend_and_project).lower(*args).compile()


@pytest.mark.skipif(not HAS_TPU, reason="the aot extra's libtpu is not installed (pip install '.[aot]')")
def test_single_chip_tpu_devices():
    # libtpu assumes hosts of 2x2 chips; one v5e chip is a host of its own
    assert [d.device_kind for d in hardware.target("v5e:1x1").devices()] == ["TPU v5 lite"]


@pytest.mark.skipif(not HAS_CUDA, reason="the aot extra's CUDA plugin is not installed (pip install '.[aot]')")
def test_qlora_step_on_a_24gb_card_and_explain(capsys, tmp_path):
    # --lora-base int4: the frozen base's linear kernels held as int4 (QLoRA); --explain lists the largest buffers
    results = {}
    for base in ("bf16", "int4"):
        out = tmp_path / f"{base}.json"
        code, table, _ = run_cli(capsys, "--target", "rtx4090", "--task", "train", "--preset", "tiny", "--batch", "1",
                                 "--length", "256", "--tiles", "3", "--lora-rank", "4", "--lora-base", base,
                                 "--attention", "xla", "--explain", "--json", str(out))
        assert code == 0 and "largest buffers" in table
        results[base] = json.loads(out.read_text())
        check_schema(results[base], "step")
    assert results["int4"]["settings"]["lora_base"] == "int4"
    assert (results["int4"]["memory_per_device_bytes"]["arguments"]
            < results["bf16"]["memory_per_device_bytes"]["arguments"])
    buffers = results["int4"]["largest_buffers"]
    assert buffers and buffers[0]["bytes"] >= buffers[-1]["bytes"] > 0 and "[" in buffers[0]["shapes"]


@pytest.mark.skipif(not HAS_TPU, reason="the aot extra's libtpu is not installed (pip install '.[aot]')")
def test_tiny_train_compiles_for_a_tpu_slice(capsys, tmp_path):
    out = tmp_path / "v5e.json"
    code, _, _ = run_cli(capsys, "--target", "v5e:2x2", "--task", "train", "--preset", "tiny", "--batch", "4",
                         "--length", "256", "--tiles", "3", "--json", str(out))
    assert code == 0
    result = json.loads(out.read_text())
    check_schema(result, "step")
    assert result["devices"] == 4 and result["settings"]["mesh"]["fsdp"] == 4 and result["fits"]

    # --lora-rank: the same step training adapters only (lora.rank); its state holds no optimizer moments
    # for the base weights, so its arguments are a fraction of full fine-tuning's.
    lora_out = tmp_path / "v5e_lora.json"
    code, _, _ = run_cli(capsys, "--target", "v5e:2x2", "--task", "train", "--preset", "tiny", "--batch", "4",
                         "--length", "256", "--tiles", "3", "--lora-rank", "4", "--json", str(lora_out))
    lora = json.loads(lora_out.read_text())
    assert code == 0 and lora["settings"]["lora_rank"] == 4
    assert lora["memory_per_device_bytes"]["arguments"] < 0.6 * result["memory_per_device_bytes"]["arguments"]

    # --answer: logits at the (padded) answer positions only (data.answer_buckets); default: all L rows
    answer_out = tmp_path / "v5e_answer.json"
    code, _, _ = run_cli(capsys, "--target", "v5e:2x2", "--task", "train", "--preset", "tiny", "--batch", "4",
                         "--length", "256", "--tiles", "3", "--answer", "32", "--json", str(answer_out))
    answer = json.loads(answer_out.read_text())
    assert code == 0 and (answer["settings"]["answer"], result["settings"]["answer"]) == (32, 256)
    assert answer["model_flops_per_step"] < result["model_flops_per_step"]  # lm_head at 32 rows instead of 256


@pytest.mark.skipif(not HAS_TPU, reason="the aot extra's libtpu is not installed (pip install '.[aot]')")
def test_tiny_base_stage1_plan_holds_frozen_modules_in_bf16_without_moments(capsys, tmp_path):
    """configs/base_s1.yaml (PerceptionDLM-Base, an image + conversation batch) on a tiny model: the vision tower
    and the LM are frozen (bf16, no AdamW moments), so the step's arguments are a fraction of training all."""
    from pathlib import Path

    configs = Path(__file__).resolve().parents[1] / "configs"
    common = ["--target", "v5e:2x2", "--task", "train", "--config", str(configs / "base_s1.yaml"), "--batch", "4",
              "--length", "128", "--mesh", "fsdp:4", "--set", "model.init_from=null", "--set", "model.preset=tiny"]
    results = {}
    for name, freeze in (("s1", []), ("all", ["--set", "model.freeze=[]"])):
        out = tmp_path / f"{name}.json"
        assert run_cli(capsys, *common, *freeze, "--json", str(out))[0] == 0
        results[name] = json.loads(out.read_text())
    assert results["s1"]["settings"]["freeze"] == ["vision", "lm"] and results["s1"]["settings"]["tiles"] == 1
    frozen, full = (results[k]["memory_per_device_bytes"]["arguments"] for k in ("s1", "all"))
    assert frozen < 0.3 * full  # float32 params + 2 moments (12 bytes) vs bf16 (2 bytes) for all but the projector
