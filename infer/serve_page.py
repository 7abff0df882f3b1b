"""The web page of `pdlm-serve` (Gradio): presets, image + brush-drawn or uploaded masks, the settings, and a
step slider / Play button that replays the denoising from the sampler's history.

Every region is one layer of the image editor (or one uploaded mask file); captions come back in the
overlay's colour of their region. Runs go through the server's micro-batcher like API requests.
"""

from __future__ import annotations

import html
import time
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image

from pdlm_jax import DEMO_SCENE
from infer.visualize import PALETTE, overlay
from pdlm_jax.errors import PDLMError

MODES = {"exact": ("none", "remask"), "prefix cache": ("prefix", "remask"), "threshold": ("none", "threshold:0.9")}
PLACEHOLDER = "▢"  # a still-masked slot
PLAY_SECONDS_PER_STEP = 0.6
BLANK_SIZE = (384, 384)


def _hex(colour: tuple[int, int, int]) -> str:
    return "#%02x%02x%02x" % colour


def presets() -> list[tuple[str, Image.Image, list[str]]]:
    """(name, image, mask files): the bundled demo scene, and a blank canvas to draw on."""
    image = Image.open(DEMO_SCENE / "image.png").convert("RGB")
    masks = [str(p) for p in sorted(DEMO_SCENE.glob("mask_*.png"))]
    return [("demo scene", image, masks), ("blank canvas", Image.new("RGB", BLANK_SIZE, "white"), [])]


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


def captions_html(captions: list[str]) -> str:
    def row(i: int, caption: str) -> str:
        colour = f'style="color:{_hex(PALETTE[i % len(PALETTE)])}"'
        return (f'<li><b {colour}>{i}</b>: <span class="pdlm-caption" {colour}>{html.escape(caption) or "(empty)"}'
                '</span></li>')

    rows = "".join(row(i, c) for i, c in enumerate(captions))
    return f'<ol class="pdlm-captions" style="list-style:none;padding:0;font-size:1.1em">{rows}</ol>'


def error_html(message: str) -> str:
    return f'<div class="pdlm-error" style="color:#b00020;font-weight:bold">Error: {html.escape(message)}</div>'


def open_mask(path: str) -> Image.Image:
    try:
        return Image.open(path).convert("L")
    except Exception:
        raise PDLMError(f"mask file {Path(path).name} is not an image Pillow can read; upload PNG masks") from None


def page_inputs(image: Image.Image | None, files: list | None, editor: dict | None
                ) -> tuple[Image.Image, list[np.ndarray]]:
    """The image and the region masks: the uploaded mask files, then every non-empty layer drawn in the editor
    (scaled to the image). Without an image, the editor's background (or a white canvas under the drawing)."""
    layers = [layer[..., 3] > 0 for layer in (editor or {}).get("layers") or []]  # RGBA: drawn where opaque
    layers = [alpha for alpha in layers if alpha.any()]
    if image is None:
        background = (editor or {}).get("background")
        if background is not None:
            image = Image.fromarray(background)
        elif layers:
            image = Image.new("RGB", layers[0].shape[::-1], "white")
        else:
            raise PDLMError("no image: upload one, pick a preset, or draw regions on the blank canvas")
    image = image.convert("RGB")
    masks = [open_mask(f) for f in files or []] + [Image.fromarray(a) for a in layers]
    masks = [np.asarray(m.resize(image.size, Image.Resampling.NEAREST)) > 0 for m in masks]
    if not masks:
        raise PDLMError("no mask: draw each region with the brush on its own layer, or upload mask files")
    return image, masks


