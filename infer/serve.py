"""`pdlm-serve`: the web page (at `/`, `infer/serve_page.py`), a JSON HTTP API and an OpenAI-compatible API on
one FastAPI app, with micro-batching (docs/SERVING.md).

    pdlm-serve [--checkpoint DIR] [--base-checkpoint DIR] [--host 127.0.0.1] [--port 7860] [--api-key KEY]
               [--max-batch N] [--batch-wait-ms MS] [--no-warmup] [--warmup-masks K] [--compilation-cache DIR|none]

Routes: `POST /v1/regions/caption` (a JSON request → the record `pdlm-infer` writes), `POST
/v1/chat/completions` and `GET /v1/models` (`infer.openai_api`), `GET /healthz` (503 until the warm-up is
done), `GET /v1/model` (config, sampler defaults, limits, the batch sizes formed so far), and the page at `/`.

Every request, from the APIs or the page, goes through one `MicroBatcher`: requests that arrive within
`--batch-wait-ms` of each other with the same settings and buckets run together through
`RegionCaptioner.caption_batch` (the rows of one jitted call per bucket), so each gets exactly the tokens,
captions and forward count it would get alone; "seconds" is that of the shared call. Every request is
bounded by the model's and the server's limits (`pdlm_jax.limits`) before it is queued.
"""

import argparse
import base64
import binascii
import collections
import concurrent.futures
import dataclasses
import io
import json
import logging
import os
import queue
import sys
import threading
import time

import numpy as np
from PIL import Image

from pdlm_jax import DEMO_MODEL
from pdlm_jax.errors import PDLMError, TooLarge
from pdlm_jax.generation import GenerationSettings

log = logging.getLogger("pdlm-serve")

# Request fields and their types; the defaults of gen_length / steps come from the checkpoint's sampler.json.
FIELDS = {"image": str, "masks": list, "gen_length": int, "steps": int, "question": str, "cache": str,
          "unmask": str, "temperature": float, "top_p": float, "seed": int, "history": bool}
OPTIONS = ("question", "history")  # the request fields that are no generation setting




@dataclasses.dataclass
class Job:
    """One validated request: an RGB image and its bool masks (None: a Base question), its generation settings
    (`GenerationSettings`), the question (the region prompt when captioning) and whether the captions after
    every step go back too (`history`; always for questions). `warnings` go back with the result."""

    image: Image.Image
    masks: list[np.ndarray] | None
    settings: GenerationSettings
    question: str
    history: bool = False
    warnings: list[str] = dataclasses.field(default_factory=list)

    @property
    def group(self) -> tuple:
        """Jobs with equal groups share one caption_batch call and each gets exactly its result alone; equal
        mask counts and settings put their passes in the same buckets, so no call runs half empty. The
        threshold sampler's forward count is the batch's (it runs until every row is done), so it runs alone;
        so does a question (the Base sampler runs one question per call)."""
        if self.masks is None or self.settings.mode.unmask == "threshold":
            return (id(self),)
        return (len(self.masks), self.settings, self.question, self.history)


def _decode_base64(text: str, what: str) -> bytes:
    if "," in text[:100] and text.startswith("data:"):  # a data URL from a browser
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise PDLMError(f"{what} is not valid base64; send the file's bytes base64-encoded") from None


def _open_image(data: bytes, what: str, max_pixels: int) -> Image.Image:
    from pdlm_jax.limits import check_pixels

    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:  # a small file of a huge image: Pillow refuses before decoding
        raise TooLarge(f"{what} is over Pillow's decompression-bomb limit of {2 * Image.MAX_IMAGE_PIXELS} pixels "
                       f"and the server's limit of {max_pixels} (--max-image-pixels); send a smaller image") from None
    except Exception:
        raise PDLMError(f"{what} is not an image Pillow can read; send a base64 PNG or JPEG") from None
    check_pixels(image.size, what, max_pixels)
    try:
        image.load()
    except Exception:
        raise PDLMError(f"{what} is truncated or corrupt; send a complete PNG or JPEG file") from None
    return image


