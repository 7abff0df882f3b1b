"""pdlm-serve's server side on 127.0.0.1: warm-up and readiness, declared limits over HTTP, the API key, the
OpenAI-compatible routes driven by the official `openai` client (a Base checkpoint's answer, region
captions, streaming), and the draining shutdown on SIGTERM."""

import base64
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import pytest
from PIL import Image

from helpers import fixture_dir, fixture_oracle

openai = pytest.importorskip("openai", reason="pip install openai (test extra)")

ROOT = Path(__file__).resolve().parent.parent
SCENE = ROOT / "pdlm_jax" / "assets" / "demo_scene"
CAPTIONS = json.loads((SCENE / "captions.json").read_text())
SAMPLER = json.loads((ROOT / "pdlm_jax" / "assets" / "demo_model" / "sampler.json").read_text())
G, S = SAMPLER["gen_length"], SAMPLER["steps"]  # the demo model's caption slots and steps
MASK_FILES = sorted(SCENE.glob("mask_*.png"))
KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def _url(path: Path) -> str:
    return "data:image/png;base64," + _b64(path)


DEMO = {"image": _b64(SCENE / "image.png"), "masks": [_b64(p) for p in MASK_FILES]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, body=None, headers=None) -> tuple[int, dict]:
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=300) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def _start(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, str, Path]:
    """A server process; returns once /healthz says ok (503 "warming" until then), with a generous bound."""
    port, log = _free_port(), tmp_path / "server.log"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "infer.serve", "--port", str(port), *args], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    url, seen = f"http://127.0.0.1:{port}", set()
    deadline = time.monotonic() + 300
    while True:
        assert proc.poll() is None, f"server exited: {log.read_text()}"
        assert time.monotonic() < deadline, f"server did not come up: {log.read_text()}"
        try:
            status, body = _request(url + "/healthz")
            seen.add((status, body["status"]))
            if status == 200:
                break
        except OSError:
            pass
        time.sleep(0.2)
    assert seen <= {(503, "warming"), (200, "ok")}, seen
    return proc, url, log


@pytest.fixture(scope="module")
def server(tmp_path_factory, converted):
    """The demo model with the tiny Base checkpoint beside it, an API key, a warm-up of 1..2 masks."""
    tmp = tmp_path_factory.mktemp("serve_api")
    proc, url, log = _start(tmp, "--base-checkpoint", str(converted("base_tiny")), "--api-key", KEY,
                            "--warmup-masks", "2", "--max-batch", "2", "--max-masks", "8",
                            "--max-image-pixels", "1000000")
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(60)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=300)


def test_warmed_buckets_compile_nothing_on_the_request_path(server):
    for k in (1, 2):
        status, result = _request(server + "/v1/regions/caption", DEMO | {"masks": DEMO["masks"][:k]}, AUTH)
        assert status == 200, result
        assert result["compile_seconds"] == 0 and len(result["regions"]) == k
    status, info = _request(server + "/v1/model", headers=AUTH)
    assert info["ready"] and info["limits"]["max_positions"] == 4096 and info["limits"]["max_masks"] == 8
    assert info["base"]["limits"]["max_positions"] == 4096


def _bomb() -> str:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return base64.b64encode(png).decode()


def test_over_limit_requests_get_one_line_before_any_compile(server, tmp_path):
    compiled = _request(server + "/v1/model", headers=AUTH)[1]["compiled_programs"]
    cases = [
        (DEMO | {"gen_length": 100_000, "steps": 3}, 400, "positions, over the model's 4096"),
        (DEMO | {"masks": DEMO["masks"] * 2}, 400, "10 masks, over the server's limit of 8"),
        (DEMO | {"image": _bomb()}, 413, "decompression-bomb limit"),
        (DEMO | {"masks": [_bomb()]}, 413, "decompression-bomb limit"),
    ]
    for body, status, message in cases:
        got, answer = _request(server + "/v1/regions/caption", body, AUTH)
        assert got == status and message in answer["error"] and "\n" not in answer["error"], answer
    assert _request(server + "/v1/model", headers=AUTH)[1]["compiled_programs"] == compiled

    small = tmp_path / "small.png"
    Image.open(MASK_FILES[0]).resize((50, 50), Image.Resampling.NEAREST).save(small)
    status, result = _request(server + "/v1/regions/caption", DEMO | {"masks": [_b64(small)]}, AUTH)
    assert status == 200 and len(result["warnings"]) == 1 and "resized" in result["warnings"][0]


