"""ParaDLC judge (infer/judge.py) against a local fake OpenAI-compatible server."""

from __future__ import annotations

import base64
import io
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pycocotools.mask
import pytest
from PIL import Image

from infer.judge import focal_crop, main, parse_choice


@pytest.mark.parametrize("answer, expected", [
    ("B", 1), ("b. red", 1), ("  Red ", 1), ("The answer is C. blue", 2),  # exact, letter, quoted option
    ("red and blue", 2),  # two options quoted: the one quoted last
    ("c. something else", 2), ("blu", 2), ("e", 0),  # letter prefix; inside options: the longest
    ("a\nbecause", 0), ("no idea", None),
])
def test_parse_choice(answer, expected):
    assert parse_choice(answer, ["green", "red", "blue"]) == expected


def test_focal_crop_context_and_minimum_size():
    mask = np.zeros((80, 100), bool)
    mask[20:30, 10:20] = True  # a 10 px box grows to 56 px around its centre (15, 25), then 3x with clipping
    image = np.zeros((80, 100, 3), np.uint8)
    crop, crop_mask = focal_crop(image, mask)
    assert crop.shape == (80, 99, 3) and crop_mask.sum() == 100
    mask = np.zeros((400, 400), bool)
    mask[100:200, 150:250] = True  # 100 px box: rows/cols [0, 300) and [50, 350)
    assert focal_crop(np.zeros((400, 400, 3), np.uint8), mask)[0].shape == (300, 300, 3)


class FakeJudge(BaseHTTPRequestHandler):
    """Answers recognition with Yes unless the class is 'zebra'; other questions with the letter named in
    the question text ('[pick C]')."""
    requests: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeJudge.requests.append((self.headers.get("Authorization"), body))
        prompt = body["messages"][0]["content"][4]["text"]
        if "given class" in prompt:
            answer = "No" if "zebra" in prompt else "Yes"
        else:
            answer = re.search(r"\[pick (\w)\]", prompt).group(1)
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeJudge)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    FakeJudge.requests = []
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()


def test_judge_scores_against_fake_server(tmp_path, server, monkeypatch):
    (tmp_path / "img").mkdir()
    Image.fromarray(np.full((80, 100, 3), 7, np.uint8)).save(tmp_path / "img" / "a.jpg")

    def rle(y, x):
        mask = np.zeros((80, 100), np.uint8)
        mask[y:y + 10, x:x + 10] = 1
        enc = pycocotools.mask.encode(np.asfortranarray(mask))
        return {"size": [80, 100], "counts": enc["counts"].decode()}

    (tmp_path / "ann.json").write_text(json.dumps([{"file_name": "a.jpg", "image_id": "1", "height": 80,
        "width": 100, "annotations": [{"index": i, "category_name": "c", "bbox": [0, 0, 1, 1],
                                       "mask_rle": rle(20, 10 + 40 * i)} for i in range(3)]}]))
    pos = lambda pick: {"question": f"colour? [pick {pick}]", "type": "positive",  # noqa: E731
                        "choices": [["red", 1], ["green", 0], ["blue", -1], ["reddish", 0.5]]}
    neg = lambda pick: {"question": f"has wheels? [pick {pick}]", "type": "negative",  # noqa: E731
                        "choices": [["yes", -1], ["no", 1]]}
    qa = {"1_0": [pos("A"), pos("D"), neg("B")], "1_1": [pos("A"), neg("A")], "1_2": [pos("C")], "1_9": [pos("A")]}
    (tmp_path / "qa.json").write_text(json.dumps(qa))
    (tmp_path / "classes.json").write_text(json.dumps({"1_0": "car", "1_1": "zebra", "1_2": "car", "1_9": "x"}))
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"ann_id": "1_0", "image_id": "1", "caption": "a red car"},
        {"ann_id": "1_1", "image_id": "1", "caption": "a horse"},
        {"ann_id": "1_2", "image_id": "1", "caption": "a blue car"}]))
    argv = ["--results", tmp_path / "results.jsonl", "--qa", tmp_path / "qa.json", "--class-names",
            tmp_path / "classes.json", "--annotations", tmp_path / "ann.json", "--image-root", tmp_path / "img",
            "--output", tmp_path / "judge.jsonl"]
    argv = [str(a) for a in argv]

    assert main(argv) == 2  # offline by default: no endpoint configured
    monkeypatch.setenv("PDLM_JUDGE_URL", server)
    monkeypatch.setenv("PDLM_JUDGE_KEY", "secret")
    assert main(argv) == 1  # 1_9 has no caption
    judged = {r["ann_id"]: r for r in map(json.loads, (tmp_path / "judge.jsonl").read_text().splitlines())}
    assert (judged["1_0"]["score_pos"], judged["1_0"]["score_neg"]) == (0.75, 1)
    assert (judged["1_1"]["recognised"], judged["1_1"]["score_pos"], judged["1_1"]["score_neg"]) == (False, 0, -1)
    assert (judged["1_2"]["score_pos"], judged["1_2"]["score_neg"]) == (-1, None)
    summary = json.loads((tmp_path / "judge_summary.json").read_text())
    assert summary["avg_pos"] == pytest.approx((0.75 + 0 - 1) / 3) and summary["avg_neg"] == 0
    assert summary["avg"] == pytest.approx((0.75 + 0 - 1) / 6) and summary["missing"] == ["1_9"]

    texts = [body["messages"][0]["content"][4]["text"] for _, body in FakeJudge.requests]
    auth, body = FakeJudge.requests[texts.index(next(t for t in texts if "a red car" in t and "[pick D]" in t))]
    assert auth == "Bearer secret" and body["temperature"] == 0 and body["max_tokens"] == 300
    content = body["messages"][0]["content"]
    crop = Image.open(io.BytesIO(base64.b64decode(content[1]["image_url"]["url"].split(",", 1)[1])))
    assert crop.size == (99, 80)  # the focal crop of region 1_0
    assert "The description is:\na red car\n" in content[4]["text"]
    assert "colour? [pick D]\nA. red\nB. green\nC. blue\nD. reddish\n" in content[4]["text"]
    assert len(FakeJudge.requests) == 4 + 3 + 2

    FakeJudge.requests = []
    assert main(argv) == 1 and FakeJudge.requests == []  # resumed: nothing asked again
