"""Text-to-image evaluation as OFA's `evaluate_image_gen.sh` does it (extensions §10.6.4): CLIP score of the best
image per caption, and IS and FID of those CLIP-top-1 images.

Inception is torchvision's `inception_v3` (not the TF-FID graph), filled from the user's local weights file — e.g.
torchvision's `inception_v3_google-0cc3c7bd.pth` — and never downloaded. The protocol is OFA's scripts':

* every image: `Resize((299, 299))` (bilinear) + `ToTensor` → [0, 1];
* IS (`inception_score.py`): the network's 1000 logits on that input as is (`transform_input=False`, no
  normalisation), softmax, IS = exp(mean KL(p(y|x) ‖ p(y))) over all images (`splits=1`);
* FID (`fid_score.py` + `eval_utils/inceptionV3.py`): pool3 features (2048-d, after the final average pool) of the
  input renormalised to what torchvision's ImageNet weights expect, x·(std/0.5) + (mean − 0.5)/0.5; Fréchet
  distance to the reference's (mu, sigma): OFA's `gt_stat.npz`, or statistics of a folder of reference images.

Features come from the user's torchvision Inception (OFA's network, not torchmetrics' TF-FID port). IS is
torchmetrics' `InceptionScore` on those logits; mu/sigma are OFA's `calculate_activation_statistics` (mean, unbiased
covariance); the Fréchet distance is computed with symmetric eigendecompositions (`frechet_distance` says why) and
tested equal to torchmetrics' and to OFA's scipy formula. One deliberate difference: OFA's FID loader uses
`drop_last=True` with batches of 128, silently ignoring up to 127 images; every image counts here.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple, Sequence, Union

import numpy as np
import torch
from PIL import Image

from ofa_scale.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_SIZE = 299
BATCH = 32  # OFA's inception_score.py batch; results do not depend on it
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

PathLike = Union[str, Path]


class Inception:
    """torchvision's inception_v3 in eval mode, giving OFA's IS logits and FID pool3 features."""

    def __init__(self, net: torch.nn.Module, device: torch.device):
        self.net = net.to(device).eval()
        self.device = device
        self.renorm_scale = torch.tensor([s / 0.5 for s in IMAGENET_STD], device=device).view(1, 3, 1, 1)
        self.renorm_shift = torch.tensor([(m - 0.5) / 0.5 for m in IMAGENET_MEAN], device=device).view(1, 3, 1, 1)

    @classmethod
    def load(cls, weights: PathLike, device=None) -> "Inception":
        """inception_v3 with the weights of the local file `weights` (a torchvision state dict; UserError when
        missing, unreadable or not inception_v3's)."""
        from torchvision.models import inception_v3

        path = Path(weights)
        if not path.is_file():
            raise UserError(f"Inception weights {path} is not a file; pass torchvision's inception_v3 weights "
                            "(inception_v3_google-0cc3c7bd.pth; nothing is downloaded)")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
            raise UserError(f"cannot read Inception weights {path}: {str(e).strip().splitlines()[0]}") from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise UserError(f"Inception weights {path} is not a state dict")
        # torchvision's file carries the auxiliary classifier; a file without it loads too
        aux = any(k.startswith("AuxLogits.") for k in state)
        net = inception_v3(weights=None, aux_logits=aux, transform_input=False, init_weights=False)
        result = net.load_state_dict(state, strict=False)
        shapes = [k for k, v in net.state_dict().items() if k in state and state[k].shape != v.shape]
        if result.missing_keys or result.unexpected_keys or shapes:
            bad = (result.missing_keys or result.unexpected_keys or shapes)[0]
            raise UserError(f"Inception weights {path} are not torchvision's inception_v3 ({len(result.missing_keys)} "
                            f"missing, {len(result.unexpected_keys)} unexpected, {len(shapes)} misshapen tensors, "
                            f"e.g. {bad})")
        return cls(net, torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))

    @torch.no_grad()
    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 1000) logits of [0, 1] images (N, 3, 299, 299), unnormalised as OFA's IS feeds them."""
        return self.net(pixels.to(self.device)).float().cpu()

    @torch.no_grad()
    def pool3(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 2048) final-average-pool features of [0, 1] images, ImageNet-renormalised as OFA's FID feeds them."""
        x = pixels.to(self.device) * self.renorm_scale + self.renorm_shift
        got: list[torch.Tensor] = []
        hook = self.net.avgpool.register_forward_hook(lambda _m, _i, out: got.append(out))
        try:
            self.net(x)  # the classifier after the pool costs one small matmul; reusing forward keeps torchvision's
        finally:         # exact layer order
            hook.remove()
        return got[0].flatten(1).float().cpu()


