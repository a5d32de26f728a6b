"""`ofa-demo` in a real browser (issue 12 §2): the console script serves a tiny random-weight model; headless
Chromium (Debian's, driven by Selenium) uploads an image, reads the caption, gets a message for a question left
empty, then an answer, runs grounding and checks the drawn box image, and takes a screenshot. The server's upload
bound is checked on the same server over HTTP. Skipped, with the reason, only where chromium is not installed.
"""

import io
import urllib.error
import urllib.request
import uuid

import pytest
from PIL import Image

from tests.demo.browser import SMALL_GEOMETRY, DemoPage, chromium, demo_server, missing_browser

MAX_IMAGE_MB = 0.05  # 52 KB: the sample PNGs are ~1 KB, the refused upload just over the bound
CANDIDATES = ("blue", "red", "a cat")


@pytest.fixture
def browser_ready():
    reason = missing_browser()
    if reason:
        print(f"test_demo_browser skipped: {reason}")
        pytest.skip(reason)


def _upload(url: str, payload: bytes) -> int:
    """POST one file to gradio's upload route; the HTTP status."""
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + payload + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(url + "gradio_api/upload", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


# a server, a browser and four model answers: ~25 s of CPU; 35 s to over 2 minutes on the loaded 2-core machine
@pytest.mark.slow
def test_caption_vqa_and_grounding_in_chromium(browser_ready, demo_model_dir, bpe_dir, tmp_path):
    photo = tmp_path / "sample.png"
    Image.new("RGB", (160, 96), (30, 60, 200)).save(photo)  # blue: the drawn box is the only red
    answers = tmp_path / "answers.txt"
    answers.write_text("".join(f"{a}\n" for a in CANDIDATES))
    args = ["--model", str(demo_model_dir), "--tokenizer-path", str(bpe_dir), "--device", "cpu",
            "--max-image-mb", str(MAX_IMAGE_MB), "--answers", str(answers), *SMALL_GEOMETRY]
    with demo_server(args, tmp_path / "server.log") as url, chromium() as driver:
        page = DemoPage(driver, url)
        assert "ofa_tiny" in page.header and "parameters" in page.header

        page.upload("caption", photo)
        caption, message = page.run("caption")
        assert caption and not message

        page.open_tab("vqa")
        page.upload("vqa", photo)
        answer, message = page.run("vqa")
        assert (answer, message) == ("", "Could not answer: type a question first")
        page.type_text("vqa", "what colour is the picture?")
        answer, message = page.run("vqa")
        assert answer in CANDIDATES and not message  # --answers: the best-scoring candidate

        page.open_tab("grounding")
        page.upload("grounding", photo)
        page.type_text("grounding", "the blue background")
        box_text, message = page.run("grounding")
        assert box_text.startswith("box [x0, y0, x1, y1] in pixels: ") and not message
        x0, y0, x1, y1 = (float(c) for c in box_text.split(": ")[1].split(", "))
        assert 0 <= min(x0, x1) <= max(x0, x1) <= 160 and 0 <= min(y0, y1) <= max(y0, y1) <= 96
        with urllib.request.urlopen(page.box_image_url("grounding"), timeout=30) as r:
            drawn = Image.open(io.BytesIO(r.read())).convert("RGB")
        assert drawn.size == (160, 96)  # drawn on the original image, box in its pixels
        assert (255, 0, 0) in {c for _, c in drawn.getcolors(1 << 16)}

        shot = tmp_path / "ofa-demo.png"
        assert driver.save_screenshot(str(shot))
        with Image.open(shot) as im:
            assert im.width > 0 and im.height > 0

        # the server refuses an upload over --max-image-mb before the model sees it
        assert _upload(url, b"\0" * int(MAX_IMAGE_MB * 2**20 + 1024)) == 413
        assert _upload(url, photo.read_bytes()) == 200
