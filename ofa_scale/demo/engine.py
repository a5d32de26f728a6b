"""The model behind `ofa-demo`: loaded once, one `ofa-predict` Predictor per tab, one request at a time.

Inference is `ofa-predict`'s own (`predict_batch` on a batch of one), so the page answers exactly as
`ofa-predict --task T` would for the same image and text, with the same prompts and decoding presets.
"""

from __future__ import annotations

import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from PIL import Image

from ofa_scale.demo.capabilities import Capability
from ofa_scale.demo.limits import Limits, check_text, read_image
from ofa_scale.errors import UserError
from ofa_scale.predict.cli import load_model, pick_device, predict_batch, run_task_section
from ofa_scale.predict.inputs import PredictInput
from ofa_scale.predict.image_gen import ImageGenerator
from ofa_scale.predict.tasks import IMAGE_GEN, Predictor, get_spec, task_section


@dataclass
class Answer:
    text: str                            # the caption / answer / response, or the box's coordinates
    image: Optional[Image.Image] = None  # grounding: the image with the box drawn
    images: tuple[Image.Image, ...] = ()  # text-to-image: the samples, best first


class DemoModel:
    def __init__(self, model: str, *, tokenizer_path: Optional[str] = None, device: Optional[str] = None,
                 capabilities: tuple[Capability, ...], limits: Limits, overrides: tuple[str, ...] = (),
                 answers: Optional[str] = None, ema: bool = True, vqgan: Optional[str] = None,
                 samples: int = 4, seed: int = 42, clip: Optional[str] = None, clip_arch: str = "ViT-B-16"):
        self.device, self.dtype = pick_device(device)
        loaded = load_model(model, tokenizer_path, ema=ema)
        self.description = loaded.description
        self.limits = limits
        run_task = run_task_section(loaded.description)
        # every tab's predictor is built now, so a bad recipe or --set value stops the start, not a request
        self.predictors: dict[str, Predictor] = {}
        for cap in capabilities:
            if cap.task == IMAGE_GEN:  # text → images: ofa-predict's ImageGenerator, built below
                continue
            spec = get_spec(cap.task)
            section = task_section(spec, run_task=run_task, recipe=None, overrides=list(overrides), batch_size=1,
                                   answers=answers if spec.name == "vqa" else None, tokenizer=loaded.tokenizer)
            self.predictors[cap.key] = Predictor(spec, section, loaded.tokenizer)
        self.model = loaded.model.to(device=self.device, dtype=self.dtype).eval()
        self.image_gen: Optional[ImageGenerator] = None
        if any(cap.task == IMAGE_GEN for cap in capabilities):
            if not vqgan:
                raise UserError("the text-to-image tab needs --vqgan DIR")
            from ofa_scale.predict.image_gen import load_clip
            from ofa_scale.vqgan import load_vqgan
            # --clip: the samples are ranked by CLIP similarity as `ofa-predict --clip` ranks them
            self.image_gen = ImageGenerator(self.model, loaded.tokenizer, load_vqgan(vqgan, device=self.device),
                                            samples=samples, device=self.device,
                                            clip=load_clip(clip, clip_arch, self.device))
        elif clip:
            raise UserError("--clip ranks text-to-image samples; it needs --vqgan DIR (the text-to-image tab)")
        self.seed = seed  # every request for a caption draws the same images, as `ofa-predict --seed` does
        self.n_params = sum(p.numel() for p in self.model.parameters())
        # gradio's queue already runs one request at a time by default; the lock keeps the model single-user
        # when the app is built with a higher --concurrency or driven without the queue
        self._lock = threading.Lock()

    def title(self) -> str:
        """The model's name and size, as the page's header shows them."""
        d, cfg = self.description, self.model.config
        name = Path(d.get("run") or d.get("checkpoint", "model")).name
        if d.get("kind") == "run":
            name += f" ({d.get('tag')}, {d.get('weights', 'model')} weights)"
        return (f"{name} · {cfg.arch} · {_count(self.n_params)} parameters (d_model {cfg.d_model}, "
                f"{cfg.encoder_layers}+{cfg.decoder_layers} layers) · {self.device.type} "
                f"{str(self.dtype).removeprefix('torch.')}")

    def answer(self, cap: Capability, image_path: Optional[str], text: Optional[str]) -> Answer:
        """The model's answer to one request; a UserError with a one-sentence message for a bad request."""
        if cap.task == IMAGE_GEN:
            return self._images(cap, text)
        data = read_image(image_path, self.limits)
        text = check_text(text, self.limits, what=cap.text_what, required=cap.text_label is not None)
        item = PredictInput(id="upload", image=data, text=text)
        with self._lock, tempfile.TemporaryDirectory(prefix="ofa-demo-") as tmp:
            draw_dir = Path(tmp) if cap.output == "box" else None
            line = predict_batch(self.predictors[cap.key], self.model, [item], device=self.device,
                                 dtype=self.dtype, draw_dir=draw_dir)[0]
            if "error" in line:
                raise UserError(line["error"])
            value: Any = line[self.predictors[cap.key].spec.field]
            if cap.output == "box":
                with Image.open(line["drawn"]) as drawn:
                    return Answer(text="box [x0, y0, x1, y1] in pixels: " + ", ".join(f"{c:g}" for c in value),
                                  image=drawn.copy())
        return Answer(text=str(value))

    def _images(self, cap: Capability, text: Optional[str]) -> Answer:
        text = check_text(text, self.limits, what=cap.text_what, required=True)
        with self._lock:
            samples, images = self.image_gen.generate(text, self.seed)
        if self.image_gen.clip is not None:
            scores = "CLIP similarity (best first): " + ", ".join(f"{s.clip:.3f}" for s in samples)
        else:
            scores = "log-probabilities (best first): " + ", ".join(f"{s.logprob:.1f}" for s in samples)
        return Answer(text=scores, images=tuple(images))


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)