def decode_mask(mask, i: int, size: tuple[int, int], max_pixels: int) -> np.ndarray | Image.Image:
    """A request's mask i: a base64 PNG (any size; resized like pdlm-infer does) or a COCO RLE
    {"size": [h, w], "counts": str | list} of the image's size."""
    what = f"masks[{i}]"
    if isinstance(mask, str):
        return _open_image(_decode_base64(mask, what), what, max_pixels)
    if isinstance(mask, dict) and set(mask) == {"size", "counts"}:
        from pycocotools import mask as mask_utils

        h_w = mask["size"]
        if not (isinstance(h_w, list) and len(h_w) == 2 and all(isinstance(v, int) and v > 0 for v in h_w)):
            raise PDLMError(f"{what}.size must be [height, width] in pixels, got {h_w!r}")
        if tuple(h_w) != (size[1], size[0]):
            raise PDLMError(f"{what} is an RLE of size {h_w} but the image is [{size[1]}, {size[0]}] (height, width)")
        counts = mask["counts"]
        try:
            if isinstance(counts, list) and all(isinstance(c, int) and c >= 0 for c in counts):
                if sum(counts) != h_w[0] * h_w[1]:
                    raise ValueError
                rle = mask_utils.frPyObjects({"size": h_w, "counts": counts}, *h_w)
            elif isinstance(counts, str):
                rle = {"size": h_w, "counts": counts.encode()}
            else:
                raise ValueError
            return mask_utils.decode(rle).astype(bool)
        except Exception:
            raise PDLMError(f"{what}.counts is not a valid COCO RLE of size {h_w} (a compressed string or a list "
                            "of run lengths summing to height·width)") from None
    raise PDLMError(f"{what} must be a base64 PNG string or a COCO RLE object {{\"size\": [h, w], \"counts\": ...}}")


