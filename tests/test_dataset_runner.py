"""Dataset runner (infer/dataset.py): annotation schemas, chunking, resume after a hard kill, errors, shard/limit."""

from __future__ import annotations

import argparse
import base64
import io
import json
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pycocotools.mask
import pytest
from helpers import encode_rle as rle
from PIL import Image

from infer.dataset import DatasetSettings, add_annotation_args, load_annotations, run_annotations
from pdlm_jax.annotation_files import decode_mask
from pdlm_jax.errors import PDLMError
from pdlm_jax.regions.masks import area_order

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures"
H, W = 24, 32


class FakeCaptioner:
    """Follows the caption_batch contract (per image, passes of <= 6 masks in area order, pass c seeded with
    seed + c); the caption names the region's area and its whole pass, so tests can see how regions were grouped."""

    def __init__(self, fail_area: int | None = None, hang_after: int | None = None):
        self.hang_after = hang_after  # calls after the first `hang_after` never return (the process gets killed)
        self.fail_area = fail_area  # a call with a mask of this area raises, as a bad model input would
        self.calls: list[tuple[int, list[int]]] = []  # per pass: (id of the image object, areas in area order)
        self.seeds: list[int] = []
        self.modes: list[tuple[str, str]] = []  # (cache, unmask) of each pass
        self.batches: list[tuple[int, int | None]] = []  # (images, batch_size) of each caption_batch call

    def caption_batch(self, items, settings, question="Describe each masked region in detail.",
                      reference_parser=False, batch_size=None):
        gen_length, steps, seed = settings.gen_length, settings.steps, settings.seed
        if self.hang_after is not None and len(self.batches) >= self.hang_after:
            threading.Event().wait()
        self.batches.append((len(items), batch_size))
        results, passes = [], 0
        for image, masks in items:
            areas = [int(np.asarray(m).sum()) for m in masks]
            if not masks or self.fail_area in areas:
                raise PDLMError("unusable model input")
            order = area_order(areas)
            regions = [None] * len(masks)
            chunks = [order[c:c + 6] for c in range(0, len(order), 6)]
            for c, chunk in enumerate(chunks):
                chunk_areas = [areas[j] for j in chunk]
                self.calls.append((id(image), chunk_areas))
                self.seeds.append(seed + c)
                self.modes.append((settings.mode.arguments["cache"], settings.mode.arguments["unmask"]))
                for rank, j in enumerate(chunk):
                    regions[j] = {"caption": f"area {areas[j]} in chunk {chunk_areas}", "prompt_id": rank,
                                  "chunk": c, "token_ids": [areas[j] % 400, len(chunk)] * (gen_length // 2)}
            results.append({"regions": regions, "forwards": steps * len(chunks)})
            passes += len(chunks)
        for result in results:  # a call's time grows with its passes
            result.update(seconds=0.75 * passes, compile_seconds=0.25 * passes)
        return results


def box_mask(y0, x0, h, w, shape=(H, W)) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[y0:y0 + h, x0:x0 + w] = True
    return mask


def write_image(path: Path, shape=(H, W)) -> None:
    rng = np.random.default_rng(len(path.name))
    Image.fromarray(rng.integers(0, 255, (*shape, 3), dtype=np.uint8)).save(path)


def make_dataset(root: Path) -> Path:
    """ParaDLC-style file: images with 1, 2 and 8 regions, a missing image, a corrupt RLE, a wrong-size mask."""
    (root / "images").mkdir()
    for name in ("one", "two", "eight", "bad_rle"):
        write_image(root / "images" / f"{name}.png")

    def ann(index, mask):
        return {"index": index, "category_name": "thing", "bbox": [0, 0, 1, 1], "mask_rle": rle(mask)}

    # "eight": distinct areas 1..8 rows tall, listed out of area order so the sort matters
    eight = [ann(i, box_mask(0, 4 * k, k + 1, 4)) for i, k in enumerate([3, 7, 0, 5, 1, 6, 2, 4])]
    corrupt = {"index": 1, "category_name": "x", "bbox": [0, 0, 1, 1],
               "mask_rle": {"size": [H, W], "counts": rle(box_mask(0, 0, 5, 5))["counts"][:-2] + "zz"}}
    records = [
        {"file_name": "train/one.png", "image_id": "1", "annotations": [ann(0, box_mask(2, 2, 5, 5))]},
        {"file_name": "two.png", "image_id": "2",
         "annotations": [ann(0, box_mask(0, 0, 3, 3)), ann(1, box_mask(5, 5, 6, 6))]},
        {"file_name": "eight.png", "image_id": "8", "annotations": eight},
        {"file_name": "missing.png", "image_id": "404",
         "annotations": [ann(0, box_mask(0, 0, 3, 3)), ann(1, box_mask(1, 1, 3, 3))]},
        {"file_name": "bad_rle.png", "image_id": "9",
         "annotations": [ann(0, box_mask(0, 0, 4, 4)), corrupt,
                         ann(2, box_mask(0, 0, 4, 4, shape=(H + 1, W)))]},
    ]
    path = root / "annotations.json"
    path.write_text(json.dumps(records))
    return path


ALL_IDS = {"1_0", "2_0", "2_1", *(f"8_{i}" for i in range(8)), "404_0", "404_1", "9_0", "9_1", "9_2"}
ERROR_IDS = {"404_0", "404_1", "9_1", "9_2"}


def parse(*argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gen-length", type=int, default=32)  # the generation flags belong to pdlm-infer
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--prompt", default="Describe each masked region in detail.")
    parser.add_argument("--cache", default="none")
    parser.add_argument("--unmask", default="remask")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reference-parser", action="store_true")
    add_annotation_args(parser)
    return parser.parse_args([str(a) for a in argv])


def run(tmp_path: Path, *extra, captioner=None, output="out/results.jsonl") -> tuple[int, list[dict]]:
    args = parse("--annotations", tmp_path / "annotations.json", "--image-root", tmp_path / "images",
                 "--output", tmp_path / output, *extra)
    code = run_annotations(DatasetSettings.from_args(args), captioner or FakeCaptioner())
    return code, read_jsonl(tmp_path / output)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_one_line_per_region(records: list[dict], ids: set[str]) -> None:
    counts = Counter(r["ann_id"] for r in records)
    assert set(counts) == ids and set(counts.values()) == {1}, counts


# ------------------------------------------------------------------------------------------- annotations


def test_reference_paradlc_file_loads_with_spec_counts():
    entries = load_annotations(FIXTURES / "reference/paradlc_annotations.json", "/imgs")
    regions = [r for e in entries for r in e.regions]
    assert len(entries) == 100 and len(regions) == 299  # SPEC §13.1
    assert Counter(len(e.regions) for e in entries) == {2: 38, 3: 41, 4: 13, 5: 4, 6: 1, 7: 2, 8: 1}
    raw = json.loads((FIXTURES / "reference/paradlc_annotations.json").read_text())[0]
    assert entries[0].source == "/imgs/" + Path(raw["file_name"]).name
    assert [r.ann_id for r in entries[0].regions] == [f"{raw['image_id']}_{a['index']}" for a in raw["annotations"]]


@pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools")
def test_decode_rle_matches_pycocotools_on_every_reference_mask():
    for entry in load_annotations(FIXTURES / "reference/paradlc_annotations.json", "/imgs"):
        for region in entry.regions:
            h, w = region.rle["size"]
            expected = pycocotools.mask.decode({"size": [h, w], "counts": region.rle["counts"].encode()})
            np.testing.assert_array_equal(decode_mask(region.rle, (h, w)), expected.astype(bool))


@pytest.mark.parametrize("counts", ["", "garbage!!", "0000", ";23000", ";2300091"])
def test_corrupt_rle_raises_instead_of_decoding_garbage(counts):
    # pycocotools.mask.decode returns uninitialised memory for most of these
    with pytest.raises(PDLMError, match="corrupt mask RLE"):
        decode_mask({"size": [5, 7], "counts": counts}, (5, 7))
    assert decode_mask({"size": [5, 7], "counts": ";230009"}, (5, 7)).sum() == 6  # the valid original


CORRUPT_RLE = {"size": [4, 4], "counts": "12"}  # runs 1 + 2 of 16 pixels: pycocotools decodes uninitialised memory


def test_corrupt_rle_fails_its_region_naming_file_record_and_mask(tmp_path):
    (tmp_path / "images").mkdir()
    write_image(tmp_path / "images" / "a.png")
    (tmp_path / "annotations.json").write_text(json.dumps([{"image_file": "a.png", "image_id": "cat-7",
        "mask_rles": [rle(box_mask(0, 0, 2, 2)), CORRUPT_RLE], "captions": ["x", "y"]}]))
    code, out = run(tmp_path)
    by_id = {r["ann_id"]: r for r in out}
    assert code == 1 and by_id["cat-7_0"]["caption"] == "area 4 in chunk [4]"
    assert by_id["cat-7_1"]["error"].startswith(f"{tmp_path / 'annotations.json'} record 0 (image_id 'cat-7'): "
                                                 "mask 1: corrupt mask RLE")


def test_training_schema_variants(tmp_path):
    (tmp_path / "images").mkdir()
    write_image(tmp_path / "images" / "a.png")
    buf = io.BytesIO()
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(buf, format="PNG")
    records = [
        {"image_file": "a.png", "image_id": 7, "mask_rles": [rle(box_mask(0, 0, 2, 2)), rle(box_mask(3, 3, 4, 4))],
         "captions": ["x", "y"]},
        {"image": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode(), "image_name": "b",
         "annotations": [{"caption": "whole", "segmentation": None},
                         {"caption": "part", "segmentation": rle(box_mask(0, 0, 1, 3))}]},
        {"image_path": "a.png", "mask_rles": rle(box_mask(0, 0, 2, 5))},  # single RLE, no id -> record position
    ]
    (tmp_path / "annotations.json").write_text(json.dumps(records))
    fake = FakeCaptioner()
    code, out = run(tmp_path, captioner=fake)
    assert code == 0
    assert {r["ann_id"]: r["caption"].split(" in")[0] for r in out} == {
        "7_0": "area 4", "7_1": "area 16", "b_0": f"area {H * W}", "b_1": "area 3", "2_0": "area 10"}


def test_unusable_arguments_and_files_raise(tmp_path):
    make_dataset(tmp_path)
    with pytest.raises(PDLMError, match="--shard"):
        run(tmp_path, "--shard", "2/2")
    with pytest.raises(PDLMError, match="--limit"):
        run(tmp_path, "--limit", "0")
    (tmp_path / "annotations.json").write_text("{not json")
    with pytest.raises(PDLMError, match="not a JSON file"):
        run(tmp_path)
    (tmp_path / "annotations.json").write_text(json.dumps([{"annotations": []}]))
    with pytest.raises(PDLMError, match="record 0 names no image"):
        run(tmp_path)
    (tmp_path / "annotations.json").write_text(json.dumps([{"file_name": "a.png", "image_id": "1", "annotations": [
        {"index": 0, "mask_rle": None}, {"index": 0, "mask_rle": None}]}]))
    with pytest.raises(PDLMError, match="'1_0' occurs twice"):
        run(tmp_path)


# ------------------------------------------------------------------------------------------------ running


def test_run_chunks_records_errors_and_summary(tmp_path):
    make_dataset(tmp_path)
    fake = FakeCaptioner()
    code, out = run(tmp_path, captioner=fake)
    assert code == 1  # some regions failed
    assert_one_line_per_region(out, ALL_IDS)
    errors = {r["ann_id"]: r["error"] for r in out if "error" in r}
    assert set(errors) == ERROR_IDS
    assert "file not found" in errors["404_0"] and "corrupt mask RLE" in errors["9_1"]
    assert "does not match the image size" in errors["9_2"]

    # 8 regions: two passes of the same (once-loaded) image, 6 largest first, area-sorted
    calls = [areas for _, areas in fake.calls]
    assert calls == [[25], [36, 9], [32, 28, 24, 20, 16, 12], [8, 4], [16]]
    assert fake.calls[2][0] == fake.calls[3][0]
    assert fake.seeds == [0, 0, 0, 1, 0]  # chunk c of an image gets seed + c, like one caption_regions call
    by_id = {r["ann_id"]: r for r in out}
    assert by_id["8_1"]["caption"] == "area 32 in chunk [32, 28, 24, 20, 16, 12]"  # index 1 has k = 7
    assert by_id["8_2"]["caption"] == "area 4 in chunk [8, 4]"
    assert by_id["8_2"]["token_ids"][:2] == [4, 2] and by_id["8_2"]["forwards"] == 64  # the image's two passes
    assert by_id["1_0"]["image_id"] == "1"

    summary = json.loads((tmp_path / "out/summary.json").read_text())
    assert (summary["images"], summary["regions"], summary["captioned"], summary["errors"]) == (5, 16, 12, 4)
    assert {e["ann_id"] for e in summary["error_list"]} == ERROR_IDS
    assert summary["forwards"] == 5 * 32 and summary["generation_seconds"] == pytest.approx(2.5)
    assert summary["call_seconds"] == pytest.approx(3.75) and summary["compile_seconds"] == pytest.approx(1.25)
    assert summary["tokens_per_forward"] == pytest.approx(12 * 32 / (5 * 32))
    assert summary["regions_per_second"] == pytest.approx(12 / 2.5)


def test_batch_size_batches_across_images_with_the_same_records(tmp_path):
    make_dataset(tmp_path)
    _, one_by_one = run(tmp_path, output="single.jsonl")
    fake = FakeCaptioner()
    code, batched = run(tmp_path, "--batch-size", 4, output="batched.jsonl", captioner=fake)
    assert code == 1 and fake.batches == [(3, 4), (1, 4)]  # images 1, 2, 8 (404 is missing), then image 9
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in batched] == \
        [{k: v for k, v in r.items() if k != "seconds"} for r in one_by_one]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["calls"] == 2 and summary["settings"]["batch_size"] == 4


def test_a_failing_call_is_retried_image_by_image(tmp_path):
    make_dataset(tmp_path)
    fake = FakeCaptioner(fail_area=36)  # region 2_1
    code, out = run(tmp_path, "--images-per-call", 5, captioner=fake)
    errors = {r["ann_id"]: r["error"] for r in out if "error" in r}
    assert code == 1 and set(errors) == ERROR_IDS | {"2_0", "2_1"}
    assert errors["2_0"].endswith("record 1 (image_id '2'): unusable model input")
    assert fake.batches == [(4, 1)] + [(1, 1)] * 4  # images 1, 2, 8 and 9 together, then one by one


def test_a_broken_dataset_module_breaks_the_cli_import(monkeypatch):
    """A broken infer.dataset fails pdlm-infer's import: swallowing the ImportError would silently drop --annotations."""
    import importlib

    import infer

    monkeypatch.setitem(sys.modules, "infer.dataset", None)  # importing infer.dataset raises ImportError
    monkeypatch.delattr(infer, "dataset")
    monkeypatch.delitem(sys.modules, "infer.cli", raising=False)
    with pytest.raises(ImportError):
        importlib.import_module("infer.cli")


def test_fast_modes_reach_every_call(tmp_path):
    make_dataset(tmp_path)
    fake = FakeCaptioner()
    run(tmp_path, "--cache", "prefix:2", "--unmask", "threshold:0.9", captioner=fake)
    assert fake.modes == [("prefix:2", "threshold:0.9")] * len(fake.calls) and fake.calls
    settings = json.loads((tmp_path / "out/summary.json").read_text())["settings"]
    assert (settings["cache"], settings["unmask"]) == ("prefix:2", "threshold:0.9")


def test_rerun_skips_done_ids_and_retries_errors(tmp_path):
    make_dataset(tmp_path)
    run(tmp_path)
    write_image(tmp_path / "images" / "missing.png")  # the missing image turns up
    fake = FakeCaptioner()
    code, out = run(tmp_path, captioner=fake)
    assert code == 1  # the corrupt RLE and the wrong-size mask still fail
    assert_one_line_per_region(out, ALL_IDS)
    assert {r["ann_id"] for r in out if "error" in r} == {"9_1", "9_2"}
    assert [areas for _, areas in fake.calls] == [[9, 9]]  # only image 404 was captioned again
    assert json.loads((tmp_path / "out/summary.json").read_text())["resumed"] == 12


def test_torn_last_line_is_recovered(tmp_path):
    make_dataset(tmp_path)
    _, complete = run(tmp_path)
    path = tmp_path / "out/results.jsonl"
    raw = path.read_bytes()
    path.write_bytes(raw[: raw.rindex(b"\n", 0, len(raw) - 1) + 20])  # kill in the middle of the last line
    code, out = run(tmp_path)
    assert_one_line_per_region(out, ALL_IDS)
    assert sorted(out, key=lambda r: r["ann_id"]) == sorted(complete, key=lambda r: r["ann_id"])

    path.write_bytes(path.read_bytes() + b"\x00" * 64 + b"\n" + b"\x00" * 10)  # crash garbage after the end
    _, out = run(tmp_path)
    assert_one_line_per_region(out, ALL_IDS)

    lines = path.read_bytes().split(b"\n")
    path.write_bytes(b"\n".join([lines[0], b'{"ann_id": "1_', *lines[1:]]))  # broken line in the middle
    with pytest.raises(PDLMError, match="line 2 is not a result record"):
        run(tmp_path)


def test_shard_and_limit(tmp_path):
    make_dataset(tmp_path)
    shard_ids = []
    for i in range(2):
        _, out = run(tmp_path, "--shard", f"{i}/2", output=f"shard{i}.jsonl")
        shard_ids.append({r["ann_id"] for r in out})
    assert shard_ids[0] | shard_ids[1] == ALL_IDS and not shard_ids[0] & shard_ids[1]
    assert {a.split("_")[0] for a in shard_ids[1]} == {"2", "404"}  # images 1 and 3 of the file

    _, out = run(tmp_path, "--limit", "5", output="limited.jsonl")
    assert [r["ann_id"] for r in out] == ["1_0", "2_1", "2_0", "8_1", "8_0"]  # first 5 in file order
    assert out[4]["caption"] == "area 16 in chunk [32, 28, 24, 20, 16, 12]"  # same chunk as an unlimited run
    _, out = run(tmp_path, "--limit", "7", output="limited.jsonl")
    assert_one_line_per_region(out, {"1_0", "2_0", "2_1", "8_0", "8_1", "8_2", "8_3"})


_KILLED_RUN = """
import sys
sys.path.insert(0, {tests!r})
from test_dataset_runner import FakeCaptioner, parse
from infer.dataset import DatasetSettings, run_annotations
sys.exit(run_annotations(DatasetSettings.from_args(parse(*sys.argv[1:])), FakeCaptioner(hang_after=1)))
"""


def test_hard_kill_then_two_reruns_gives_one_record_per_region(tmp_path):
    make_dataset(tmp_path)
    _, uninterrupted = run(tmp_path, output="reference.jsonl")
    output = tmp_path / "out/results.jsonl"
    proc = subprocess.Popen(  # it writes the records of its first call, then hangs until killed
        [sys.executable, "-c", _KILLED_RUN.format(tests=str(Path(__file__).parent)),
         "--annotations", tmp_path / "annotations.json", "--image-root", tmp_path / "images", "--output", output],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while not (output.exists() and output.read_bytes().count(b"\n") >= 1):
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its first record"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed = read_jsonl(output)
    assert 1 <= len(killed) < len(ALL_IDS)

    for _ in range(2):
        code, out = run(tmp_path)
        assert code == 1
        assert_one_line_per_region(out, ALL_IDS)
    assert out[: len(killed)] == killed  # earlier records are kept as they were
    assert sorted(out, key=lambda r: r["ann_id"]) == sorted(uninterrupted, key=lambda r: r["ann_id"])


def test_second_run_on_a_busy_output_exits_2_and_writes_nothing(tmp_path, capsys):
    from infer.cli import main as infer_main

    make_dataset(tmp_path)
    output = tmp_path / "out/results.jsonl"
    first = subprocess.Popen(  # hangs after its first call: it holds the lock when the second run starts (it is killed)
        [sys.executable, "-c", _KILLED_RUN.format(tests=str(Path(__file__).parent)),
         "--annotations", tmp_path / "annotations.json", "--image-root", tmp_path / "images", "--output", output],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while not (output.exists() and output.read_bytes().count(b"\n") >= 1):
            assert first.poll() is None and time.monotonic() < deadline, "the first run ended before its first record"
            time.sleep(0.02)
        code = infer_main(["--annotations", str(tmp_path / "annotations.json"), "--image-root",
                           str(tmp_path / "images"), "--output", str(output), "--quiet"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith("pdlm-infer: error:") and len(err.splitlines()) == 1
        assert str(output) in err and f"pid {first.pid}" in err
    finally:
        first.kill()
        first.wait()
    assert not (tmp_path / "out/summary.json").exists()  # the second run wrote no summary
    records = read_jsonl(output)
    assert len({r["ann_id"] for r in records}) == len(records)  # and no duplicate records


# ---------------------------------------------------------------------------------------- with the real model


@pytest.fixture(scope="module")
def tiny_checkpoint(converted) -> Path:
    return converted("tiny_v1")


def test_real_model_captions_match_reference_and_direct_call(tmp_path, tiny_checkpoint):
    """Two images batched as the rows of one program (--batch-size 2) give the reference's tokens."""
    import pdlm_jax
    from infer.cli import build_parser

    fixture = FIXTURES / "tiny_v1"
    oracle = json.loads((fixture / "oracle.json").read_text())
    (tmp_path / "images").mkdir()
    for name in ("image.png", "copy.png"):
        (tmp_path / "images" / name).write_bytes((fixture / "image.png").read_bytes())
    masks = [np.asarray(Image.open(fixture / f"mask_{i}.png").convert("L")) > 0 for i in range(3)]
    anns = [{"index": i, "category_name": "c", "bbox": [0, 0, 1, 1], "mask_rle": rle(m)} for i, m in enumerate(masks)]
    (tmp_path / "annotations.json").write_text(json.dumps([
        {"file_name": "x/image.png", "image_id": "5", "annotations": anns},
        {"file_name": "copy.png", "image_id": "6", "annotations": anns}]))
    args = build_parser().parse_args([str(a) for a in (
        "--checkpoint", tiny_checkpoint, "--annotations", tmp_path / "annotations.json", "--image-root",
        tmp_path / "images", "--output", tmp_path / "results.jsonl", "--gen-length", 8, "--steps", 8,
        "--batch-size", 2)])
    handle = pdlm_jax.load(tiny_checkpoint, dtype="float32")

    assert run_annotations(DatasetSettings.from_args(args), handle) == 0
    out = {r["ann_id"]: r for r in read_jsonl(tmp_path / "results.jsonl")}
    # the reference's caption slot s belongs to mask file sort_idx_desc_area[s]
    for image_id in ("5", "6"):
        expected = {f"{image_id}_{m}": c["token_ids"] for m, c in zip(oracle["masks"]["sort_idx_desc_area"],
                                                                       oracle["outputs"]["caption_tokens"])}
        assert {a: out[a]["token_ids"] for a in expected} == expected
    direct = handle.caption_regions(tmp_path / "images" / "image.png", masks, gen_length=8, steps=8)
    assert [out[f"5_{i}"]["token_ids"] for i in range(3)] == [r["token_ids"] for r in direct["regions"]]
    assert [out[f"5_{i}"]["caption"] for i in range(3)] == [r["caption"] for r in direct["regions"]]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["calls"] == 1 and summary["tokens_per_forward"] == pytest.approx(3 * 8 / 8)


def test_dataset_bench_runs(tmp_path):
    """infer.bench_dataset on the demo model: every row captions every region with the per-image tokens."""
    from infer import bench_dataset

    out = tmp_path / "bench.json"
    assert bench_dataset.main(["--images", "2", "--shapes", "2", "--batch-sizes", "2", "--repeats", "1",
                               "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["path"], r["batch_size"], r["images_per_call"]) for r in rows] == [("per-image", 1, 1),
                                                                                  ("batched", 2, 2)]
    assert all(r["regions"] == 4 and r["agreement"] == 1.0 and r["images_per_second"] > 0 for r in rows)
