"""The web page of `pdlm-serve`: one HTML page (`serve_page.html`, plain JS on a canvas) and the three JSON
routes it calls, all on the server's FastAPI app.

The picture being captioned is the one under the brush: a preset or an upload. Every region is a layer drawn
in its own colour, the same colour as its outline and tag in the result (`infer.visualize.PALETTE`). Clicking
a shape with the shape tool makes it a region: the server flood-fills the pixels of similar colour connected
to the click (`select_shape`). Runs go through the server's micro-batcher like API requests and come back
with the sampler's history, which the step slider and Play replay. With a Base model (`answerer`), a second
tab answers questions about the same picture and replays the block-by-block denoising of the answer.

Routes: `GET /` (the page), `POST /page/select`, `POST /page/caption`, `POST /page/answer`.
"""

from __future__ import annotations

import base64
import io
import json
import threading
from pathlib import Path

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool

from infer.serve import TooLarge, _decode_base64, _open_image
from infer.visualize import PALETTE, overlay
from pdlm_jax import DEMO_SCENE
from pdlm_jax.errors import PDLMError

MODES = {"exact": ("none", "remask"), "prefix cache": ("prefix", "remask"), "threshold": ("none", "threshold:0.9")}
PLACEHOLDER = "▢"  # a still-masked slot
BLANK_SIZE = (384, 384)
# The page's colours: captions in TEXT on BACKGROUND; region numbers in TAG_TEXT on their palette colour.
BACKGROUND, TEXT, TAG_TEXT = (255, 255, 255), (17, 24, 39), (0, 0, 0)
DEFAULT_TOLERANCE = 40  # of 255, on the largest channel difference to the clicked colour
MAX_QUESTION_CHARS = 2000


def _hex(colour: tuple[int, int, int]) -> str:
    return "#" + "".join(f"{c:02x}" for c in colour)


def _png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def presets() -> list[dict]:
    """The page's presets: the bundled demo scene with its masks, and a blank canvas to draw on."""
    scene = {"name": "Demo scene", "image": _png_base64(Image.open(DEMO_SCENE / "image.png").convert("RGB")),
             "masks": [base64.b64encode(p.read_bytes()).decode() for p in sorted(DEMO_SCENE.glob("mask_*.png"))]}
    blank = {"name": "Blank canvas", "image": _png_base64(Image.new("RGB", BLANK_SIZE, "white")), "masks": []}
    return [scene, blank]


def partial_caption(tokenizer, ids, mask_id: int) -> str:
    """A caption at some step: the tokens decided so far, decoded in runs, and a placeholder per masked slot."""
    parts, run = [], []
    for t in list(ids) + [None]:
        if (t is None or t == mask_id) and run:
            parts.append(tokenizer.decode(run, skip_special_tokens=True).strip())
            run = []
        if t == mask_id:
            parts.append(PLACEHOLDER)
        elif t is not None:
            run.append(t)
    return " ".join(p for p in parts if p)


def select_shape(image: Image.Image, x: int, y: int, tolerance: int = DEFAULT_TOLERANCE) -> np.ndarray:
    """The pixels connected to (x, y) (4-neighbours) whose colour differs from the clicked one by at most
    `tolerance` in every channel: scikit-image's flood fill on the distance to the clicked colour."""
    from skimage.segmentation import flood

    if not (0 <= x < image.width and 0 <= y < image.height):
        raise PDLMError(f"the point ({x}, {y}) is outside the {image.width}x{image.height} image")
    if not 0 <= tolerance <= 255:
        raise PDLMError(f"tolerance must be in 0..255, got {tolerance}")
    pixels = np.asarray(image.convert("RGB"), np.int16)
    distance = np.abs(pixels - pixels[y, x]).max(axis=-1)
    return flood(distance, (y, x), connectivity=1, tolerance=tolerance)


def _field(body: dict, name: str, kind: type):
    value = body.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise PDLMError(f"\"{name}\" must be a JSON {kind.__name__}")
    return value