def test_api_key_is_required_on_v1_and_page_routes(server):
    assert _request(server + "/v1/model")[0] == 401
    assert _request(server + "/v1/regions/caption", DEMO, {"Authorization": "Bearer wrong"})[0] == 401
    assert _request(server + "/healthz")[0] == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0).models.list()
    # The page's routes need the key too (the page asks for it once and sends it); the page itself loads.
    select = json.dumps({"image": DEMO["image"], "x": 1, "y": 1}).encode()
    assert _request(server + "/page/select", select)[0] == 401
    assert _request(server + "/page/select", select, {"Authorization": f"Bearer {KEY}"})[0] == 200
    with urllib.request.urlopen(server + "/", timeout=300) as page:
        assert page.status == 200 and b"<canvas" in page.read()


def test_openai_client_answers_with_the_base_checkpoint(client):
    oracle = fixture_oracle("base_tiny")
    assert {m.kind for m in client.models.list().data} == {"region", "base"}
    content = [{"type": "image_url", "image_url": {"url": _url(fixture_dir("base_tiny") / "image.png")}},
               {"type": "text", "text": oracle["question"]}]
    settings = dict(model="base", messages=[{"role": "user", "content": content}], max_tokens=16,
                    extra_body={"steps": 8, "block_length": 8})
    reply = client.chat.completions.create(**settings)
    assert reply.choices[0].message.content == oracle["demo_response"]
    assert reply.usage.prompt_tokens == oracle["prompt_length"] and reply.usage.completion_tokens == 16
    assert reply.model == Path(reply.model).name and reply.pdlm["forwards"] == 8

    chunks = list(client.chat.completions.create(**settings, stream=True))
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content is not None]
    assert len(texts) == 8 and texts[-1] == oracle["demo_response"]  # one event per forward, the last is final
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_openai_client_captions_regions(client):
    parts = [{"type": "image_url", "image_url": {"url": _url(p)}} for p in [SCENE / "image.png", *MASK_FILES]]
    reply = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": parts}])
    assert reply.choices[0].message.content.split("\n") == CAPTIONS
    assert reply.usage.completion_tokens == 5 * G

    stream = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": parts}],
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content is not None]
    assert len(texts) == S and "▢" in texts[0] and texts[-1].split("\n") == CAPTIONS  # one text a step
    assert chunks[-1].usage.completion_tokens == 5 * G

    with pytest.raises(openai.BadRequestError, match="only data URLs"):
        client.chat.completions.create(model="demo", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]}])


def test_sigterm_finishes_in_flight_requests_refuses_new_ones_and_exits_0(tmp_path):
    proc, url, log = _start(tmp_path, "--no-warmup", "--compilation-cache", "none")
    try:
        outcome = {}
        first = threading.Thread(target=lambda: outcome.update(first=_request(url + "/v1/regions/caption", DEMO)))
        first.start()
        deadline = time.monotonic() + 120
        while "compiling the captioning program" not in log.read_text():  # the request is being served
            assert time.monotonic() < deadline and first.is_alive(), log.read_text()
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        status, refused = _request(url + "/v1/regions/caption", DEMO)
        assert status == 503 and "shutting down" in refused["error"]
        first.join(120)
        status, result = outcome["first"]
        assert status == 200 and [r["caption"] for r in result["regions"]] == CAPTIONS
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def test_a_base_checkpoint_alone_answers_questions_and_refuses_masks(converted):
    import argparse

    import pdlm_jax
    from infer.openai_api import parse_request
    from infer.serve import Service, build_parser, load_handles
    from pdlm_jax.errors import PDLMError

    base_dir = converted("base_tiny")
    service = Service(None, str(base_dir), answerer=pdlm_jax.load(base_dir))
    with pytest.raises(PDLMError, match="no region-captioning model"):
        service.parse(DEMO)
    image = {"type": "image_url", "image_url": {"url": _url(fixture_dir("base_tiny") / "image.png")}}
    with pytest.raises(PDLMError, match="only has a PerceptionDLM-Base model"):
        parse_request(service, {"messages": [{"role": "user", "content": [image, image]}]})
    kind, job, _ = parse_request(service, {"max_tokens": 16, "messages": [{"role": "user", "content": [
        image, {"type": "text", "text": "What?"}]}]})
    assert kind == "answer" and job.question == "What?"
    assert (job.settings.gen_length, job.settings.block_length) == (16, 16)
    args = build_parser().parse_args(["--checkpoint", str(base_dir), "--base-checkpoint", str(base_dir)])
    with pytest.raises(PDLMError, match="already a PerceptionDLM-Base checkpoint"):
        load_handles(args)
    args = argparse.Namespace(**vars(args) | {"checkpoint": str(ROOT / "pdlm_jax/assets/demo_model"),
                                              "base_checkpoint": str(ROOT / "pdlm_jax/assets/demo_model")})
    with pytest.raises(PDLMError, match="is a region-captioning checkpoint"):
        load_handles(args)
