"""`pdlm-serve`: the web demo (Gradio, at `/`) and a JSON HTTP API on one FastAPI app, with micro-batching.

    pdlm-serve [--checkpoint DIR] [--host 127.0.0.1] [--port 7860] [--max-batch N] [--batch-wait-ms MS]

Routes: `POST /v1/regions/caption` (a JSON request → the record `pdlm-infer` writes), `GET /healthz`,
`GET /v1/model` (config, sampler defaults, the batch sizes formed so far), and the page at `/`.

Every request, from the API or the page, goes through one `MicroBatcher`: requests that arrive within
`--batch-wait-ms` of each other with the same settings and mask count run together through
`RegionCaptioner.caption_batch` (the rows of one jitted call per bucket), so each gets exactly the tokens,
captions and forward count it would get alone; "seconds" is that of the shared call.
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
import re
import sys
import threading
import time

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no calls home

import numpy as np
from PIL import Image

from pdlm_jax import DEMO_MODEL, DEMO_SCENE
from pdlm_jax.errors import PDLMError

log = logging.getLogger("pdlm-serve")

# Request fields and their types; the defaults of gen_length / steps come from the checkpoint's sampler.json.
FIELDS = {"image": str, "masks": list, "gen_length": int, "steps": int, "question": str, "cache": str,
          "unmask": str, "temperature": float, "top_p": float, "seed": int, "history": bool}


EXTERNAL_SCRIPT = re.compile(rb'<script[^>]*\ssrc="https?://[^"]*"[^>]*>\s*</script>')


class TooLarge(PDLMError):
    """A request body or image over the server's limits (HTTP 413)."""


@dataclasses.dataclass
class Job:
    """One validated request: an RGB image, its bool masks and the caption_batch settings."""

    image: Image.Image
    masks: list[np.ndarray]
    settings: dict

    @property
    def group(self) -> tuple:
        """Jobs with equal groups share one caption_batch call and each gets exactly its result alone. The
        threshold sampler's forward count is the batch's (it runs until every row is done), so it runs alone."""
        if self.settings["unmask"].startswith("threshold"):
            return (id(self),)
        return (len(self.masks), *sorted(self.settings.items()))


def _decode_base64(text: str, what: str) -> bytes:
    if "," in text[:100] and text.startswith("data:"):  # a data URL from a browser
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise PDLMError(f"{what} is not valid base64; send the file's bytes base64-encoded") from None


def _open_image(data: bytes, what: str, max_pixels: int) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
    except Exception:
        raise PDLMError(f"{what} is not an image Pillow can read; send a base64 PNG or JPEG") from None
    if image.width * image.height > max_pixels:
        raise TooLarge(f"{what} is {image.width}x{image.height} = {image.width * image.height} pixels, over the "
                       f"server's limit of {max_pixels} (--max-image-pixels); send a smaller image")
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
    """The loaded model, the request parser and the micro-batcher; shared by the API and the page."""

    def __init__(self, handle, checkpoint: str, max_batch: int = 8, batch_wait_ms: float = 10.0,
                 max_image_pixels: int = 40_000_000):
        from pdlm_jax.checkpoint import sampler_defaults
        from pdlm_jax.regions.prompt import DEFAULT_QUESTION

        self.handle, self.checkpoint = handle, checkpoint
        self.defaults = {"gen_length": 32, "steps": 32} | {
            k: v for k, v in sampler_defaults(checkpoint).items() if k in ("gen_length", "steps")}
        self.max_image_pixels = max_image_pixels
        self.question = DEFAULT_QUESTION
        self.batcher = MicroBatcher(handle, max_batch, batch_wait_ms / 1000)

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
        image = _open_image(_decode_base64(body["image"], "image"), "image", self.max_image_pixels).convert("RGB")
        if not body["masks"]:
            raise PDLMError("\"masks\" is empty: give at least one mask per region to caption")
        masks = [decode_mask(m, i, image.size, self.max_image_pixels) for i, m in enumerate(body["masks"])]
        return self.make_job(image, masks, {k: body[k] for k in FIELDS if k in body and k not in ("image", "masks")})

    def make_job(self, image: Image.Image, masks: list, settings: dict) -> Job:
        """Check masks (any `load_masks` input) and settings (missing ones: the defaults) before queueing."""
        from pdlm_jax.api import check_settings
        from pdlm_jax.pipeline import Mode
        from pdlm_jax.regions.masks import load_masks

        masks = load_masks(masks, image.size)
        settings = dict(gen_length=self.defaults["gen_length"], steps=self.defaults["steps"], temperature=0.0,
                        top_p=1.0, question=self.question, seed=0, cache="none", unmask="remask",
                        history=False) | settings
        settings["temperature"], settings["top_p"] = float(settings["temperature"]), float(settings["top_p"])
        check_settings(settings["gen_length"], settings["steps"], settings["temperature"], settings["top_p"],
                       len(masks), self.handle.cfg.region.prompt_numbers)
        Mode.parse(settings["cache"], settings["unmask"])
        return Job(image, masks, settings)

    def caption(self, job: Job) -> dict:
        return self.batcher.submit(job)

    def model_info(self) -> dict:
        return {"checkpoint": str(self.checkpoint), "config": self.handle.cfg.to_dict(),
                "sampler_defaults": self.defaults, "mask_id": self.handle.tokenizer.special.mask,
                "max_batch": self.batcher.max_batch, "batch_wait_ms": self.batcher.wait_s * 1000,
                "max_image_pixels": self.max_image_pixels,
                "batches": {str(k): v for k, v in sorted(self.batcher.sizes.items())},
                "compiled_programs": self.handle.program.num_compiled}


