"""CLIP text–image similarity as OFA's text-to-image task uses it (extensions §10.6): ranking samples, the
CLIP-SCST reward and the `clip_score` metric.

The model is open-clip-torch's CLIP built from an architecture name (default OFA's ViT-B-16) and filled from a
local weights file only; nothing is ever downloaded. Two kinds of file load:

* OpenAI's TorchScript archive (`ViT-B-16.pt`, what OFA ships as `clip/Vit-B-16.pt`). Its weights are read with
  `torch.jit.load` (TorchScript's own restricted deserialiser, no Python pickle) and the model uses QuickGELU, the
  activation OpenAI trained with, whatever `arch` says; OFA's `clip.load(path, jit=False)` does the same.
* an open_clip / OpenAI state dict (`.pt`/`.pth`/`.bin` through `torch.load(weights_only=True)`, or `.safetensors`).
  Here the activation comes from `arch`: OpenAI weights re-saved as a state dict need "ViT-B-16-quickgelu".

Images are preprocessed as OFA does: Resize 224 on the shorter side (bicubic), CenterCrop 224, RGB, ToTensor,
Normalize with CLIP's mean/std; open_clip's eval transform for ViT-B-16 is exactly that (asserted in the tests).
Texts go through CLIP's BPE with [SOT] … [EOT] in a context of 77. OFA's `clip.tokenize(truncate=False)` raises on a
caption over 75 BPE tokens (spec pitfall 10.10.8), which would end an evaluation or a CLIP-SCST run at one long
caption; we truncate to 75 tokens + [EOT] instead (CLIP's own `truncate=True`) and count them in `truncated`.
"""

from __future__ import annotations

import json
import warnings
import zipfile
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from PIL import Image

from ofa_scale.errors import UserError

# A CLIP small enough for tests (random weights): ViT patches of 32 on OFA's 224 px input, one layer per tower.
# The vocabulary stays CLIP's 49,408 so the real BPE tokenizer drives it.
TINY_CFG: dict[str, Any] = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 224, "layers": 1, "width": 32, "head_width": 16, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
# entries of OpenAI's TorchScript state dict that are not model weights (OpenAI's clip.load drops them too)
_JIT_EXTRAS = ("input_resolution", "context_length", "vocab_size")
_BATCH = 64  # images per CLIP forward: bounds memory for OFA's 24 samples × many captions

Arch = Union[str, dict]


