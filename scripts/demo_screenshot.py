"""The README's picture of `ofa-demo`: a real headless-Chromium session on a small model, one tab run on a photo,
saved as a PNG.

    .venv/bin/python scripts/demo_screenshot.py            # random-weight tiny model -> docs/images/ofa-demo.png
    .venv/bin/python scripts/demo_screenshot.py --model runs/demo --tab caption --out /tmp/caption.png

Needs Debian's chromium and chromium-driver (scripts/install_system_packages.sh) and selenium (requirements/dev.txt).
The photo is scikit-image's bundled cat (Chelsea), so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.demo.browser: the browser test's own driver code

from ofa_scale.demo.capabilities import CAPABILITIES  # noqa: E402
from tests.demo.browser import (SMALL_GEOMETRY, DemoPage, chromium, demo_server,  # noqa: E402
                                make_tiny_model_dir, missing_browser)

TABS = {c.key: c for c in CAPABILITIES}
TEXTS = {"grounding": "the cat", "vqa": "what animal is this?"}  # about the photo; other tabs: their placeholder


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="run dir / model dir (default: a random-weight tiny model)")
    p.add_argument("--tokenizer-path", default=str(REPO.parent / "shared" / "ofa-bpe"))
    p.add_argument("--tab", default="grounding", choices=list(TABS))
    p.add_argument("--out", default=str(REPO / "docs" / "images" / "ofa-demo.png"))
    p.add_argument("--size", default="1280x820", help="browser window, WIDTHxHEIGHT")
    args = p.parse_args()
    reason = missing_browser()
    if reason:
        print(f"demo_screenshot: {reason}", file=sys.stderr)
        return 1
    from PIL import Image
    from skimage import data

    width, height = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory(prefix="ofa-demo-shot-") as tmp:
        tmp = Path(tmp)
        photo = tmp / "chelsea.png"
        Image.fromarray(data.chelsea()).save(photo)
        if args.model:
            model_args = ["--model", args.model]
        else:
            model = make_tiny_model_dir(Path(args.tokenizer_path), tmp / "ofa_tiny-random-weights")
            model_args = ["--model", str(model), *SMALL_GEOMETRY]
        server_args = [*model_args, "--tokenizer-path", args.tokenizer_path, "--device", "cpu"]
        with demo_server(server_args, tmp / "server.log") as url, chromium(width, height) as driver:
            page = DemoPage(driver, url)
            page.open_tab(args.tab)
            page.upload(args.tab, photo)
            if TABS[args.tab].text_label is not None:
                page.type_text(args.tab, TEXTS.get(args.tab, TABS[args.tab].placeholder))
            answer, message = page.run(args.tab)
            if args.tab == "grounding":
                page.box_image_url(args.tab)  # wait for the drawn box to be on the page
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(out))
    print(f"demo_screenshot: {args.tab}: {answer or message!r}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
