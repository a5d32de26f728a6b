"""`ofa-demo`: a local web page to try a trained model: caption, grounding, VQA and instruction tabs.

    ofa-demo --model RUN_OR_MODEL [--tokenizer-path DIR] [--host 127.0.0.1] [--port 7860] [--device D]
             [--vqgan DIR [--samples N] [--clip ViT-B-16.pt]]    # adds a text-to-image tab

Open the printed URL in a browser. The page listens on 127.0.0.1 only unless --host says otherwise; requests are
bounded in size (--max-image-mb, --max-pixels, --max-text-chars) and in concurrency (--concurrency running,
--queue-size waiting).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from ofa_scale.cli import run_cli
from ofa_scale.demo.capabilities import capabilities
from ofa_scale.demo.limits import Limits
from ofa_scale.errors import UserError
from ofa_scale.predict.image_gen import add_clip_options

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def build_parser() -> argparse.ArgumentParser:
    defaults = Limits()
    p = argparse.ArgumentParser(prog="ofa-demo", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, metavar="M",
                   help="ofa-train run dir (best checkpoint, EMA weights when stored), a checkpoints/step_* dir, an "
                        "ofa-scale model dir or a released OFA .pt (as for ofa-predict)")
    p.add_argument("--tokenizer-path", default=None, metavar="DIR",
                   help="the BPE directory; needed for a model dir or .pt (a run dir carries its own)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 exposes the page)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--device", default=None, metavar="D",
                   help="torch device (default: cuda when present, else cpu); bf16 on GPUs that support it")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a task-section value in every tab, e.g. --set decoding.beam=1")
    p.add_argument("--answers", default=None, metavar="FILE",
                   help="VQA candidate answers, one per line (the recipe's inference); without it VQA decodes "
                        "open-ended")
    p.add_argument("--no-ema", action="store_true", help="a run's live weights instead of its EMA weights")
    p.add_argument("--vqgan", default=None, metavar="DIR",
                   help="a taming VQGAN (model.yaml + last.ckpt): adds the text-to-image tab (the model must be "
                        "an image_gen model: a 32x32 code grid)")
    p.add_argument("--samples", type=int, default=4, metavar="N",
                   help="text-to-image: images per caption, best first: by CLIP similarity with --clip, else by "
                        "the model's log-probability (default %(default)d; each is 1024 decoding steps)")
    add_clip_options(p, "text-to-image: ")
    p.add_argument("--max-image-mb", type=float, default=defaults.max_image_bytes / 2**20,
                   help="largest upload, MiB (default %(default)g)")
    p.add_argument("--max-pixels", type=int, default=defaults.max_pixels,
                   help="largest image, width x height (default %(default)d)")
    p.add_argument("--max-text-chars", type=int, default=defaults.max_text_chars,
                   help="longest question / instruction (default %(default)d)")
    p.add_argument("--concurrency", type=int, default=defaults.concurrency,
                   help="requests the model runs at once (default %(default)d)")
    p.add_argument("--queue-size", type=int, default=defaults.queue_size,
                   help="requests that may wait; more are refused (default %(default)d)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: run(args), "ofa-demo")


def run(args: argparse.Namespace) -> int:
    limits = Limits(max_image_bytes=int(args.max_image_mb * 2**20), max_pixels=args.max_pixels,
                    max_text_chars=args.max_text_chars, concurrency=args.concurrency,
                    queue_size=args.queue_size).validate()
    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port} is not a TCP port (1-65535)")
    if args.answers and not Path(args.answers).is_file():
        raise UserError(f"--answers {args.answers} does not exist")
    if args.vqgan and not Path(args.vqgan).is_dir():
        raise UserError(f"--vqgan {args.vqgan} is not a directory (it holds model.yaml and last.ckpt)")
    if args.clip and not args.vqgan:
        raise UserError("--clip ranks text-to-image samples; it needs --vqgan DIR (the text-to-image tab)")
    from ofa_scale.demo.engine import DemoModel

    tabs = capabilities(vqgan=bool(args.vqgan))
    engine = DemoModel(args.model, tokenizer_path=args.tokenizer_path, device=args.device,
                       capabilities=tabs, limits=limits, overrides=tuple(args.overrides),
                       answers=args.answers, ema=not args.no_ema, vqgan=args.vqgan, samples=args.samples,
                       clip=args.clip, clip_arch=args.clip_arch)
    from ofa_scale.demo.app import build_app  # gradio: imported only once the model is there (seconds)

    app = build_app(engine, tabs)
    print(f"ofa-demo: {engine.title()}", file=sys.stderr)
    if args.host not in LOOPBACK:
        print(f"ofa-demo: listening on {args.host}: the page is reachable from other machines", file=sys.stderr)
    try:
        # show_error=False: a handler exception never sends its text or traceback to the page (ours return
        # messages instead); ssr_mode=False: no Node server next to Python
        app.launch(server_name=args.host, server_port=args.port, max_file_size=limits.max_image_bytes,
                   show_error=False, ssr_mode=False, share=False, inbrowser=False, mcp_server=False,
                   footer_links=[])
    except OSError:  # gradio's message names its own environment variable and launch() arguments
        raise UserError(f"cannot listen on {args.host}:{args.port}: the port is in use or the address is not "
                        "this machine's; pick another --port or --host") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