class ClipScorer:
    """A CLIP model in eval mode with its preprocessing and tokenizer; all outputs are CPU float32."""

    def __init__(self, model: torch.nn.Module, preprocess: Any, tokenizer: Any, device: torch.device):
        self.model = model.to(device).eval()
        self.preprocess, self.tokenizer, self.device = preprocess, tokenizer, device
        self.context_length = int(tokenizer.context_length)
        self.truncated = 0  # captions cut to context_length − 2 BPE tokens so far

    # ---------------------------------------------------------------- construction
    @classmethod
    def load(cls, weights: Union[str, Path], arch: Arch = "ViT-B-16", device=None) -> "ClipScorer":
        """CLIP `arch` (an open_clip model name, a model-config .json file or dict, or "tiny") with the weights
        of the local file `weights`; UserError when the file is missing, unreadable or of another architecture."""
        path = Path(weights)
        if not path.is_file():
            raise UserError(f"CLIP weights {path} is not a file; pass OpenAI's ViT-B-16.pt (OFA's clip/Vit-B-16.pt) "
                            "or an open_clip state dict (nothing is downloaded)")
        state, openai_jit = _read_weights(path)
        cfg = _model_cfg(arch)
        if openai_jit:
            cfg = {**cfg, "quick_gelu": True}
        model = _build(cfg)
        if openai_jit:  # a TorchScript state dict also lists buffers that are not saved (open_clip's attn_mask)
            state = {k: v for k, v in state.items() if k not in _non_persistent_buffers(model)}
        _load_state(model, state, path, arch)
        return cls(model, _preprocess(model), _tokenizer(cfg), _device(device))

    @classmethod
    def random(cls, arch_or_cfg: Arch = "tiny", seed: int = 0, device=None) -> "ClipScorer":
        """CLIP `arch_or_cfg` with seeded random weights (for tests), the global RNG left untouched."""
        cfg = _model_cfg(arch_or_cfg)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _build(cfg)
        return cls(model, _preprocess(model), _tokenizer(cfg), _device(device))

    # ---------------------------------------------------------------- features
    @torch.no_grad()
    def image_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """L2-normalised image embeddings (N, D)."""
        out = []
        for start in range(0, len(images), _BATCH):
            pixels = torch.stack([self.preprocess(im) for im in images[start:start + _BATCH]]).to(self.device)
            out.append(F.normalize(self.model.encode_image(pixels).float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, self._embed_dim())

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings (M, D) (captions over 75 BPE tokens are truncated, see the module doc)."""
        keep = self.context_length - 2  # [SOT] and [EOT]
        self.truncated += sum(len(self.tokenizer.encode(t)) > keep for t in texts)
        tokens = self.tokenizer(list(texts)).to(self.device)  # open_clip truncates and puts [EOT] last
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1).cpu()

    # ---------------------------------------------------------------- scores
    def cosine(self, images: Sequence[Image.Image], texts: Sequence[str]) -> torch.Tensor:
        """(N,) cosine similarity of image i and text i, in [−1, 1] (OFA's raw CLIP score, before any ×100)."""
        if len(images) != len(texts):
            raise ValueError(f"cosine pairs image i with text i: got {len(images)} images and {len(texts)} texts")
        if not images:
            return torch.zeros(0)
        unique = list(dict.fromkeys(texts))  # CLIP-SCST scores 5 images of one caption: encode it once
        text = self.text_features(unique)
        rows = torch.tensor([unique.index(t) for t in texts])
        return (self.image_features(images) * text[rows]).sum(-1)

    def similarities(self, images: Sequence[Image.Image], text: str) -> torch.Tensor:
        """(N,) cosine similarity of every image with one text."""
        return self.cosine(images, [text] * len(images))

    def rank(self, images: Sequence[Image.Image], text: str) -> list[int]:
        """Indices of `images`, most similar to `text` first (OFA's ranking; ties keep the input order)."""
        return order_by(self.similarities(images, text))

    def _embed_dim(self) -> int:
        return int(self.model.text_projection.shape[-1])


def clip_text(caption: str, max_words: int = 64) -> str:
    """The text CLIP scores a text-to-image caption by: OFA recovers it from the model's source tokens, i.e. the
    caption after pre_caption (lower-cased, punctuation and '/' dropped) and cut to max_source_length = 64 words."""
    from ofa_scale.objectives.text import pre_caption

    return pre_caption(caption, max_words)


def order_by(scores: torch.Tensor) -> list[int]:
    """Indices of `scores`, highest first; equal scores keep their order."""
    return torch.sort(scores, descending=True, stable=True).indices.tolist()


# -------------------------------------------------------------------- helpers
def _device(device) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _model_cfg(arch: Arch) -> dict:
    """The open_clip model config of `arch`: a dict, "tiny", a .json file, or an open_clip model name."""
    import open_clip

    if isinstance(arch, dict):
        cfg = arch
    elif arch == "tiny":
        cfg = TINY_CFG
    elif str(arch).endswith(".json"):
        try:
            cfg = json.loads(Path(arch).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UserError(f"CLIP architecture file {arch} is not a readable JSON model config: {e}") from None
        cfg = cfg.get("model_cfg", cfg)  # open_clip's open_clip_config.json nests it
    else:
        cfg = open_clip.get_model_config(arch)
        if cfg is None:
            raise UserError(f"unknown CLIP architecture {arch!r}; use an open_clip model name such as ViT-B-16 "
                            "(OFA's) or a model-config .json file")
    cfg = json.loads(json.dumps(cfg))  # a private copy: open_clip pops keys from it
    text = cfg.get("text_cfg", {})
    if cfg.get("custom_text") or "hf_model_name" in text or "hf_tokenizer_name" in text or "vision_cfg" not in cfg:
        raise UserError(f"CLIP architecture {arch!r} is not an OpenAI-style CLIP (CLIP BPE text tower); OFA ranks "
                        "with ViT-B-16")
    return cfg


def _build(cfg: dict) -> torch.nn.Module:
    from open_clip.model import CLIP

    cfg = dict(cfg)
    cfg.pop("custom_text", None)
    return CLIP(**cfg)


def _preprocess(model: torch.nn.Module):
    import open_clip

    return open_clip.image_transform(model.visual.image_size, is_train=False)  # defaults = OFA's (module doc)


def _tokenizer(cfg: dict):
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=int(cfg["text_cfg"].get("context_length", 77)))


def _non_persistent_buffers(model: torch.nn.Module) -> set[str]:
    return {f"{name}.{b}" if name else b for name, module in model.named_modules()
            for b in module._non_persistent_buffers_set}


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive is a zip whose top folder holds constants.pkl (a torch.save zip has none)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(name.split("/", 1)[-1] == "constants.pkl" for name in z.namelist())


def _read_weights(path: Path) -> tuple[dict, bool]:
    """(state dict, is OpenAI's TorchScript archive) of a weights file, read without unpickling code."""
    try:
        if _is_torchscript(path):
            with warnings.catch_warnings():  # torch.jit.load is deprecated, but it is how OpenAI's file reads
                warnings.simplefilter("ignore", FutureWarning)
                state = dict(torch.jit.load(str(path), map_location="cpu").state_dict())
            for key in _JIT_EXTRAS:
                state.pop(key, None)
            return state, True
        from open_clip.factory import load_state_dict

        # weights_only: a state dict holds tensors only; anything else in the pickle is refused
        return load_state_dict(str(path), device="cpu", weights_only=True), False
    except Exception as e:  # noqa: BLE001 - unpickling/zip/TorchScript errors alike: the file is the user's to fix
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read CLIP weights {path}: {first}") from None


def _load_state(model: torch.nn.Module, state: dict, path: Path, arch: Arch) -> None:
    """Strict load (OpenAI and open_clip share CLIP's key layout); UserError naming the mismatch."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"CLIP weights {path} is not a state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if "logit_scale" in state and state["logit_scale"].ndim != model.logit_scale.ndim:
        state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        parts = [f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "",
                 f"{len(shapes)} of another shape (e.g. {shapes[0]}: {tuple(state[shapes[0]].shape)} vs "
                 f"{tuple(own[shapes[0]].shape)})" if shapes else ""]
        name = arch if isinstance(arch, str) else "the given config"
        raise UserError(f"CLIP weights {path} do not fit architecture {name}: "
                        + ", ".join(p for p in parts if p) + " tensors; pass the matching --clip-arch")
    # OpenAI's archive stores fp16 weights; scores are computed in fp32
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)


__all__ = ["ClipScorer", "TINY_CFG", "clip_text", "order_by"]
