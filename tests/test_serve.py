"""`pdlm-serve` end to end: a real server on 127.0.0.1 with the embedded demo model, its JSON API, the
micro-batcher under concurrent load, and the Gradio page in headless Chromium (Debian's package + Playwright)."""

import base64
import collections
import concurrent.futures
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

ROOT = Path(__file__).resolve().parent.parent
SCENE = ROOT / "pdlm_jax" / "assets" / "demo_scene"
CAPTIONS = json.loads((SCENE / "captions.json").read_text())
MASK_FILES = sorted(SCENE.glob("mask_*.png"))
ARTEFACTS = ROOT / "tests" / "artefacts"
MAX_BODY, MAX_PIXELS = 3_000_000, 1_000_000
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _png(array: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return _b64(buf.getvalue())


DEMO = {"image": _b64((SCENE / "image.png").read_bytes()), "masks": [_b64(p.read_bytes()) for p in MASK_FILES]}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("serve") / "server.log"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "infer.serve", "--port", str(port), "--max-batch", "2",
                                 "--batch-wait-ms", "50", "--max-body-bytes", str(MAX_BODY), "--max-image-pixels",
                                 str(MAX_PIXELS)], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600  # generous: a loaded machine imports and loads slowly
        while True:
            assert proc.poll() is None, f"server exited: {log.read_text()}"
            assert time.monotonic() < deadline, f"server did not come up: {log.read_text()}"
            try:
                if _get(url + "/healthz") == {"status": "ok"}:
                    break
            except OSError:
                time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:  # a server that does not stop when asked must not fail a test
            proc.kill()
            proc.wait()


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=300) as r:
        return json.load(r)


