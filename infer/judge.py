"""ParaDLC-Bench judge (SPEC §13.3): score region captions with multiple-choice questions asked to an LLM judge.

    python -m infer.judge --results results.jsonl --qa qa.json --class-names class_names.json \\
        --annotations annotations.json --image-root DIR --output judge.jsonl

For each region id of qa.json the judge sees a focal crop of the image and of the mask, the caption, and one
question per request: first a recognition question built from the class name, then the benchmark's questions.
The chosen option's score is kept; if the judge says the caption does not describe the right kind of object,
every score of that region is clipped to <= 0. Benchmark Avg = (mean positive score + mean negative score) / 2.

The judge is any OpenAI-compatible chat endpoint: PDLM_JUDGE_URL is its base URL (requests go to
`{PDLM_JUDGE_URL}/chat/completions`, e.g. https://api.openai.com/v1) and PDLM_JUDGE_KEY its API key. Nothing is
sent anywhere unless PDLM_JUDGE_URL is set. Results are appended per region (resumable like the dataset runner:
done ids are skipped, error lines retried); a summary JSON is written at the end.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from infer.dataset import ResultsFile, load_annotations, load_image
from pdlm_jax.files import atomic_write
from pdlm_jax.annotation_files import region_mask
from pdlm_jax.errors import PDLMError

# The reference's judge prompt, verbatim: scores are only comparable with the same wording.
JUDGE_PROMPT = """Answer the multiple-choice question based on the text description of an object in this image. You need to follow these rules:
1. Do not output any reasoning. Do not perform correction. Please output exactly one answer from the choices for each question. Do not repeat the question.
2. There is no need for exact matching. Please choose the closest option based on the description.

The description is:
{caption}

From the description above, please answer the following question with one of the choices:
{question}
"""
LETTERS = "abcde"
MIN_CROP = 56  # the focal box is at least 56 x 56 pixels before the 3x context crop


def recognition_question(class_name: str) -> dict:
    return {"question": f"The object in the image is {class_name}. Based on the image, is it likely that the "
                        f"object in the description is given class: {class_name} or object of a similar type?",
            "choices": [["Yes", "correct"], ["No", "incorrect"]], "type": "recognition"}


def question_prompt(caption: str, question: dict) -> str:
    lines = [question["question"]] + [f"{'ABCDE'[i]}. {c}" for i, (c, _) in enumerate(question["choices"])]
    return JUDGE_PROMPT.format(caption=caption, question="\n".join(lines))


def focal_crop(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The mask's box (at least 56 px a side, same centre) with one box of context on every side, clipped."""
    ys, xs = np.nonzero(mask)
    x0, y0 = xs.min(), ys.min()
    w, h = xs.max() + 1 - x0, ys.max() + 1 - y0
    xc, yc = x0 + w / 2, y0 + h / 2
    w, h = max(w, MIN_CROP), max(h, MIN_CROP)
    x0, y0 = int(xc - w / 2), int(yc - h / 2)
    rows = slice(max(y0 - h, 0), min(y0 + 2 * h, mask.shape[0]))
    cols = slice(max(x0 - w, 0), min(x0 + 2 * w, mask.shape[1]))
    return image[rows, cols], mask[rows, cols]


def parse_choice(answer: str, choices: list[str]) -> int | None:
    """Index of the option a free-text answer picks, with the reference's matching rules, or None."""
    pred = answer.strip().lower()
    options = [c.strip().lower() for c in choices]
    contained = []  # (index, position in the answer, length) of options quoted in the answer
    for i, option in enumerate(options):
        if pred in (option, f"{LETTERS[i]}. {option}", LETTERS[i]):
            return i
        if option in pred:
            contained.append((i, pred.index(option), len(option)))
    if len(contained) == 1:
        return contained[0][0]
    if len(pred) >= 2 and pred[1] == "." and pred[0] in LETTERS[: len(options)]:  # "b. something else"
        return LETTERS.index(pred[0])
    if contained:  # several quoted: the one quoted last, then the longest
        last = max(pos for _, pos, _ in contained)
        return max((c for c in contained if c[1] == last), key=lambda c: c[2])[0]
    inside = [(i, len(option)) for i, option in enumerate(options) if pred in option]
    if inside:  # the answer is part of options: the longest
        return max(inside, key=lambda c: c[1])[0]
    if pred[:1] in tuple(LETTERS[: len(options)]) and (len(pred) == 1 or pred[1] == "\n"):
        return LETTERS.index(pred[0])
    return None


