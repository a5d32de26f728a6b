"""The gradio page of `ofa-demo`: a header with the model's name and size, then one tab per `Capability`.

Every tab has an image upload, a text box when its task takes text, a Run button, the answer (plus the image with
the box drawn for grounding), and a message line. A bad request (no image, an oversized or unreadable file, an
empty or too long text) fills the message line with one sentence; an unexpected failure also gets one line there,
its traceback only in the server's log. Element ids are stable ("<key>-image", "<key>-text", "<key>-run",
"<key>-output", "<key>-box", "<key>-message") for the browser test and for anyone scripting the page.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Any, Callable, Optional

from ofa_scale.demo.capabilities import Capability
from ofa_scale.demo.engine import DemoModel
from ofa_scale.errors import UserError

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a demo that runs offline
import gradio as gr  # noqa: E402 - after the environment it reads at import


def build_app(engine: DemoModel, capabilities: tuple[Capability, ...]) -> gr.Blocks:
    limits = engine.limits
    # delete_cache: uploads and drawn images older than an hour are removed every 10 minutes (and at exit), so a
    # long-running page does not fill the disk
    with gr.Blocks(title="OFA demo", analytics_enabled=False, delete_cache=(600, 3600)) as app:
        gr.Markdown(f"# OFA demo\n**Model:** {engine.title()}", elem_id="model-info")
        with gr.Tabs():
            for cap in capabilities:
                with gr.Tab(cap.label, id=cap.key, elem_id=f"{cap.key}-tab"):
                    with gr.Row():
                        with gr.Column():
                            inputs = [gr.Image(label="Image", type="filepath", sources=["upload"],
                                               elem_id=f"{cap.key}-image")] if cap.takes_image else []
                            if cap.text_label is not None:
                                inputs.append(gr.Textbox(label=cap.text_label, placeholder=cap.placeholder,
                                                         max_length=limits.max_text_chars, lines=1,
                                                         elem_id=f"{cap.key}-text"))
                            button = gr.Button("Run", variant="primary", elem_id=f"{cap.key}-run")
                        with gr.Column():
                            outputs = [gr.Textbox(label=cap.output_label, interactive=False,
                                                  elem_id=f"{cap.key}-output")]
                            if cap.output == "box":
                                outputs.append(gr.Image(label="Box drawn on the image", type="pil",
                                                        interactive=False, format="png",
                                                        buttons=["download", "fullscreen"],  # no "share": offline
                                                        elem_id=f"{cap.key}-box"))
                            elif cap.output == "images":
                                outputs.append(gr.Gallery(label=cap.output_label, type="pil", format="png",
                                                          interactive=False, columns=4,
                                                          elem_id=f"{cap.key}-gallery"))
                            outputs.append(gr.Markdown(elem_id=f"{cap.key}-message"))
                    # preprocess=False: the handler gets the upload as gradio stored it (its path, checked by
                    # gradio to lie in its upload folder) instead of gr.Image opening it with PIL first, i.e.
                    # before our size and pixel bounds and outside our messages
                    button.click(respond(engine, cap), inputs=inputs, outputs=outputs, preprocess=False,
                                 concurrency_limit=limits.concurrency, api_name=cap.key)
    # requests beyond `concurrency` wait in the queue; beyond `queue_size` gradio refuses them ("queue is full")
    app.queue(max_size=limits.queue_size, default_concurrency_limit=limits.concurrency)
    return app


def respond(engine: DemoModel, cap: Capability) -> Callable[..., tuple]:
    """The click handler of `cap`'s tab: (image, text?) -> (answer, [box image], message), or for a text-only tab
    (text) -> (answer, [gallery], message). `image` is gradio's unprocessed upload ({"path": ...}), or a path
    when called directly."""

    def handler(*values: Any) -> tuple:
        image: Optional[dict | str] = values[0] if cap.takes_image and values else None
        rest = values[1:] if cap.takes_image else values
        text: Optional[str] = rest[0] if rest else None
        path = image.get("path") if isinstance(image, dict) else image
        try:
            answer = engine.answer(cap, path, text)
        except UserError as e:
            return _outputs(cap, "", None, f"**Could not answer:** {e}")
        except Exception as e:  # noqa: BLE001 - the page gets one line; the server log the traceback
            traceback.print_exc(file=sys.stderr)
            return _outputs(cap, "", None, f"**Prediction failed:** {type(e).__name__}: {e}")
        # an empty answer (an untrained model may end at once) still says something, so every request visibly
        # changes the page
        shown = list(answer.images) if cap.output == "images" else answer.image
        return _outputs(cap, answer.text, shown, "" if answer.text else "The model's answer is empty.")

    return handler


def _outputs(cap: Capability, text: str, image: Any, message: str) -> tuple:
    return (text, image, message) if cap.output in ("box", "images") else (text, message)