def _post(url: str, body, raw: bytes | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(url + "/v1/regions/caption", data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def _ok(url: str, body) -> dict:
    status, result = _post(url, body)
    assert status == 200, result
    return result


def _regions(result: dict) -> list:
    return [(r["caption"], r["token_ids"], r["bbox"]) for r in result["regions"]]


def test_demo_scene_png_and_rle_masks_and_history(server):
    png = _ok(server, DEMO)
    assert [r["caption"] for r in png["regions"]] == CAPTIONS
    assert png["forwards"] == 3 and png["steps"] == 3 and png["gen_length"] == 3  # the checkpoint's defaults

    masks = [np.asarray(Image.open(p).convert("L")) > 0 for p in MASK_FILES]
    rles = []
    for i, m in enumerate(masks):
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        if i == 0:  # uncompressed run lengths (column-major), as COCO's iscrowd annotations store them
            flat = m.T.reshape(-1)
            changes = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
            runs = np.diff(np.concatenate([[0], changes, [flat.size]]))
            counts = ([0] if flat[0] else []) + runs.tolist()
            rles.append({"size": list(m.shape), "counts": counts})
        else:
            rles.append({"size": rle["size"], "counts": rle["counts"].decode()})
    rle = _ok(server, {"image": DEMO["image"], "masks": rles})
    assert _regions(rle) == _regions(png)

    mask_id = _get(server + "/v1/model")["mask_id"]
    with_history = _ok(server, DEMO | {"history": True})
    assert _regions(with_history) == _regions(png)
    history = with_history["history"]
    assert len(history) == with_history["forwards"] == 3
    assert history[-1] == [r["token_ids"] for r in png["regions"]]
    masked = [sum(t == mask_id for region in step for t in region) for step in history]
    assert masked[0] > masked[1] > masked[2] == 0  # the re-masking schedule: 15 slots, 10 then 5 then 0 masked
    assert masked == [10, 5, 0]


def test_bad_requests_get_400_or_413_and_the_server_keeps_serving(server):
    blank = _png(np.zeros((301, 202), np.uint8))
    cases = [
        (b"garbage", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        ({"masks": DEMO["masks"]}, 400, '"image" is required'),
        ({"image": DEMO["image"]}, 400, '"masks" is required'),
        (DEMO | {"masks": []}, 400, "empty"),
        (DEMO | {"image": "not base64!"}, 400, "base64"),
        (DEMO | {"image": _b64(b"not an image")}, 400, "not an image"),
        (DEMO | {"masks": [blank]}, 400, "mask 0 is empty"),
        (DEMO | {"masks": [42]}, 400, "masks[0] must be"),
        (DEMO | {"masks": [{"size": [10, 10], "counts": [100]}]}, 400, "RLE of size [10, 10]"),
        (DEMO | {"masks": [{"size": [301, 202], "counts": [5, 5]}]}, 400, "not a valid COCO RLE"),
        (DEMO | {"gen_length": "3"}, 400, '"gen_length" must be'),
        (DEMO | {"history": 1}, 400, '"history" must be'),
        (DEMO | {"steps": 1000}, 400, "steps=1000 exceeds"),
        (DEMO | {"temperature": -1}, 400, "temperature must be >= 0"),
        (DEMO | {"cache": "bogus"}, 400, "cache mode"),
        (DEMO | {"colour": "red"}, 400, "unknown field(s) colour"),
        (b"{" + b" " * MAX_BODY + b"}", 413, "--max-body-bytes"),
        (DEMO | {"image": _png(np.zeros((1001, 1000, 3), np.uint8))}, 413, "--max-image-pixels"),
    ]
    for body, status, message in cases:
        got, answer = _post(server, None, raw=body) if isinstance(body, bytes) else _post(server, body)
        assert (got, set(answer)) == (status, {"error"}), (message, answer)
        assert message in answer["error"], answer
    assert _get(server + "/healthz") == {"status": "ok"}
    assert [r["caption"] for r in _ok(server, DEMO)["regions"]] == CAPTIONS


def test_concurrent_requests_are_batched_and_each_equals_its_sequential_result(server):
    orders = [[0, 1, 2, 3, 4], [4, 3, 2, 1, 0], [2, 0, 4, 1, 3], [1, 2, 3, 4, 0]]
    bodies = [{"image": DEMO["image"], "masks": [DEMO["masks"][i] for i in order]} for order in orders]
    alone = [_ok(server, body) for body in bodies]
    for order, result in zip(orders, alone):
        assert [r["caption"] for r in result["regions"]] == [CAPTIONS[i] for i in order]
    before = _get(server + "/v1/model")["batches"]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda n: _ok(server, bodies[n % 4]), range(16)))
    for n, result in enumerate(together):
        assert _regions(result) == _regions(alone[n % 4]) and result["forwards"] == alone[n % 4]["forwards"]
    after = _get(server + "/v1/model")["batches"]
    formed = {int(k): v - before.get(k, 0) for k, v in after.items() if v > before.get(k, 0)}
    assert sum(size * count for size, count in formed.items()) == 16
    # How many requests meet in one batch depends on how fast they arrive (a loaded machine may serve them one
    # by one); that they do meet is test_micro_batcher_groups_the_requests_queued_while_it_works's, exactly.
    # Here: every request was told the size of the batch it ran in.
    sizes = collections.Counter(result["batch"] for result in together)
    assert sizes == {size: size * count for size, count in formed.items()}, (sizes, formed)


class BlockingCaptioner:
    """A stand-in for the model handle: `caption_batch` says it `started`, waits for `release` and records the
    batches it ran."""

    def __init__(self):
        self.started, self.release, self.calls = threading.Event(), threading.Event(), []

    def caption_batch(self, pairs, batch_size, **settings):
        self.started.set()
        assert self.release.wait(timeout=300)
        self.calls.append(([image for image, _ in pairs], batch_size))
        return [{"image": image, "seconds": 0.0} for image, _ in pairs]


def test_micro_batcher_groups_the_requests_queued_while_it_works():
    """While one batch runs, the requests that arrive queue up; the next batches take them max_batch at a time,
    each answered with its own result. Condition-based: nothing here depends on how fast the machine is."""
    from infer.serve import Job, MicroBatcher

    handle = BlockingCaptioner()
    batcher = MicroBatcher(handle, max_batch=2, wait_s=0.0)
    settings = {"unmask": "remask", "gen_length": 3}
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        first = pool.submit(batcher.submit, Job(0, [None], settings))
        assert handle.started.wait(timeout=300)  # the worker runs the first request alone, and waits
        rest = [pool.submit(batcher.submit, Job(n, [None], settings)) for n in range(1, 5)]
        deadline = time.monotonic() + 300
        while batcher._queue.qsize() < 4:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        handle.release.set()
        results = [f.result(timeout=300) for f in [first, *rest]]
    assert [r["image"] for r in results] == [0, 1, 2, 3, 4]
    assert [r["batch"] for r in results] == [1, 2, 2, 2, 2]
    assert handle.calls == [([0], 1), ([1, 2], 2), ([3, 4], 2)]
    assert batcher.sizes == {1: 1, 2: 2}


def _browser():
    """Playwright driving Debian's chromium (never a downloaded browser), or a skip saying what is missing."""
    if not os.path.exists(CHROMIUM):
        pytest.skip("no chromium: install Debian's package (apt-get install -y chromium) to run the browser test")
    sync_playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (test extra)")
    return sync_playwright.sync_playwright


def test_page_runs_the_preset_replays_the_steps_and_captions_a_drawn_mask(server, tmp_path):
    sync_playwright = _browser()
    ARTEFACTS.mkdir(exist_ok=True)
    outside = []
    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(  # a fresh profile folder: --user-data-dir
            tmp_path / "profile", executable_path=CHROMIUM, headless=True, viewport={"width": 1400, "height": 1300},
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--no-first-run"])
        page = browser.new_page()
        page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(server) else None)
        page.set_default_timeout(120_000)
        page.goto(server + "/")
        page.locator("#presets button.thumbnail-item").first.click()
        page.wait_for_function("() => document.querySelectorAll('#mask-files tr').length == 5")  # its mask files
        page.click("#run")
        page.wait_for_selector("#captions .pdlm-caption")
        shown = page.locator("#captions .pdlm-caption").all_inner_texts()
        assert shown == CAPTIONS
        assert "forwards" in page.locator("#timings").inner_text()
        page.screenshot(path=str(ARTEFACTS / "serve_preset.png"), full_page=True)

        # Step 1 of 3: each caption still has masked slots (10 of 15 slots are masked after the first forward).
        page.locator("#step input[type=range]").evaluate(
            "(el) => { el.value = '1'; el.dispatchEvent(new Event('input', {bubbles: true})); }")
        page.wait_for_function("() => document.querySelector('#captions').innerText.includes('▢')")
        at_step_1 = page.locator("#captions .pdlm-caption").all_inner_texts()
        assert at_step_1 != CAPTIONS and sum(c.count("▢") for c in at_step_1) == 10
        page.screenshot(path=str(ARTEFACTS / "serve_step1.png"), full_page=True)

        # Play replays steps 0..3 and ends on the final captions.
        page.click("#play")
        page.wait_for_function("() => document.querySelector('#step input[type=number]').value == '3' && "
                               "!document.querySelector('#captions').innerText.includes('▢')")
        assert page.locator("#captions .pdlm-caption").all_inner_texts() == CAPTIONS

        # The blank canvas preset, then one brush stroke on the editor's layer: one region to caption.
        page.locator("#presets button.thumbnail-item").nth(1).click()
        page.wait_for_function("() => !document.querySelector('#mask-files tr')")  # the preset has no mask files
        page.click("#editor button[aria-label=Brush]")
        box = max((c.bounding_box() for c in page.locator("#editor canvas").all()), key=lambda b: b["width"])
        x, y = box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.3
        page.mouse.move(x, y)
        page.mouse.down()
        for k in range(1, 11):
            page.mouse.move(x + 8 * k, y + 5 * k, steps=2)
        page.mouse.up()
        page.click("#run")
        page.wait_for_function("() => document.querySelectorAll('#captions .pdlm-caption').length == 1")
        drawn = page.locator("#captions .pdlm-caption").all_inner_texts()
        assert drawn[0] and "▢" not in drawn[0]
        page.screenshot(path=str(ARTEFACTS / "serve_drawn.png"), full_page=True)
        browser.close()
    assert outside == [], f"the page fetched from outside the server: {outside}"