class Service:
    """The loaded model(s), the request parser, the micro-batcher and the server's state; shared by the API,
    the OpenAI-compatible routes and the page.

    `captioner`: the region-captioning handle (None when only a Base checkpoint is served); `answerer`: the
    PerceptionDLM-Base handle (`--base-checkpoint`, or `--checkpoint` when that is a Base checkpoint), else
    None; `handle`: the captioner, else the answerer (the page's model). Both handles' limits get the
    server's mask and pixel limits.
    """

    def __init__(self, captioner, checkpoint: str, max_batch: int = 8, batch_wait_ms: float = 10.0,
                 max_image_pixels: int = 40_000_000, max_masks: int | None = None, answerer=None,
                 base_checkpoint: str | None = None, max_body_bytes: int = 32 << 20):
        from pdlm_jax.regions.prompt import DEFAULT_QUESTION

        self.captioner, self.answerer = captioner, answerer
        self.checkpoint, self.base_checkpoint = checkpoint, base_checkpoint
        for handle in (captioner, answerer):
            if handle is not None:
                handle.limits = dataclasses.replace(handle.limits, max_image_pixels=max_image_pixels,
                                                    max_masks=max_masks or handle.limits.max_masks)
        self.handle = captioner or answerer
        self.max_image_pixels, self.max_body_bytes = max_image_pixels, max_body_bytes
        self.question = DEFAULT_QUESTION
        self.batcher = MicroBatcher(captioner, max_batch, batch_wait_ms / 1000, answerer)
        self.ready = False  # True once the warm-up has compiled the common buckets
        self.draining = False  # True after SIGTERM: new requests get 503, in-flight ones finish
        self.in_flight = 0

    def parse(self, body) -> Job:
        """A JSON request body (already decoded) → a validated Job; PDLMError (TooLarge) naming the field."""
        if not isinstance(body, dict):
            raise PDLMError("the request body must be a JSON object with \"image\" and \"masks\"")
        unknown = sorted(set(body) - set(FIELDS))
        if unknown:
            raise PDLMError(f"unknown field(s) {', '.join(unknown)}; known: {', '.join(FIELDS)}")
        for field in ("image", "masks"):
            if field not in body:
                raise PDLMError(f"\"{field}\" is required (image: base64 PNG/JPEG; masks: a list, one per region)")
        for field, value in body.items():
            kind = FIELDS[field]
            number = float if kind is float else int  # a float field takes an integer too; bool is not a number
            ok = isinstance(value, bool) if kind is bool else (
                isinstance(value, number if kind in (int, float) else kind) and not isinstance(value, bool))
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                ok = True
            if not ok:
                raise PDLMError(f"\"{field}\" must be a JSON {kind.__name__}, got {json.dumps(value)[:40]}")
        if not body["masks"]:
            raise PDLMError("\"masks\" is empty: give at least one mask per region to caption")
        self.check_mask_count(len(body["masks"]))
        image = self.open_image(body["image"], "image")
        masks = [decode_mask(m, i, image.size, self.max_image_pixels) for i, m in enumerate(body["masks"])]
        return self.make_job(image, masks, {k: body[k] for k in FIELDS if k in body and k not in ("image", "masks")})

    def open_image(self, data: str, what: str) -> Image.Image:
        """A base64 (or data URL) image of a request as RGB, within the pixel limit."""
        return _open_image(_decode_base64(data, what), what, self.max_image_pixels).convert("RGB")

    def check_mask_count(self, count: int) -> None:
        if self.captioner is None:
            raise PDLMError(f"this server has no region-captioning model ({self.checkpoint} is a PerceptionDLM-Base "
                            "checkpoint): ask questions at /v1/chat/completions, or start it with a PerceptionDLM "
                            "--checkpoint")
        if count > self.captioner.limits.max_masks:
            raise PDLMError(f"{count} masks, over the server's limit of {self.captioner.limits.max_masks} per "
                            "request (--max-masks); send them in several requests")

    def make_job(self, image: Image.Image, masks: list, request: dict) -> Job:
        """Check masks (any `load_masks` input) and the request's settings (generation ones, `OPTIONS`; missing
        ones: the checkpoint's defaults) before queueing."""
        from pdlm_jax.regions.masks import load_masks

        self.check_mask_count(len(masks))
        warnings: list[str] = []
        masks = load_masks(masks, image.size, warnings)
        question = request.get("question", self.question)
        settings = self.captioner.settings(**{k: v for k, v in request.items() if k not in OPTIONS})
        settings.check_regions(len(masks), self.captioner.cfg.region.prompt_numbers)
        self.captioner.limits.check_caption(len(masks), settings.gen_length, question, image.size)
        return Job(image, masks, settings, question, request.get("history", False), warnings)

    def question_job(self, image: Image.Image, question: str, request: dict) -> Job:
        """A Base question (request: gen_length, block_length, steps; missing or None: the checkpoint's)."""
        if self.answerer is None:
            raise PDLMError("this server has no PerceptionDLM-Base model to answer questions; start it with "
                            "--base-checkpoint DIR (or give masks as extra image parts to caption regions)")
        settings = self.answerer.settings(**request)
        if not question.strip():
            raise PDLMError("the question is empty: put the question as a text part of the user message")
        self.answerer.limits.check_answer(settings.gen_length, settings.steps, question, image.size)
        return Job(image, None, settings, question, history=True)

    def caption(self, job: Job) -> dict:
        return self.batcher.submit(job)

    def warmup(self, mask_counts: list[int]) -> None:
        """Compile, before /healthz reports ready, the programs of the default request: `mask_counts` masks at
        every batch size the batcher forms (`MicroBatcher.row_counts`), and a default question.

        The warm-up image is a square of the tile size (one tile); other tilings compile on first use.
        """
        start = time.perf_counter()
        if self.captioner is not None:
            size = self.captioner.cfg.region.image_size
            image = Image.new("RGB", (size, size), (127, 127, 127))
            for k in mask_counts:
                masks = [np.zeros((size, size), bool) for _ in range(k)]
                for i, m in enumerate(masks):
                    m[i * size // k:(i + 1) * size // k] = True
                job = self.make_job(image, masks, {})
                for rows in self.batcher.row_counts:
                    self.batcher.run_now([job] * rows)
        if self.answerer is not None:
            size = self.answerer.cfg.region.image_size
            image = Image.new("RGB", (size, size), (127, 127, 127))
            self.batcher.run_now([self.question_job(image, "What is in the picture?", {})])
        log.info("warm-up compiled the common buckets in %.1f s", time.perf_counter() - start)

    def model_info(self) -> dict:
        info = {"checkpoint": str(self.checkpoint), "kind": "region" if self.captioner else "base",
                "config": self.handle.cfg.to_dict(), "sampler_defaults": self.handle.defaults.record(),
                "mask_id": self.handle.tokenizer.special.mask, "max_batch": self.batcher.max_batch,
                "batch_wait_ms": self.batcher.wait_s * 1000, "max_image_pixels": self.max_image_pixels,
                "limits": self.handle.limits.describe() | {"max_body_bytes": self.max_body_bytes},
                "batches": {str(k): v for k, v in sorted(self.batcher.sizes.items())},
                "compiled_programs": self.handle.num_compiled,
                "ready": self.ready, "in_flight": self.in_flight}
        if self.answerer is not None:
            info["base"] = {"checkpoint": str(self.base_checkpoint or self.checkpoint),
                            "sampler_defaults": self.answerer.defaults.record(),
                            "limits": self.answerer.limits.describe() | {"max_body_bytes": self.max_body_bytes}}
        return info


class MicroBatcher:
    """One worker thread runs every model call; requests queued within `wait_s` of each other are grouped
    (`Job.group`) and each group runs as one `caption_batch` call whose rows are padded to a power of two
    (`row_counts`), so few programs exist and the warm-up compiles them all. `sizes` counts the groups formed
    by size."""

    def __init__(self, handle, max_batch: int, wait_s: float, answerer=None):
        if max_batch < 1:
            raise PDLMError(f"--max-batch must be a positive integer, got {max_batch}")
        self.handle, self.answerer, self.max_batch, self.wait_s = handle, answerer, max_batch, wait_s
        self.sizes: collections.Counter[int] = collections.Counter()
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()  # one model call at a time (the warm-up and the worker)
        threading.Thread(target=self._loop, name="pdlm-serve-batcher", daemon=True).start()

    @property
    def row_counts(self) -> list[int]:
        """The batch sizes of the programs: powers of two below max_batch, and max_batch."""
        return sorted({min(1 << i, self.max_batch) for i in range(self.max_batch.bit_length() + 1)})

    def submit(self, job: Job) -> dict:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((job, future))
        return future.result()

    def run_now(self, jobs: list[Job]) -> list[dict]:
        """Run jobs of one group in this thread (the warm-up), not counted in `sizes`."""
        with self._lock:
            return self._call(jobs)

    def _collect(self) -> list:
        pending = [self._queue.get()]
        while len(pending) < self.max_batch:
            try:
                pending.append(self._queue.get(timeout=self.wait_s))
            except queue.Empty:
                break
        return pending

    def _loop(self) -> None:
        while True:
            groups: dict[tuple, list] = {}
            for job, future in self._collect():
                groups.setdefault(job.group, []).append((job, future))
            for group in groups.values():
                with self._lock:
                    self._run(group)

    def _call(self, jobs: list[Job]) -> list[dict]:
        first = jobs[0]
        if first.masks is None:
            return [self.answerer.answer(first.image, first.question, first.settings, return_steps=True)]
        rows = next(n for n in self.row_counts if n >= len(jobs))
        return self.handle.caption_batch([(job.image, job.masks) for job in jobs], first.settings,
                                         question=first.question, history=first.history, batch_size=rows)

    def _run(self, group: list) -> None:
        jobs = [job for job, _ in group]
        try:
            results = self._call(jobs)
        except Exception as e:  # noqa: BLE001 — hand each request its own outcome
            if len(group) > 1:
                log.warning("a batch of %d failed (%s); running its requests one by one", len(group), e)
                for one in group:
                    self._run([one])
                return
            group[0][1].set_exception(e)
            return
        self.sizes[len(jobs)] += 1
        log.info("ran a batch of %d request(s) in %.2f s", len(jobs), results[0]["seconds"])
        for (job, future), result in zip(group, results):
            future.set_result(result | {"batch": len(jobs)} | ({"warnings": job.warnings} if job.masks else {}))


async def read_body(request, max_body_bytes: int) -> bytes:
    """The request body, at most `max_body_bytes` (TooLarge beyond, checked as it arrives).

    An over-size body is still read, and dropped, up to twice the limit before the 413 goes out: a client
    that sends its whole body before reading the answer (most do) then gets the 413 instead of a broken pipe.
    """
    too_large = TooLarge(f"the request body is over the server's limit of {max_body_bytes} bytes "
                         "(--max-body-bytes); send a smaller image")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > 2 * max_body_bytes:
        raise too_large
    body, size = bytearray(), 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > 2 * max_body_bytes:
            break
        if size <= max_body_bytes:
            body += chunk
    if size > max_body_bytes:
        raise too_large
    return bytes(body)


def build_app(service: Service, max_body_bytes: int | None = None, api_key: str | None = None):
    """The FastAPI app: JSON routes and the OpenAI-compatible routes first, then the page at `/`.

    With `api_key`, every /v1 and /page route needs `Authorization: Bearer KEY` (401 otherwise; the page asks
    for the key once and sends it)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool

    from infer import openai_api
    from infer.serve_page import build_page

    if max_body_bytes is not None:
        service.max_body_bytes = max_body_bytes
    app = FastAPI(title="pdlm-serve", docs_url=None, redoc_url=None)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.get("/healthz")
    def healthz():
        if service.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not service.ready:
            return JSONResponse({"status": "warming"}, status_code=503)
        return {"status": "ok"}

    @app.get("/v1/model")
    def model():
        return service.model_info()

    @app.post("/v1/regions/caption")
    async def caption(request: Request):
        try:
            body = await read_body(request, service.max_body_bytes)
        except TooLarge as e:
            return error(413, str(e))
        try:
            parsed = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return error(400, "the request body is not valid JSON; send {\"image\": ..., \"masks\": [...]}")
        try:
            job = await run_in_threadpool(service.parse, parsed)
            return await run_in_threadpool(service.caption, job)
        except TooLarge as e:
            return error(413, str(e))
        except PDLMError as e:
            return error(400, str(e))

    openai_api.add_routes(app, service)

    @app.middleware("http")
    async def admission(request: Request, call_next):
        """The API key, the shutdown (503 for new requests while in-flight ones finish), in-flight counting."""
        if not request.url.path.startswith(("/v1/", "/page/")):  # the page itself and /healthz
            return await call_next(request)
        if api_key and request.headers.get("authorization", "") != f"Bearer {api_key}":
            return error(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY' "
                              "(--api-key / PDLM_API_KEY of the server)")
        if service.draining:
            return error(503, "the server is shutting down; retry on another instance")
        service.in_flight += 1
        try:
            return await call_next(request)
        finally:
            service.in_flight -= 1

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        log.exception("internal error on %s", request.url.path)
        return error(500, f"internal error ({type(exc).__name__}); see the server log")

    app.include_router(build_page(service, service.answerer, service.max_body_bytes))
    return app


class GracefulServer:
    """uvicorn's server with a draining shutdown: on SIGTERM/SIGINT new /v1 requests get 503 while the ones in
    flight finish (at most `drain_s`), then the server stops and the process exits 0."""

    def __new__(cls, config, service: Service, drain_s: float):
        import uvicorn

        class Server(uvicorn.Server):
            def handle_exit(self, sig, frame):
                if service.draining:  # a second signal: stop now
                    self.force_exit = True
                    return
                log.info("signal %d: finishing %d request(s) in flight, refusing new ones", sig, service.in_flight)
                service.draining = True
                threading.Thread(target=self._drain, name="pdlm-serve-drain", daemon=True).start()

            def _drain(self):
                deadline = time.monotonic() + drain_s
                while service.in_flight and time.monotonic() < deadline:
                    time.sleep(0.05)
                self.should_exit = True  # not uvicorn's handle_exit: it would re-raise the signal at exit

        return Server(config)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pdlm-serve", description="Serve PerceptionDLM region captioning (and "
                                "PerceptionDLM-Base question answering): a web demo at /, a JSON API at "
                                "/v1/regions/caption and OpenAI-compatible /v1/chat/completions, batching "
                                "concurrent requests.")
    p.add_argument("--checkpoint", default=str(DEMO_MODEL),
                   help="converted checkpoint directory (a PerceptionDLM-Base one is served for questions); "
                        "default: the embedded demo model")
    p.add_argument("--base-checkpoint", metavar="DIR",
                   help="a PerceptionDLM-Base checkpoint served beside --checkpoint for questions")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--api-key", default=os.environ.get("PDLM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 routes and the key on the page "
                        "(default: $PDLM_API_KEY; none: open)")
    p.add_argument("--max-batch", type=int, default=8, help="most requests run together in one call")
    p.add_argument("--batch-wait-ms", type=float, default=10.0,
                   help="how long to wait for the next request before running the ones queued")
    p.add_argument("--max-body-bytes", type=int, default=32 << 20, help="larger request bodies get HTTP 413")
    p.add_argument("--max-image-pixels", type=int, default=40_000_000,
                   help="larger images and masks get HTTP 413")
    p.add_argument("--max-masks", type=int, default=64, help="more masks in one request get HTTP 400")
    p.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="compile the common buckets before /healthz reports ready (on by default)")
    p.add_argument("--warmup-masks", type=int, metavar="K",
                   help="warm up mask counts 1..K (default: the model's regions per pass)")
    p.add_argument("--drain-seconds", type=float, default=60.0,
                   help="on SIGTERM, how long in-flight requests may take to finish before the server stops")
    p.add_argument("--mesh", metavar="SPEC", help="shard over devices, e.g. data:2,tensor:4 (see pdlm-infer)")
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"))
    p.add_argument("--attention", default="auto", choices=("auto", "xla", "cudnn"))
    p.add_argument("--compilation-cache", metavar="DIR|none",
                   help="persistent JAX compilation cache folder; default: $PDLM_COMPILATION_CACHE, else "
                        "$XDG_CACHE_HOME/pdlm-jax/xla (~/.cache/pdlm-jax/xla); 'none' turns it off")
    return p


def load_handles(args: argparse.Namespace) -> tuple:
    """(captioner or None, answerer or None), checked before any weight is read."""
    import pdlm_jax
    from pdlm_jax.answering import QuestionAnswerer
    from pdlm_jax.api import answerer
    from pdlm_jax.checkpoint import load_config

    if args.base_checkpoint and not load_config(args.base_checkpoint).is_base:
        raise PDLMError(f"--base-checkpoint {args.base_checkpoint} is a region-captioning checkpoint; give a "
                        "PerceptionDLM-Base checkpoint (or serve it as --checkpoint)")
    if args.base_checkpoint and load_config(args.checkpoint).is_base:
        raise PDLMError(f"--checkpoint {args.checkpoint} is already a PerceptionDLM-Base checkpoint; give "
                        "--base-checkpoint only beside a region-captioning --checkpoint")
    load = lambda path: pdlm_jax.load(path, dtype=args.dtype, mesh=args.mesh, attention=args.attention)  # noqa: E731
    first = load(args.checkpoint)
    if isinstance(first, QuestionAnswerer):
        return None, first
    return first, answerer(load(args.base_checkpoint)) if args.base_checkpoint else None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s", stream=sys.stderr)
    for name in ("pdlm-serve", "pdlm_jax"):
        logging.getLogger(name).setLevel(logging.INFO)
    try:
        import uvicorn

        from pdlm_jax import compilation_cache

        for flag, value in (("--batch-wait-ms", args.batch_wait_ms), ("--drain-seconds", args.drain_seconds)):
            if value < 0:
                raise PDLMError(f"{flag} must be >= 0, got {value}")
        for flag, value in (("--max-masks", args.max_masks), ("--warmup-masks", args.warmup_masks or 1)):
            if value < 1:
                raise PDLMError(f"{flag} must be a positive integer, got {value}")
        if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
            log.warning("listening on %s without --api-key: anyone who can reach this address can use the model",
                        args.host)
        start = time.perf_counter()
        cache = compilation_cache.configure(args.compilation_cache)
        captioner, answerer = load_handles(args)
        service = Service(captioner, args.checkpoint, args.max_batch, args.batch_wait_ms, args.max_image_pixels,
                          args.max_masks, answerer, args.base_checkpoint, args.max_body_bytes)
        app = build_app(service, api_key=args.api_key)
        log.info("loaded %s in %.1f s (compilation cache: %s); serving on http://%s:%d", args.checkpoint,
                 time.perf_counter() - start, cache or "off", args.host, args.port)
        if args.warmup:
            per_pass = captioner.cfg.region.prompt_numbers if captioner else 0
            counts = list(range(1, min(args.warmup_masks or per_pass, per_pass) + 1))

            def warm():
                try:
                    service.warmup(counts)
                except Exception:  # noqa: BLE001 — serve anyway; the first requests compile instead
                    log.exception("warm-up failed")
                service.ready = True

            threading.Thread(target=warm, name="pdlm-serve-warmup", daemon=True).start()
        else:
            service.ready = True
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning")
        GracefulServer(config, service, args.drain_seconds).run()
        log.info("stopped")
    except ImportError as e:
        print(f"pdlm-serve: error: {e.name or e} is missing; install the serve extra: pip install 'pdlm-jax[serve]'",
              file=sys.stderr)
        return 2
    except PDLMError as e:
        print(f"pdlm-serve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