class Page:
    """The page's routes over the server's `Service` (model, defaults, micro-batcher) and, when a Base model
    is loaded, its question-answering handle."""

    def __init__(self, service, answerer=None):
        self.service, self.answerer = service, answerer
        self._answer_lock = threading.Lock()  # one answer at a time: the page's questions queue up

    def image(self, body: dict) -> Image.Image:
        data = _decode_base64(_field(body, "image", str), "image")
        return _open_image(data, "image", self.service.max_image_pixels).convert("RGB")

    def select(self, body: dict) -> dict:
        tolerance = _field(body, "tolerance", int) if "tolerance" in body else DEFAULT_TOLERANCE
        mask = select_shape(self.image(body), _field(body, "x", int), _field(body, "y", int), tolerance)
        return {"mask": _png_base64(Image.fromarray(mask)), "pixels": int(mask.sum())}

    def caption(self, body: dict) -> dict:
        """A caption request of the JSON API with the sampler's history: the captions at every step (the first:
        every slot masked) and the overlay picture without legend (the page draws it, following the slider)."""
        mode = body.pop("mode", "exact")
        if not isinstance(mode, str) or mode not in MODES:
            raise PDLMError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        body["cache"], body["unmask"] = MODES[mode]
        job = self.service.parse(body | {"history": True})
        result = self.service.caption(job)
        tokenizer = self.service.handle.tokenizer
        mask_id = tokenizer.special.mask
        history = [[[mask_id] * result["gen_length"]] * len(job.masks)] + result["history"]
        return {"steps": [[partial_caption(tokenizer, ids, mask_id) for ids in step] for step in history],
                "overlay": _png_base64(overlay(job.image, job.masks, None)),
                **{k: result[k] for k in ("seconds", "compile_seconds", "forwards", "tokens_per_forward", "mode",
                                          "batch")}}

    def answer(self, body: dict) -> dict:
        """The Base model's answer and the answer after every forward (cut at the first <|eot_id|>, as the
        final answer is), with the checkpoint's gen_length / block_length / steps."""
        if self.answerer is None:
            raise PDLMError("no Base model is loaded: start pdlm-serve with --base-checkpoint DIR")
        question = _field(body, "question", str)
        if len(question) > MAX_QUESTION_CHARS:
            raise PDLMError(f"the question has {len(question)} characters, over the page's {MAX_QUESTION_CHARS}")
        image = self.image(body)
        with self._answer_lock:
            result = self.answerer.answer(image, question, return_steps=True)
        special = self.answerer.tokenizer.special

        def text(ids: list[int]) -> str:
            ids = ids[:ids.index(special.eot)] if special.eot in ids else ids
            return partial_caption(self.answerer.tokenizer, ids, special.mask)

        states = [[special.mask] * result["gen_length"]] + result["step_states"]
        steps = [text(ids) for ids in states[:-1]] + [result["answer"]]
        return {"steps": steps, "answer": result["answer"],
                **{k: result[k] for k in ("seconds", "compile_seconds", "forwards", "gen_length", "block_length",
                                          "mode")}}

    def settings(self) -> dict:
        """What the page's script needs: presets, colours, defaults and limits."""
        return {"presets": presets(), "palette": [_hex(c) for c in PALETTE], "modes": list(MODES),
                "defaults": self.service.handle.defaults.record(), "question": self.service.question,
                "max_regions": self.service.handle.cfg.region.prompt_numbers, "placeholder": PLACEHOLDER,
                "tolerance": DEFAULT_TOLERANCE, "answers": self.answerer is not None}

    def html(self) -> str:
        colours = {"BACKGROUND": BACKGROUND, "TEXT": TEXT, "TAG_TEXT": TAG_TEXT}
        page = (Path(__file__).with_name("serve_page.html")).read_text()
        for name, colour in colours.items():
            page = page.replace(f"/*{name}*/", _hex(colour))
        return page.replace("/*SETTINGS*/", json.dumps(self.settings()).replace("</", "<\\/"))


def build_page(service, answerer=None, max_body_bytes: int = 32 << 20):
    """The page's routes as a FastAPI router, for the server's app. `service` is `infer.serve.Service`;
    `answerer` a Base model handle (`pdlm_jax.load` on a Base checkpoint) or None (no question tab); request
    bodies over `max_body_bytes` (the server's --max-body-bytes) get HTTP 413."""
    page, router = Page(service, answerer), APIRouter()
    html = page.html()

    @router.get("/", response_class=HTMLResponse)
    def index():
        return html

    def route(handler):
        async def call(request: Request):
            body = bytearray()
            async for chunk in request.stream():
                body += chunk
                if len(body) > max_body_bytes:
                    return JSONResponse({"error": f"the request body is over the server's limit of {max_body_bytes} "
                                                  "bytes (--max-body-bytes); use a smaller image"}, 413)
            try:
                parsed = json.loads(body)
            except ValueError:
                parsed = None
            if not isinstance(parsed, dict):
                return JSONResponse({"error": "the request body must be a JSON object"}, 400)
            try:
                return await run_in_threadpool(handler, parsed)
            except TooLarge as e:
                return JSONResponse({"error": str(e)}, 413)
            except PDLMError as e:
                return JSONResponse({"error": str(e)}, 400)
        return call

    for name in ("select", "caption", "answer"):
        router.add_api_route(f"/page/{name}", route(getattr(page, name)), methods=["POST"])
    return router
