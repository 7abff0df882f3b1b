"""OpenAI-compatible routes of `pdlm-serve`: `POST /v1/chat/completions` and `GET /v1/models`.

The last user message carries the input: its text parts are the question, its `image_url` parts are data URLs
(`data:image/png;base64,...`; the server fetches nothing from the network).
- One image → a question about the whole image, answered by the PerceptionDLM-Base model.
- Two or more → region captioning: the first image is the picture, every further one a mask (nonzero =
  inside), in order; the answer holds one caption per line in the masks' order (the text parts, if any,
  replace the region prompt). `pdlm.regions` holds the full records.
`max_tokens` (or `max_completion_tokens`) sets gen_length (per region when captioning); `steps`,
`block_length`, `seed` pass through `extra_body`. `stream: true` sends one server-sent event per denoising
step whose `delta.content` is the WHOLE text at that step (a diffusion model rewrites its text, it does not
append; ▢ marks a position still masked), then a final chunk with `finish_reason` and, with
`stream_options.include_usage`, the usage. The denoising runs as one compiled program, so the step events
are sent when it has finished.
"""

import json
import time
import uuid
from pathlib import Path

from pdlm_jax.errors import PDLMError, TooLarge

EXTRA_FIELDS = ("steps", "block_length", "seed", "gen_length")  # integers, from extra_body
IGNORED = {"model", "n", "user", "stream_options", "frequency_penalty", "presence_penalty", "stop", "logprobs",
           "response_format", "metadata", "store"}


def model_ids(service) -> dict[str, str]:
    """{kind: model id}: the checkpoints' folder names."""
    ids = {}
    if service.captioner is not None:
        ids["region"] = Path(service.checkpoint).name
    if service.answerer is not None:
        ids["base"] = Path(service.base_checkpoint or service.checkpoint).name
    return ids


def parse_request(service, body) -> tuple[str, object, dict]:
    """A chat completion request → ("answer" | "caption", Job, options); PDLMError naming the field."""
    if not isinstance(body, dict):
        raise PDLMError("the request body must be a JSON object with \"messages\"")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise PDLMError("\"messages\" must be a non-empty list of chat messages")
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise PDLMError("\"messages\" has no user message; put the image and the question in one")
    content = users[-1].get("content")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(parts, list):
        raise PDLMError("a user message's \"content\" must be a string or a list of parts")
    texts, images = [], []
    for i, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url" and isinstance(part.get("image_url"), dict) and \
                isinstance(part["image_url"].get("url"), str):
            url = part["image_url"]["url"]
            if not url.startswith("data:"):
                raise PDLMError(f"content[{i}]: only data URLs (data:image/png;base64,...) are accepted; the server "
                                "fetches nothing from the network")
            images.append(url)
        else:
            raise PDLMError(f"content[{i}] must be {{\"type\": \"text\", \"text\": ...}} or {{\"type\": \"image_url\", "
                            "\"image_url\": {\"url\": \"data:image/png;base64,...\"}}")
    if not images:
        raise PDLMError("the user message has no image_url part; send the picture as a data URL")
    stream_options = body.get("stream_options") or {}
    options = {"stream": body.get("stream", False),
               "include_usage": isinstance(stream_options, dict) and bool(stream_options.get("include_usage"))}
    if not isinstance(options["stream"], bool):
        raise PDLMError("\"stream\" must be true or false")
    settings = _settings(body)
    question = "\n".join(t for t in texts if t.strip())
    if len(images) == 1:
        for key in ("temperature", "top_p"):
            if settings.pop(key, None) not in (None, 0, 0.0, 1, 1.0):
                raise PDLMError(f"\"{key}\": PerceptionDLM-Base answering is greedy (the reference's sampler)")
        settings.pop("seed", None)
        image = service.open_image(images[0], "image_url 0")
        return "answer", service.question_job(image, question, settings), options
    if service.captioner is None:
        raise PDLMError(f"{len(images)} images: masks travel as extra image parts for region captioning, but this "
                        "server only has a PerceptionDLM-Base model; send one image and a question")
    settings.pop("block_length", None)
    if options["stream"]:
        settings["history"] = True
    if question:
        settings["question"] = question
    image = service.open_image(images[0], "image_url 0")
    service.check_mask_count(len(images) - 1)
    masks = [service.open_image(url, f"image_url {i + 1} (mask {i})").convert("L") for i, url in
             enumerate(images[1:])]
    return "caption", service.make_job(image, masks, settings), options


