"""Drive `ofa-demo` in Debian's headless Chromium through Selenium: start the server in its own process group, start
the browser, and read and fill the page by its element ids. Used by tests/demo/test_demo_browser.py and
scripts/demo_screenshot.py. Nothing is downloaded: the browser and driver are /usr/bin/chromium and
/usr/bin/chromedriver (scripts/install_system_packages.sh installs them), Selenium is pinned in requirements/dev.txt.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator, Optional

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# no GPU, no sandbox (root in a container), and nothing that reaches the network on its own
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage")
WAIT_S = 120.0  # one model answer on a loaded 2-core machine: seconds, but the suite may run beside it


def missing_browser() -> Optional[str]:
    """Why the browser cannot run here, or None when it can."""
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not path.exists():
            return (f"{path} is missing: install Debian's {package} package "
                    f"(scripts/install_system_packages.sh, as root)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -r requirements/dev.txt -c requirements/lock.txt)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def demo_command() -> list[str]:
    """The installed `ofa-demo` console script next to this Python, else the module behind it."""
    script = Path(sys.executable).parent / "ofa-demo"
    return [str(script)] if script.exists() else [sys.executable, "-m", "ofa_scale.demo.cli"]


@contextlib.contextmanager
def demo_server(args: list[str], log_path: Path, *, port: Optional[int] = None) -> Iterator[str]:
    """Run `ofa-demo ARGS --port P` until the block ends; yields its URL once the page answers. The server and
    everything it started run in their own process group, which is ended in all cases (SIGTERM, then SIGKILL)."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}/"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([*demo_command(), *args, "--port", str(port)], stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + WAIT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ofa-demo exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"ofa-demo did not answer on {url} in {WAIT_S:.0f}s:\n"
                                   f"{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        _end_group(proc)


def _end_group(proc: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=grace)
            break
        except subprocess.TimeoutExpired:
            continue


@contextlib.contextmanager
def chromium(width: int = 1280, height: int = 900) -> Iterator["object"]:
    """A headless Chromium WebDriver on a fresh profile, quit at the end."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="ofa-demo-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--window-size={width},{height}", f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


class DemoPage:
    """The demo page in a browser, addressed by the element ids ofa_scale/demo/app.py gives it."""

    def __init__(self, driver, url: str):
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver = driver
        driver.get(url)
        self.wait = WebDriverWait(driver, WAIT_S, poll_frequency=0.2)
        self.header = self.wait.until(lambda d: self._text("#model-info"))

    def _find(self, css: str):
        from selenium.webdriver.common.by import By

        found = self.driver.find_elements(By.CSS_SELECTOR, css)
        return found[0] if found else None

    def _present(self, css: str):
        """The first element matching `css`, waiting up to WAIT_S for it: gradio renders a tab's components after
        the header, and on a loaded machine the page can be seconds behind (a CI run found the upload box missing
        right after the header appeared)."""
        return self.wait.until(lambda d: self._find(css))

    def _text(self, css: str) -> str:
        el = self._find(css)
        return el.text.strip() if el is not None else ""

    def open_tab(self, key: str) -> None:
        self._present(f"#{key}-tab-button").click()
        self.wait.until(lambda d: self._find(f"#{key}-run") is not None and self._find(f"#{key}-run").is_displayed())

    def upload(self, key: str, image: Path) -> None:
        """Choose `image` in the tab's upload box and wait until it is on the server (the preview shows)."""
        self._present(f"#{key}-image input[type=file]").send_keys(str(image))
        self.wait.until(lambda d: self._find(f"#{key}-image img") is not None)

    def type_text(self, key: str, text: str) -> None:
        box = self.wait.until(lambda d: self._find(f"#{key}-text textarea") or self._find(f"#{key}-text input"))
        box.clear()
        box.send_keys(text)

    def output(self, key: str) -> str:
        el = self._find(f"#{key}-output textarea") or self._find(f"#{key}-output input")
        return (el.get_attribute("value") or "").strip() if el is not None else ""

    def message(self, key: str) -> str:
        return self._text(f"#{key}-message [data-testid=markdown]")  # not the block: its progress text too

    def busy(self, key: str) -> bool:
        """Whether the tab's answer still shows gradio's progress tracker (the request is queued or running)."""
        tracker = self._find(f"#{key}-output [data-testid=status-tracker]")
        return tracker is not None and "hide" not in (tracker.get_attribute("class") or "").split()

    def run(self, key: str) -> tuple[str, str]:
        """Press Run and wait until the request is done and the answer or the message has changed; returns
        (answer, message). Every request fills one of the two, so a run always changes the state unless it
        repeats the previous one exactly."""
        before = (self.output(key), self.message(key))
        self._present(f"#{key}-run").click()
        self.wait.until(lambda d: not self.busy(key) and (self.output(key), self.message(key)) != before)
        return self.output(key), self.message(key)

    def box_image_url(self, key: str) -> str:
        """The URL of the drawn-box image the grounding tab shows (waits for it)."""
        return self._present(f"#{key}-box img").get_attribute("src")


def make_tiny_model_dir(bpe_dir: Path, out: Path, *, seed: int = 0) -> Path:
    """An ofa_tiny-shaped model dir with random weights and a 32-wide, one-layer transformer: the page, not the
    answers, is what the browser test checks, and this model answers in well under a second on a CPU."""
    import torch

    from ofa_scale.data.tokenizer import load_tokenizer
    from ofa_scale.model import OFAConfig, OFAModel
    from ofa_scale.model.checkpoint import save_pretrained

    torch.manual_seed(seed)
    vocab = len(load_tokenizer("gpt2-bpe", bpe_dir))
    model = OFAModel(OFAConfig.preset("ofa_tiny", vocab_size=vocab, d_model=32, ffn_dim=64, heads=2,
                                      encoder_layers=1, decoder_layers=1))
    return save_pretrained(model.eval(), out)


# the tiny model's geometry, for `ofa-demo --set`: the recipes' 480 px would only slow the test down
SMALL_GEOMETRY = ("--set", "image_size=64", "--set", "box_normaliser=64", "--set", "decoding.beam=2")
