"""`ofa-eval fid-stats`: write OFA's `gt_stat.npz` (`mu` (2048,), `sigma` (2048, 2048)) for a folder of reference
images, with the user's torchvision Inception weights and the FID protocol of `image_metrics` (299 px, ImageNet
renormalisation, pool3). `ofa-eval run` (`task.fid_reference`) then reads the file instead of re-running Inception
over the whole reference set on every evaluation. Heavy imports (torch, torchvision) happen in run()."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ofa_scale.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, metavar="DIR",
                        help="folder of reference images (.png/.jpg/.jpeg, searched recursively), e.g. the "
                             "evaluation split's ground-truth images")
    parser.add_argument("--inception", required=True, metavar="WEIGHTS",
                        help="torchvision inception_v3 weights file (inception_v3_google-0cc3c7bd.pth); nothing is "
                             "downloaded")
    parser.add_argument("--out", required=True, metavar="FILE.npz", help="statistics file to write (gt_stat.npz)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def run(args: argparse.Namespace) -> int:
    from ofa_scale.evaluation.image_metrics import reference_image_files, save_reference_statistics

    images, out = Path(args.images), Path(args.out)
    if not images.is_dir():
        raise UserError(f"--images {images} is not a folder; pass a folder of reference .png/.jpg images")
    if out.suffix != ".npz":  # np.savez would silently append .npz, and the config would name a missing file
        raise UserError(f"--out {out} must end in .npz (OFA's gt_stat.npz)")
    count = len(reference_image_files(images))  # (also refuses an empty folder before Inception loads)
    print(f"ofa-eval: Inception pool3 statistics of {count} images in {images} ...", flush=True)
    t0 = time.perf_counter()
    tmp = out.with_name(out.stem + ".partial.npz")  # a killed run never leaves a half-written gt_stat.npz
    save_reference_statistics(images, args.inception, tmp, device=args.device)
    tmp.replace(out)
    print(f"ofa-eval: wrote {out} (mu, sigma of {count} images) in {time.perf_counter() - t0:.1f}s")
    return 0
