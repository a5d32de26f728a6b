"""The demo's tabs, as data: one `Capability` per tab, each an `ofa-predict` task (ofa_scale/predict/tasks.py)
with the labels of its inputs and the kind of its output. The page (app.py) is built from `CAPABILITIES` alone,
so a new tab is one entry here, for a task that `ofa-predict` already knows, e.g.

    Capability("ocr", "OCR", task="ocr", text_label=None, output="text", output_label="Text read"),
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional


@dataclass(frozen=True)
class Capability:
    key: str                     # the tab's id: elem_ids in the page are "<key>-image", "<key>-run", ...
    label: str                   # the tab's title
    task: str                    # the ofa-predict task that answers it
    text_label: Optional[str]    # the label of its text box; None: the tab takes an image only
    output: Literal["text", "box", "images"]  # "box": shown drawn on the image; "images": a gallery
    output_label: str
    text_what: str = "text"      # how a message names the text ("question", "expression")
    placeholder: str = ""
    takes_image: bool = True     # False: a text-only tab (text-to-image)


CAPABILITIES: tuple[Capability, ...] = (
    Capability("caption", "Image captioning", task="caption", text_label=None, output="text",
               output_label="Caption"),
    Capability("grounding", "Visual grounding", task="grounding", text_label="Referring expression", output="box",
               output_label="Box", text_what="referring expression", placeholder="the man in the red shirt"),
    Capability("vqa", "Visual question answering", task="vqa", text_label="Question", output="text",
               output_label="Answer", text_what="question", placeholder="what colour is the car?"),
    Capability("instruct", "Instruction", task="instruct", text_label="Instruction", output="text",
               output_label="Response", text_what="instruction", placeholder="what does the image describe?"),
    # OFA-OCR (issue 13 §2): reads the text line in the image; Chinese with an OFA-CN (bert tokenizer) model
    Capability("ocr", "OCR", task="ocr", text_label=None, output="text", output_label="Text read"),
)

# text-to-image (issue 12 §2): a tab only when `ofa-demo --vqgan DIR` names the VQGAN that draws the codes
TEXT_TO_IMAGE = Capability("image_gen", "Text to image", task="image_gen", text_label="Caption", output="images",
                           output_label="Generated images, best first", text_what="caption",
                           placeholder="a red circle on a blue background", takes_image=False)


def capabilities(*, vqgan: bool) -> tuple[Capability, ...]:
    """The page's tabs: every capability, plus text-to-image when a VQGAN is configured."""
    return CAPABILITIES + ((TEXT_TO_IMAGE,) if vqgan else ())
