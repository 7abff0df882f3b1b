"""`pdlm-serve` end to end: a real server on 127.0.0.1 with the embedded demo model (and the converted tiny
Base fixture for the page's question tab), its JSON API, the micro-batcher under concurrent load, and the web
page in headless Chromium (Debian's package + Playwright)."""

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

from pdlm_jax.sampling import remask_counts

ROOT = Path(__file__).resolve().parent.parent
SCENE = ROOT / "pdlm_jax" / "assets" / "demo_scene"
CAPTIONS = json.loads((SCENE / "captions.json").read_text())
MASK_FILES = sorted(SCENE.glob("mask_*.png"))
WIDTH, HEIGHT = Image.open(SCENE / "image.png").size
SAMPLER = json.loads((ROOT / "pdlm_jax" / "assets" / "demo_model" / "sampler.json").read_text())  # G and S
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
def server(tmp_path_factory, converted):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("serve") / "server.log"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "infer.serve", "--port", str(port), "--max-batch", "2",
                                 "--batch-wait-ms", "50", "--max-body-bytes", str(MAX_BODY), "--max-image-pixels",
                                 str(MAX_PIXELS), "--warmup-masks", "1", "--base-checkpoint", str(converted("base_tiny"))],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
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


def _post(url: str, body, raw: bytes | None = None, route: str = "/v1/regions/caption") -> tuple[int, dict]:
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(url + route, data=data,
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
    G, S = SAMPLER["gen_length"], SAMPLER["steps"]
    assert png["forwards"] == S and png["steps"] == S and png["gen_length"] == G  # the checkpoint's defaults

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
    assert len(history) == with_history["forwards"] == S
    assert history[-1] == [r["token_ids"] for r in png["regions"]]
    masked = [sum(t == mask_id for region in step for t in region) for step in history]
    assert masked == remask_counts(len(MASK_FILES) * G, S)  # the re-masking schedule, down to 0 masked


def test_bad_requests_get_400_or_413_and_the_server_keeps_serving(server):
    blank = _png(np.zeros((HEIGHT, WIDTH), np.uint8))
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
        (DEMO | {"masks": [{"size": [HEIGHT, WIDTH], "counts": [5, 5]}]}, 400, "not a valid COCO RLE"),
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

    def caption_batch(self, pairs, settings, batch_size, **options):
        self.started.set()
        assert self.release.wait(timeout=300)
        self.calls.append(([image for image, _ in pairs], batch_size))
        return [{"image": image, "seconds": 0.0} for image, _ in pairs]


def test_micro_batcher_groups_the_requests_queued_while_it_works():
    """While one batch runs, the requests that arrive queue up; the next batches take them max_batch at a time,
    each answered with its own result. Condition-based: nothing here depends on how fast the machine is."""
    from infer.serve import Job, MicroBatcher
    from pdlm_jax.generation import GenerationSettings

    handle = BlockingCaptioner()
    batcher = MicroBatcher(handle, max_batch=2, wait_s=0.0)
    settings = GenerationSettings(gen_length=3, steps=3)
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        first = pool.submit(batcher.submit, Job(0, [None], settings, "question"))
        assert handle.started.wait(timeout=300)  # the worker runs the first request alone, and waits
        rest = [pool.submit(batcher.submit, Job(n, [None], settings, "question")) for n in range(1, 5)]
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


def _page_post(url: str, route: str, body: dict) -> tuple[int, dict]:
    return _post(url, body, route=f"/page/{route}")


def _centre(mask: np.ndarray) -> tuple[int, int]:
    """(x, y): the centroid of a convex shape, inside it."""
    ys, xs = np.nonzero(mask)
    x, y = int(xs.mean()), int(ys.mean())
    assert mask[y, x]
    return x, y


def _contrast(a, b) -> float:
    """WCAG 2 contrast ratio of two sRGB colours."""
    def luminance(rgb):
        c = np.asarray(rgb) / 255
        c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
        return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2]

    hi, lo = sorted([luminance(a), luminance(b)], reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def test_page_colours_have_readable_contrast():
    """Captions are TEXT on the page's BACKGROUND; region numbers are TAG_TEXT on their palette colour (on
    the page and in the overlay picture)."""
    from infer.serve_page import BACKGROUND, TAG_TEXT, TEXT
    from infer.visualize import PALETTE

    assert _contrast(TEXT, BACKGROUND) >= 4.5
    assert min(_contrast(TAG_TEXT, colour) for colour in PALETTE) >= 4.5
    assert _contrast((255, 255, 0), (255, 255, 255)) < 4.5  # the check can fail: yellow on white


def test_a_click_selects_each_demo_shape_by_flood_fill():
    from infer.serve_page import select_shape
    from pdlm_jax.errors import PDLMError

    image = Image.open(SCENE / "image.png")
    masks = [np.asarray(Image.open(path).convert("L")) > 0 for path in MASK_FILES]
    for i, mask in enumerate(masks):
        selected = select_shape(image, *_centre(mask))
        assert (selected & mask).sum() / (selected | mask).sum() > 0.99, i
    background = select_shape(image, 0, 0)
    assert background.sum() > 0.5 * background.size and not (background & np.any(masks, axis=0)).any()
    with pytest.raises(PDLMError, match=f"outside the {WIDTH}x{HEIGHT} image"):
        select_shape(image, WIDTH, 0)


def test_page_routes_caption_with_steps_and_answer_questions(server):
    status, shape = _page_post(server, "select", {"image": DEMO["image"], "x": 0, "y": 0, "tolerance": 300})
    assert status == 400 and "tolerance" in shape["error"]
    status, result = _page_post(server, "caption", {"image": DEMO["image"], "masks": DEMO["masks"], "mode": "exact"})
    assert status == 200, result
    steps = result["steps"]
    assert len(steps) == result["forwards"] + 1 and steps[-1] == CAPTIONS
    assert all(caption == " ".join(["▢"] * SAMPLER["gen_length"]) for caption in steps[0])  # before the first forward
    width, height = Image.open(io.BytesIO(base64.b64decode(result["overlay"]))).size
    assert width > WIDTH and width * HEIGHT == height * WIDTH  # the image enlarged, no legend below: the page draws it
    status, answer = _page_post(server, "answer", {"image": DEMO["image"], "question": "What is here?"})
    assert status == 200, answer
    assert len(answer["steps"]) == answer["forwards"] + 1 and answer["steps"][-1] == answer["answer"]
    assert set(answer["steps"][0].split()) == {"▢"}
    status, bad = _page_post(server, "answer", {"image": DEMO["image"], "question": 7})
    assert status == 400 and '"question" must be' in bad["error"]


def _browser():
    """Playwright driving Debian's chromium (never a downloaded browser), or a skip saying what is missing."""
    if not os.path.exists(CHROMIUM):
        pytest.skip("no chromium: install Debian's package (apt-get install -y chromium) to run the browser test")
    sync_playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (test extra)")
    return sync_playwright.sync_playwright


def _canvas_point(page, x: float, y: float) -> tuple[float, float]:
    """Where the image pixel (x, y) is on the screen: the canvas shows the whole image, scaled."""
    box = page.locator("#canvas").bounding_box()
    width, height = page.evaluate("() => [state.image.naturalWidth, state.image.naturalHeight]")
    return box["x"] + (x + 0.5) * box["width"] / width, box["y"] + (y + 0.5) * box["height"] / height


def _canvas_pixel(page, x: float, y: float) -> list[int]:
    return page.evaluate("([x, y]) => { const c = document.getElementById('canvas'), r = c.getBoundingClientRect(); "
                         "return Array.from(c.getContext('2d').getImageData(Math.floor(x - r.left), "
                         "Math.floor(y - r.top), 1, 1).data.slice(0, 3)); }", list(_canvas_point(page, x, y)))


def _captions(page) -> list[str]:
    return page.locator("#captions .pdlm-caption").all_inner_texts()


def _png_data_url(url: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))