class MicroBatcher:
    """One worker thread runs every caption call; requests queued within `wait_s` of each other are grouped
    (`Job.group`) and each group runs as one `caption_batch` call. `sizes` counts the groups formed by size."""

    def __init__(self, handle, max_batch: int, wait_s: float):
        if max_batch < 1:
            raise PDLMError(f"--max-batch must be a positive integer, got {max_batch}")
        self.handle, self.max_batch, self.wait_s = handle, max_batch, wait_s
        self.sizes: collections.Counter[int] = collections.Counter()
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._loop, name="pdlm-serve-batcher", daemon=True).start()

    def submit(self, job: Job) -> dict:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((job, future))
        return future.result()

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
                self._run(group)

    def _run(self, group: list) -> None:
        jobs = [job for job, _ in group]
        size = 1 << (len(jobs) - 1).bit_length()  # rows per call: a power of two, so few programs compile
        try:
            results = self.handle.caption_batch([(job.image, job.masks) for job in jobs], **jobs[0].settings,
                                                batch_size=min(size, self.max_batch))
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
        for (_, future), result in zip(group, results):
            future.set_result(result | {"batch": len(jobs)})


def build_app(service: Service, max_body_bytes: int = 32 << 20):
    """The FastAPI app: JSON routes first, then the Gradio page mounted at `/`."""
    import gradio as gr
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from starlette.concurrency import run_in_threadpool

    from infer.serve_page import build_page

    app = FastAPI(title="pdlm-serve", docs_url=None, redoc_url=None)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.get("/v1/model")
    def model():
        return service.model_info()

    @app.post("/v1/regions/caption")
    async def caption(request: Request):
        declared = request.headers.get("content-length")
        too_large = (f"the request body is over the server's limit of {max_body_bytes} bytes (--max-body-bytes); "
                     "send a smaller image")
        if declared and declared.isdigit() and int(declared) > max_body_bytes:
            return error(413, too_large)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body_bytes:
                return error(413, too_large)
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

    @app.middleware("http")
    async def local_assets_only(request: Request, call_next):
        """Gradio's page links one script from a CDN (iframe-resizer, for embedding): drop it, so that the page
        loads nothing from outside this server."""
        response = await call_next(request)
        if not response.headers.get("content-type", "").startswith("text/html"):
            return response
        body = EXTERNAL_SCRIPT.sub(b"", b"".join([chunk async for chunk in response.body_iterator]))
        headers = {k: v for k, v in response.headers.items() if k.lower() != "content-length"}
        return Response(body, status_code=response.status_code, headers=headers)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        log.exception("internal error on %s", request.url.path)
        return error(500, f"internal error ({type(exc).__name__}); see the server log")

    return gr.mount_gradio_app(app, build_page(service), path="/", allowed_paths=[str(DEMO_SCENE)], show_api=False,
                               ssr_mode=False)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pdlm-serve", description="Serve PerceptionDLM region captioning: a web demo "
                                "at / and a JSON API at /v1/regions/caption, batching concurrent requests.")
    p.add_argument("--checkpoint", default=str(DEMO_MODEL),
                   help="converted checkpoint directory; default: the embedded demo model")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--max-batch", type=int, default=8, help="most requests run together in one call")
    p.add_argument("--batch-wait-ms", type=float, default=10.0,
                   help="how long to wait for the next request before running the ones queued")
    p.add_argument("--max-body-bytes", type=int, default=32 << 20, help="larger request bodies get HTTP 413")
    p.add_argument("--max-image-pixels", type=int, default=40_000_000, help="larger images get HTTP 413")
    p.add_argument("--mesh", metavar="SPEC", help="shard over devices, e.g. data:2,tensor:4 (see pdlm-infer)")
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"))
    p.add_argument("--attention", default="auto", choices=("auto", "xla", "cudnn"))
    p.add_argument("--compilation-cache", metavar="DIR", help="persistent JAX compilation cache directory")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s", stream=sys.stderr)
    for name in ("pdlm-serve", "pdlm_jax"):
        logging.getLogger(name).setLevel(logging.INFO)
    try:
        import uvicorn

        import pdlm_jax

        if args.batch_wait_ms < 0:
            raise PDLMError(f"--batch-wait-ms must be >= 0, got {args.batch_wait_ms}")
        start = time.perf_counter()
        handle = pdlm_jax.load(args.checkpoint, dtype=args.dtype, compilation_cache=args.compilation_cache,
                               mesh=args.mesh, attention=args.attention)
        service = Service(handle, args.checkpoint, args.max_batch, args.batch_wait_ms, args.max_image_pixels)
        app = build_app(service, args.max_body_bytes)
        log.info("loaded %s in %.1f s; serving on http://%s:%d", args.checkpoint, time.perf_counter() - start,
                 args.host, args.port)
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
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