def inception_pixels(images: Sequence[Image.Image]) -> torch.Tensor:
    """OFA's eval transform: Resize((299, 299)) bilinear + ToTensor → (N, 3, 299, 299) in [0, 1]."""
    from torchvision import transforms

    tf = transforms.Compose([transforms.Resize((INCEPTION_SIZE, INCEPTION_SIZE)), transforms.ToTensor()])
    return torch.stack([tf(im.convert("RGB")) for im in images])


def _features(images: Iterable[Image.Image], inception: Inception, *, logits: bool, pool3: bool):
    """(logits or None, pool3 or None) of `images`, read BATCH at a time (a reference folder may be large)."""
    out_logits, out_pool = [], []
    it = iter(images)
    while batch := list(itertools.islice(it, BATCH)):
        pixels = inception_pixels(batch)
        if logits:
            out_logits.append(inception.logits(pixels))
        if pool3:
            out_pool.append(inception.pool3(pixels))
    return (torch.cat(out_logits) if logits else None), (torch.cat(out_pool) if pool3 else None)


def inception_score(logits: torch.Tensor) -> float:
    """IS of (N, 1000) logits with one split (OFA's `splits=1`): torchmetrics' InceptionScore on the logits."""
    import warnings

    from torchmetrics.image.inception import InceptionScore

    # UserWarnings: "will save all extracted features" (intended: N×1000) and the std of a single split
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):  # compute() shuffles with the global RNG
        warnings.simplefilter("ignore", UserWarning)
        metric = InceptionScore(feature=torch.nn.Identity(), splits=1)
        metric.update(logits.double())
        return float(metric.compute()[0])