def build_page(service) -> gr.Blocks:
    """The Blocks page; `service` is `infer.serve.Service` (model, defaults, micro-batcher)."""
    tokenizer, mask_id = service.handle.tokenizer, service.handle.tokenizer.special.mask
    cases = presets()
    # System fonts only: the default theme would fetch web fonts from the internet.
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])

    def load_preset(evt: gr.SelectData):
        _, image, mask_files = cases[evt.index]
        return image, mask_files or None, None

    def run(image, files, editor, question, gen_length, steps, mode):
        try:
            image, masks = page_inputs(image, files, editor)
            cache, unmask = MODES[mode]
            settings = dict(question=question, gen_length=int(gen_length or 0), steps=int(steps or 0), cache=cache,
                            unmask=unmask, history=True)
            result = service.caption(service.make_job(image, masks, settings))
        except PDLMError as e:
            return None, error_html(str(e)), "", gr.update(), []
        captions = [r["caption"] for r in result["regions"]]
        history = [[[mask_id] * int(gen_length)] * len(masks)] + result["history"]
        steps_text = [[partial_caption(tokenizer, ids, mask_id) for ids in step] for step in history]
        timings = (f"**{result['seconds']:.2f} s** (compiling {result['compile_seconds']:.2f} s) · "
                   f"**{result['forwards']}** forwards · **{result['tokens_per_forward']:.2f}** tokens/forward · "
                   f"mode {result['mode']} · batch of {result['batch']}")
        slider = gr.update(minimum=0, maximum=len(history) - 1, value=len(history) - 1, interactive=True)
        return overlay(image, masks, captions), captions_html(captions), timings, slider, steps_text

    def show_step(step, steps_text):
        if not steps_text:
            return gr.update()
        return captions_html(steps_text[min(int(step), len(steps_text) - 1)])

    def play(steps_text):
        for s in range(len(steps_text)):
            yield s, captions_html(steps_text[s])
            time.sleep(PLAY_SECONDS_PER_STEP)

    with gr.Blocks(title="PerceptionDLM region captioning", theme=theme, analytics_enabled=False) as page:
        gr.Markdown("## PerceptionDLM: parallel region captioning\nPick a preset or upload an image; draw each "
                    "region on its own layer with the brush (or upload binary masks), then **Run**. The step "
                    f"slider replays the denoising ({PLACEHOLDER} = a slot still masked).")
        steps_text = gr.State([])
        with gr.Row():
            with gr.Column():
                gallery = gr.Gallery([(image, name) for name, image, _ in cases], label="Presets", columns=4,
                                     height=170, allow_preview=False, elem_id="presets")
                image = gr.Image(label="Image", type="pil", sources=("upload", "clipboard"), height=300,
                                 elem_id="image")
                files = gr.File(label="Mask files (one per region, nonzero = inside)", file_count="multiple",
                                file_types=["image"], elem_id="mask-files")
                # Gradio's editor does not take an image sent from the server, so it is only for drawing: on
                # an image uploaded into it, or on the blank canvas (scaled to the image above, if any).
                editor = gr.ImageEditor(label="Or draw regions: one layer per region", type="numpy", format="png",
                                        sources=("upload", "clipboard"), canvas_size=(384, 384), transforms=(),
                                        brush=gr.Brush(colors=[_hex(c) for c in PALETTE], color_mode="fixed",
                                                       default_size=24),
                                        elem_id="editor")
                question = gr.Textbox(label="Question", value=service.question)
                with gr.Row():
                    gen_length = gr.Number(label="Gen length (slots per region)", value=service.defaults["gen_length"],
                                           precision=0, minimum=1)
                    steps = gr.Number(label="Steps", value=service.defaults["steps"], precision=0, minimum=1)
                    mode = gr.Radio(list(MODES), value="exact", label="Mode")
                run_button = gr.Button("Run", variant="primary", elem_id="run")
            with gr.Column():
                picture = gr.Image(label="Regions and captions", type="pil", interactive=False, elem_id="overlay")
                captions = gr.HTML(elem_id="captions")
                timings = gr.Markdown(elem_id="timings")
                with gr.Row():
                    step = gr.Slider(0, 1, value=0, step=1, label="Denoising step", interactive=False,
                                     elem_id="step")
                    play_button = gr.Button("Play", elem_id="play", scale=0)

        gallery.select(load_preset, None, [image, files, editor])
        run_button.click(run, [image, files, editor, question, gen_length, steps, mode],
                         [picture, captions, timings, step, steps_text])
        step.input(show_step, [step, steps_text], captions)
        play_button.click(play, steps_text, [step, captions])
    return page