def _settings(body: dict) -> dict:
    known = set(EXTRA_FIELDS) | {"messages", "stream", "max_tokens", "max_completion_tokens", "temperature",
                                "top_p"} | IGNORED
    unknown = sorted(set(body) - known)
    if unknown:
        raise PDLMError(f"unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    settings = {}
    for key in ("max_tokens", "max_completion_tokens", *EXTRA_FIELDS):
        value = body.get(key)
        if value is not None:
            if not isinstance(value, int) or isinstance(value, bool):
                raise PDLMError(f"\"{key}\" must be an integer, got {json.dumps(value)[:40]}")
            settings["gen_length" if key in ("max_tokens", "max_completion_tokens") else key] = value
    for key in ("temperature", "top_p"):
        value = body.get(key)
        if value is not None:
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise PDLMError(f"\"{key}\" must be a number, got {json.dumps(value)[:40]}")
            settings[key] = float(value)
    return settings


def step_texts(service, kind: str, result: dict, final: str) -> list[str]:
    """The text after every forward (the last one is the final answer)."""
    from infer.serve_page import partial_caption

    if kind == "answer":
        tokenizer, states = service.answerer.tokenizer, result["step_states"]
        texts = [partial_caption(tokenizer, ids, tokenizer.special.mask) for ids in states]
    else:
        tokenizer = service.captioner.tokenizer
        texts = ["\n".join(partial_caption(tokenizer, ids, tokenizer.special.mask) for ids in step)
                 for step in result["history"]]
    return texts[:-1] + [final]


def completion(service, kind: str, result: dict) -> tuple[str, dict]:
    """(content, usage) of a result: the answer, or the captions one per line in input order."""
    if kind == "answer":
        prompt, generated, content = result["prompt_length"], result["gen_length"], result["answer"]
    else:
        limits, per_pass = service.captioner.limits, service.captioner.cfg.region.prompt_numbers
        k, tiles = len(result["regions"]), result["image"]["tiles"]
        sizes = [min(per_pass, k - c) for c in range(0, k, per_pass)]
        prompt = sum(limits.region_positions(n, 0, result["question"], tiles) for n in sizes)
        generated = k * result["gen_length"]
        content = "\n".join(r["caption"] for r in result["regions"])
    return content, {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


def add_routes(app, service) -> None:
    """Add the OpenAI-compatible routes to the FastAPI `app` (errors in OpenAI's JSON form)."""
    from fastapi import Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool

    from infer.serve import read_body

    def error(status: int, message: str) -> JSONResponse:
        kind = "invalid_request_error" if status < 500 else "server_error"
        return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": None}},
                            status_code=status)

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "pdlm-jax",
                                            "kind": kind} for kind, name in model_ids(service).items()]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            body = json.loads(await read_body(request, service.max_body_bytes))
        except TooLarge as e:
            return error(413, str(e))
        except (ValueError, UnicodeDecodeError):
            return error(400, "the request body is not valid JSON")
        try:
            kind, job, options = await run_in_threadpool(parse_request, service, body)
            result = await run_in_threadpool(service.caption, job)
        except TooLarge as e:
            return error(413, str(e))
        except PDLMError as e:
            return error(400, str(e))
        content, usage = completion(service, kind, result)
        model = model_ids(service)["base" if kind == "answer" else "region"]
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        native = {k: v for k, v in result.items() if k not in ("history", "step_states")}
        if not options["stream"]:
            return {"id": ident, "object": "chat.completion", "created": created, "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                 "finish_reason": "stop"}],
                    "usage": usage, "pdlm": native}

        def chunk(delta: dict, finish: str | None = None, **extra) -> str:
            data = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        def events():
            for step, text in enumerate(step_texts(service, kind, result, content)):
                yield chunk({"role": "assistant", "content": text} if step == 0 else {"content": text}, step=step + 1)
            yield chunk({}, "stop", **({"usage": usage} if options["include_usage"] else {}))
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")