def score_region(caption: str, class_name: str, questions: list[dict], ask, pool: ThreadPoolExecutor) -> dict:
    """Ask every question (recognition first) and score the region; `ask(prompt) -> answer text`."""
    asked = [recognition_question(class_name), *questions]
    answers = list(pool.map(ask, [question_prompt(caption, q) for q in asked]))
    picks = [parse_choice(a, [c for c, _ in q["choices"]]) for a, q in zip(answers, asked)]
    if picks[0] is None:
        raise PDLMError(f"the judge's recognition answer {answers[0]!r} matches neither Yes nor No.")
    recognised = picks[0] == 0
    scores: dict[str, list[float]] = {"positive": [], "negative": []}
    for q, pick in zip(asked[1:], picks[1:]):
        if q.get("type") in scores:
            score = q["choices"][pick][1] if pick is not None else 0
            scores[q["type"]].append(score if recognised else min(0, score))
    pos, neg = scores["positive"], scores["negative"]
    return {"recognised": recognised, "score_pos": sum(pos) / len(pos) if pos else 0.0,
            "score_neg": sum(neg) / len(neg) if neg else None, "answers": answers, "picks": picks}


class ChatJudge:
    """One OpenAI-compatible chat request per question, with the two crops attached as images."""

    def __init__(self, url: str, key: str | None, model: str, retries: int = 4):
        self.url, self.key, self.model, self.retries = url.rstrip("/") + "/chat/completions", key, model, retries

    def asker(self, image_png: str, mask_png: str):
        def ask(prompt: str) -> str:
            content = [  # the reference labels the PNGs as JPEG data URLs; kept for identical requests
                {"type": "text", "text": "The image:\n"},
                {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{image_png}"}},
                {"type": "text", "text": "\nThe mask of the image:\n"},
                {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{mask_png}"}},
                {"type": "text", "text": f"\n{prompt}\n"},
            ]
            body = {"model": self.model, "messages": [{"role": "user", "content": content}], "max_tokens": 300,
                    "temperature": 0.0, "top_p": 1, "frequency_penalty": 0, "presence_penalty": 0}
            return self._post(body)["choices"][0]["message"]["content"]

        return ask

    def _post(self, body: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        request = urllib.request.Request(self.url, json.dumps(body).encode(), headers)
        for attempt in range(self.retries + 1):
            try:
                with urllib.request.urlopen(request, timeout=120) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as e:
                if e.code not in (408, 429) and e.code < 500 or attempt == self.retries:
                    raise PDLMError(f"judge endpoint {self.url}: HTTP {e.code} {e.reason}") from e
            except (urllib.error.URLError, TimeoutError) as e:
                if attempt == self.retries:
                    raise PDLMError(f"judge endpoint {self.url}: {e} (check PDLM_JUDGE_URL)") from e
            time.sleep(2 ** attempt)
        raise AssertionError("unreachable")


def _png_base64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _read_captions(path: Path) -> dict[str, str]:
    """Captions of a dataset-runner JSONL (error lines skipped) or of a reference `{ann_id: caption}` JSON."""
    try:
        text = path.read_text()
        try:
            data = json.loads(text)
        except ValueError:
            data = None  # JSONL with several lines
        if isinstance(data, dict) and "ann_id" not in data:
            return {str(k): str(v) for k, v in data.items()}
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
        return {r["ann_id"]: r["caption"] for r in records if "caption" in r}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PDLMError(f"--results {path}: expected the dataset runner's JSONL or a JSON object "
                        f"{{ann_id: caption}} ({e}).") from e


def _read_json(path: Path, flag: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PDLMError(f"{flag} {path}: cannot read it as JSON ({e}).") from e
    if not isinstance(data, dict):
        raise PDLMError(f"{flag} {path}: expected a JSON object keyed by region id.")
    return data


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pdlm-judge", description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, required=True, help="captions: pdlm-infer --annotations output")
    p.add_argument("--qa", type=Path, required=True, help="ParaDLC-Bench annotations/qa.json")
    p.add_argument("--class-names", type=Path, required=True, help="ParaDLC-Bench annotations/class_names.json")
    p.add_argument("--annotations", type=Path, required=True, help="ParaDLC-Bench annotations/annotations.json")
    p.add_argument("--image-root", type=Path, required=True, help="folder of the benchmark images")
    p.add_argument("--output", type=Path, required=True, help="per-region judgements, JSONL (resumed)")
    p.add_argument("--summary", type=Path, help="summary JSON (default: judge_summary.json next to --output)")
    p.add_argument("--model", default="gpt-5.2-2025-12-11", help="judge model name (the reference's default)")
    p.add_argument("--concurrency", type=int, default=8, help="parallel requests (questions of one region)")
    return p


def run_judge(args: argparse.Namespace) -> int:
    url = os.environ.get("PDLM_JUDGE_URL")
    if not url:
        raise PDLMError("no judge endpoint: set PDLM_JUDGE_URL to an OpenAI-compatible base URL (and "
                        "PDLM_JUDGE_KEY to its API key); the judge never contacts a server by default.")
    judge = ChatJudge(url, os.environ.get("PDLM_JUDGE_KEY"), args.model)
    captions = _read_captions(args.results)
    qa = _read_json(args.qa, "--qa")
    class_names = _read_json(args.class_names, "--class-names")
    regions = {r.ann_id: (e, r) for e in load_annotations(args.annotations, args.image_root) for r in e.regions}
    missing = [a for a in qa if a not in captions or a not in regions or a not in class_names]
    todo = [a for a in qa if a not in missing]
    out = ResultsFile(args.output, retry_ids=set(todo))
    errors, image_cache = [], {}
    try:
        with ThreadPoolExecutor(max(1, args.concurrency)) as pool:
            for ann_id in (a for a in todo if a not in out.done):
                entry, region = regions[ann_id]
                try:
                    if entry.source not in image_cache:
                        image_cache.clear()  # annotations are grouped by image: keep only the current one
                        image_cache[entry.source] = np.asarray(load_image(entry.source))
                    image = image_cache[entry.source]
                    crop, crop_mask = focal_crop(image, region_mask(entry.record, region, image.shape[:2]))
                    ask = judge.asker(_png_base64(crop), _png_base64(crop_mask.astype(np.uint8) * 255))
                    record = {"ann_id": ann_id, "caption": captions[ann_id],
                              **score_region(captions[ann_id], class_names[ann_id], qa[ann_id], ask, pool)}
                except PDLMError as e:
                    record = {"ann_id": ann_id, "error": str(e)}
                    errors.append(record)
                out.append([record])
                out.done[ann_id] = record
                print(f"{ann_id}: {record.get('score_pos', 'error')} / {record.get('score_neg', '')}",
                      file=sys.stderr)
    finally:
        out.close()

    judged = [out.done[a] for a in todo if a in out.done and "error" not in out.done[a]]
    negatives = [r["score_neg"] for r in judged if r["score_neg"] is not None]
    avg_pos = sum(r["score_pos"] for r in judged) / len(judged) if judged else 0.0
    avg_neg = sum(negatives) / len(negatives) if negatives else 0.0
    summary = {"regions": len(qa), "judged": len(judged), "missing": missing, "errors": errors,
               "avg_pos": avg_pos, "avg_neg": avg_neg, "avg": (avg_pos + avg_neg) / 2, "model": args.model}
    summary_path = args.summary or args.output.parent / "judge_summary.json"
    atomic_write(summary_path, (json.dumps(summary, indent=2) + "\n").encode())
    print(f"judged {len(judged)}/{len(qa)} regions ({len(missing)} without a caption, {len(errors)} errors)\n"
          f"Pos {avg_pos:.3f}  Neg {avg_neg:.3f}  Avg {(avg_pos + avg_neg) / 2:.3f}\nsummary: {summary_path}")
    return 1 if missing or errors else 0


def main(argv: list[str] | None = None) -> int:
    try:
        return run_judge(build_parser().parse_args(argv))
    except PDLMError as e:
        print(f"pdlm-judge: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