def test_page_draws_on_the_image_clicks_a_shape_replays_and_answers(server, tmp_path):
    """At 1366x768: the preset's image under the brush with its masks as coloured regions; Run, the result
    beside it; the legend following the slider and Play; a shape selected by a click; a region painted on the
    image; the question tab's answer and its replay. Nothing is fetched from outside the server."""
    from infer.visualize import PALETTE

    sync_playwright = _browser()
    ARTEFACTS.mkdir(exist_ok=True)
    outside, sent = [], []
    image = Image.open(SCENE / "image.png").convert("RGB")
    masks = [np.asarray(Image.open(p).convert("L")) > 0 for p in MASK_FILES]
    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(  # a fresh profile folder: --user-data-dir
            tmp_path / "profile", executable_path=CHROMIUM, headless=True, viewport={"width": 1366, "height": 768},
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--no-first-run"])
        page = browser.new_page()
        page.on("request", lambda r: outside.append(r.url) if not r.url.startswith((server, "data:")) else None)
        page.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/page/caption") else None)
        page.set_default_timeout(180_000)  # a loaded 2-core machine compiles a new bucket in tens of seconds
        page.goto(server + "/")
        assert page.locator("#preset-1").inner_text() == "Blank canvas"
        page.wait_for_selector("#region-4")  # the demo scene preset: its 5 masks became regions 0..4
        x, y = _centre(masks[1])
        assert _canvas_pixel(page, x, y) != list(image.getpixel((x, y)))  # region 1's tint is over the image

        page.click("#run")
        page.wait_for_function("() => document.querySelectorAll('#captions .pdlm-caption').length == 5")
        assert _captions(page) == CAPTIONS
        assert "forwards" in page.locator("#timings").inner_text()
        for selector in ("#run", "#overlay", "#captions", "#play", "#canvas"):  # all on one screen
            box = page.locator(selector).bounding_box()
            assert box["y"] >= 0 and box["y"] + box["height"] <= 768, selector
        overlay = _png_data_url(page.locator("#overlay").get_attribute("src"))
        for i in range(5):  # each region's outline in its brush colour
            assert np.all(overlay == PALETTE[i], axis=-1).sum() > 100, i
        page.screenshot(path=str(ARTEFACTS / "serve_run.png"))

        # The legend follows the slider: after the first of S forwards, the schedule's first count is masked.
        slots, S = len(MASK_FILES) * SAMPLER["gen_length"], SAMPLER["steps"]
        masked = remask_counts(slots, S)
        page.locator("#step").evaluate(
            "(el) => { el.value = '1'; el.dispatchEvent(new Event('input', {bubbles: true})); }")
        page.wait_for_function(f"() => document.querySelector('#step-label').innerText == 'step 1 / {S}'")
        at_step_1 = _captions(page)
        assert at_step_1 != CAPTIONS and sum(c.count("▢") for c in at_step_1) == masked[0]
        page.screenshot(path=str(ARTEFACTS / "serve_step1.png"))

        # Play shows every step from the all-masked start to the final captions.
        page.evaluate("() => { window.seen = []; new MutationObserver(() => window.seen.push("
                      "document.querySelector('#captions').innerText)).observe(document.querySelector('#captions'), "
                      "{childList: true, subtree: true, characterData: true}); }")
        page.click("#play")
        page.wait_for_function(f"() => document.querySelector('#step-label').innerText == 'step {S} / {S}'")
        assert _captions(page) == CAPTIONS
        seen = page.evaluate("() => window.seen")
        assert any(text.count("▢") == slots for text in seen) and any(text.count("▢") == masked[-2] for text in seen)

        # Click a shape: every region deleted, then the shape of mask 4 clicked becomes region 0.
        for _ in range(5):
            page.click("#region-delete")
        page.wait_for_function("() => !document.querySelector('#region-0')")
        x, y = _centre(masks[1])
        assert np.abs(np.subtract(_canvas_pixel(page, x, y), image.getpixel((x, y)))).max() <= 2  # image below
        page.click("#tool-shape")
        page.mouse.click(*_canvas_point(page, *_centre(masks[4])))
        page.wait_for_selector("#region-0")
        page.click("#run")
        page.wait_for_function("() => document.querySelectorAll('#captions .pdlm-caption').length == 1")
        clicked = _png_data_url(sent[-1]["masks"][0])[..., 0] > 0
        assert (clicked & masks[4]).sum() / (clicked | masks[4]).sum() > 0.99
        assert _captions(page) == [r["caption"] for r in _ok(server, {"image": DEMO["image"],
                                                                      "masks": [_png(clicked)]})["regions"]]
        page.screenshot(path=str(ARTEFACTS / "serve_click.png"))

        # Draw on the image: a brush scribble over the shape of mask 2 becomes region 1, in region 1's colour.
        page.click("#tool-brush")
        page.click("#region-add")
        ys, xs = np.nonzero(masks[2])
        for row in np.linspace(ys.min() + 4, ys.max() - 4, 4):
            page.mouse.move(*_canvas_point(page, xs.min() + 4, row))
            page.mouse.down()
            page.mouse.move(*_canvas_point(page, xs.max() - 4, row), steps=6)
            page.mouse.up()
        page.mouse.move(0, 0)  # off the canvas: no brush cursor drawn
        ring = page.evaluate("(rgb) => { const c = document.getElementById('canvas'); const d = c.getContext('2d')"
                             ".getImageData(0, 0, c.width, c.height).data; let n = 0; for (let k = 0; k < d.length; "
                             "k += 4) n += d[k] == rgb[0] && d[k + 1] == rgb[1] && d[k + 2] == rgb[2]; return n; }",
                             list(PALETTE[1]))
        assert ring > 50  # the brush's outline is drawn in the region's palette colour
        page.click("#run")
        page.wait_for_function("() => document.querySelectorAll('#captions .pdlm-caption').length == 2")
        drawn = _png_data_url(sent[-1]["masks"][1])[..., 0] > 0
        assert (drawn & masks[2]).sum() > 0.6 * masks[2].sum()
        assert all(c and "▢" not in c for c in _captions(page))
        page.screenshot(path=str(ARTEFACTS / "serve_drawn.png"))

        # The question tab: the same image, an answer (random weights: any text) and its replay.
        page.click("#tab-question")
        page.click("#ask")
        page.wait_for_selector("#answer-replay:not([hidden])")
        final = page.locator("#answer").inner_text()
        assert final.strip() and page.locator("#answer-error").inner_text() == ""
        label = page.locator("#answer-step-label").inner_text()
        assert label.startswith("step ") and label.split()[1] == label.split()[3]
        page.locator("#answer-step").evaluate(
            "(el) => { el.value = '0'; el.dispatchEvent(new Event('input', {bubbles: true})); }")
        page.wait_for_function("() => document.querySelector('#answer-step-label').innerText.startsWith('step 0 ')")
        assert set(page.locator("#answer").inner_text().split()) == {"▢"}
        page.screenshot(path=str(ARTEFACTS / "serve_question.png"))
        page.click("#tab-regions")
        assert page.locator("#canvas").bounding_box()["width"] > 100 and page.locator("#region-1").is_visible()
        browser.close()
    assert outside == [], f"the page fetched from outside the server: {outside}"