def feature_statistics(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of (N, D) features, float64, sigma unbiased: OFA's `calculate_activation_statistics`."""
    if features.shape[0] < 2:
        raise UserError(f"FID needs at least 2 images on each side, got {features.shape[0]}")
    act = features.double().numpy()
    return np.mean(act, axis=0), np.cov(act, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """‖mu1 − mu2‖² + Tr(sigma1 + sigma2 − 2·sqrt(sigma1·sigma2)), in float64.

    Tr sqrt(Σ1Σ2) is computed as Tr sqrt(A Σ2 A) with A = Σ1^½ (the same eigenvalues, both being PSD), i.e. with
    symmetric eigendecompositions: torchmetrics' general `eigvals` of the non-symmetric 2048×2048 product took 234 s
    on this machine's shared CPU, and scipy's `sqrtm` (OFA's) is no faster; the value is the same (the tests check it
    against both). Rounding's tiny negative eigenvalues are clamped to 0 (OFA adds 1e-6 to the diagonals only when
    sqrtm fails)."""
    mu2, sigma2, mu1, sigma1 = _checked(mu1, mu2, sigma2, np.asarray(sigma1))
    w, v = torch.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (v * w.clamp(min=0).sqrt()) @ v.T
    return _frechet(mu1 - mu2, sigma1.trace(), sigma2, _sqrt_trace(root1 @ sigma2 @ root1))


def features_frechet_distance(features: torch.Tensor, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """`frechet_distance` of (N, D) features' (mu, sigma) to (mu2, sigma2), without forming the D×D sigma when
    N ≤ D: with X the centred features, Σ1 = XᵀX/(N−1) and Σ1Σ2 has the non-zero eigenvalues of X Σ2 Xᵀ/(N−1), an
    N×N matrix (a validation run's few hundred captions against 2048-d features)."""
    n, dim = features.shape
    if n < 2:
        raise UserError(f"FID needs at least 2 images on each side, got {n}")
    if n > dim:
        return frechet_distance(*feature_statistics(features), mu2, sigma2)
    x = features.double()
    mu1 = x.mean(0)
    mu2, sigma2 = _checked(mu1, mu2, sigma2)
    x = (x - mu1) / (n - 1) ** 0.5
    return _frechet(mu1 - mu2, (x * x).sum(), sigma2, _sqrt_trace(x @ sigma2 @ x.T))


def _checked(mu1, mu2, sigma2, sigma1=None) -> tuple[torch.Tensor, ...]:
    """(mu2, sigma2[, mu1, sigma1]) as float64 tensors; UserError when the reference does not fit the features."""
    mu1, mu2 = (torch.as_tensor(np.asarray(m, np.float64)) for m in (mu1, mu2))
    sigma2 = torch.as_tensor(np.asarray(sigma2, np.float64))
    dim = mu1.shape[0]
    if mu2.shape != (dim,) or sigma2.shape != (dim, dim) or (sigma1 is not None and sigma1.shape != (dim, dim)):
        raise UserError(f"FID reference statistics have shapes {tuple(mu2.shape)}/{tuple(sigma2.shape)}, the "
                        f"generated images' features are {dim}-d (pool3: 2048)")
    if sigma1 is None:
        return mu2, sigma2
    return mu2, sigma2, mu1, torch.as_tensor(np.asarray(sigma1, np.float64))


def _sqrt_trace(symmetric: torch.Tensor) -> torch.Tensor:
    """Σ sqrt(eigenvalues) of a PSD matrix (symmetrised against rounding; negative rounding noise → 0)."""
    return torch.linalg.eigvalsh((symmetric + symmetric.T) / 2).clamp(min=0).sqrt().sum()


def _frechet(diff: torch.Tensor, trace1: torch.Tensor, sigma2: torch.Tensor, tr_covmean: torch.Tensor) -> float:
    return float(diff @ diff + trace1 + sigma2.trace() - 2 * tr_covmean)


def reference_statistics(reference: Union[PathLike, Sequence[Image.Image]], inception: Inception):
    """(mu, sigma) of the FID reference: a .npz with `mu` and `sigma` (OFA's gt_stat.npz), a folder of images
    (searched recursively, .png/.jpg), or a list of PIL images."""
    if not isinstance(reference, (str, Path)):
        return feature_statistics(_features(reference, inception, logits=False, pool3=True)[1])
    path = Path(reference)
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as f:
                return np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)
        except (OSError, KeyError, ValueError) as e:
            raise UserError(f"FID reference {path} is not an .npz with `mu` and `sigma` ({e})") from None
    if path.is_dir():
        return feature_statistics(_features(_open_images(path), inception, logits=False, pool3=True)[1])
    raise UserError(f"FID reference {path} is neither an .npz of statistics (mu, sigma) nor a folder of images")


def save_reference_statistics(reference: Union[PathLike, Sequence[Image.Image]], inception_weights: PathLike,
                              out: PathLike, *, device=None) -> Path:
    """Write the FID statistics of reference images (a folder or a list) as OFA's gt_stat.npz (`mu`, `sigma`)."""
    mu, sigma = reference_statistics(reference, Inception.load(inception_weights, device))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, mu=mu, sigma=sigma)
    return out


def inception_scores(images: Sequence[Image.Image], inception_weights: Union[PathLike, Inception],
                     reference: Union[PathLike, Sequence[Image.Image], None] = None, *, device=None) -> dict:
    """{"is": IS of `images`} plus "fid" against `reference` when one is given (see `reference_statistics`)."""
    if not images:
        raise UserError("IS/FID need at least one generated image")
    inception = (inception_weights if isinstance(inception_weights, Inception)
                 else Inception.load(inception_weights, device))
    # the reference first: a wrong path fails before the generated images are run
    stats = None if reference is None else reference_statistics(reference, inception)
    logits, pool = _features(images, inception, logits=True, pool3=stats is not None)
    out = {"is": inception_score(logits)}
    if stats is not None:
        out["fid"] = features_frechet_distance(pool, *stats)
    return out


def reference_image_files(folder: PathLike) -> list[Path]:
    """The .png/.jpg images under `folder` (recursively), sorted; UserError when there are none."""
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise UserError(f"FID reference folder {folder} holds no .png/.jpg images")
    return files


def _open_images(folder: Path) -> Iterator[Image.Image]:
    for p in reference_image_files(folder):
        try:
            with Image.open(p) as im:
                yield im.convert("RGB")
        except OSError as e:
            raise UserError(f"FID reference image {p} cannot be read: {e}") from None


# -------------------------------------------------------------------- a text-to-image evaluation run
class GeneratedSet(NamedTuple):
    id: Any                         # the caption's uniq_id
    caption: str                    # as the data holds it; CLIP sees `clip_text(caption)`
    images: Sequence[Image.Image]   # its N samples, any order


@dataclass
class GeneratedEvaluation:
    metrics: dict              # {"clip_score": mean over captions of the best cosine, "fid"?, "is"?}
    results: list[dict]        # [{"id", "images": [png paths, best first]}] (ofa-eval run's results.json)
    image_dir: Path            # every PNG
    contact_sheet: Path        # one row per caption (the first rows), its best images left to right


def evaluate_generated(sets: Sequence[Union[GeneratedSet, tuple]], out_dir: PathLike, clip: Any, *,
                       inception_weights: Union[PathLike, Inception, None] = None,
                       reference: Union[PathLike, Sequence[Image.Image], None] = None,
                       device=None) -> GeneratedEvaluation:
    """Rank each caption's images by CLIP (a `ClipScorer`), write them as PNGs best first under out_dir/images/
    and a contact sheet out_dir/contact_sheet.png, and score: `clip_score` always, `is` when
    `inception_weights` is given, `fid` when a `reference` is given too (IS and FID on the CLIP-top-1 images)."""
    from ofa_scale.evaluation.clip_model import clip_text, order_by
    from ofa_scale.evaluation.contact_sheet import RankedSheet, write_ranked_pngs

    if reference is not None and inception_weights is None:
        raise UserError("FID needs the Inception weights too (inception_weights / --inception)")
    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    sheet = RankedSheet()
    results, best, top1 = [], [], []
    for item in sets:
        item = GeneratedSet(*item)
        if not item.images:
            raise ValueError(f"caption {item.id!r} has no images")
        scores = clip.similarities(item.images, clip_text(item.caption))
        order = order_by(scores)
        ranked = [item.images[i] for i in order]
        results.append({"id": item.id, "images": [str(p) for p in write_ranked_pngs(ranked, image_dir, item.id)]})
        sheet.add(item.caption, ranked, [f"clip {float(scores[i]):.3f}" for i in order])
        best.append(float(scores[order[0]]))
        top1.append(ranked[0])
    if not results:
        raise UserError("nothing to evaluate: no generated captions")
    metrics = {"clip_score": float(np.mean(best))}
    if inception_weights is not None:
        metrics.update(inception_scores(top1, inception_weights, reference, device=device))
    return GeneratedEvaluation(metrics, results, image_dir, sheet.write(out_dir / "contact_sheet.png"))


__all__ = ["Inception", "inception_pixels", "inception_score", "feature_statistics", "frechet_distance",
           "features_frechet_distance",
           "reference_statistics", "reference_image_files", "save_reference_statistics", "inception_scores",
           "GeneratedSet", "GeneratedEvaluation", "evaluate_generated"]
