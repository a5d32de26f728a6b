#!/usr/bin/env bash
# The Debian packages the tests need beyond the virtualenv, installed only when missing (idempotent; as root).
#   chromium chromium-driver: the real-browser test of `ofa-demo` (tests/demo/test_demo_browser.py) and
#                             scripts/demo_screenshot.py (Selenium drives /usr/bin/chromium; nothing is downloaded)
# Add a package by appending it to PACKAGES below, with a comment saying which test needs it.
set -euo pipefail

PACKAGES=(
  chromium chromium-driver
  # fonts-wqy-microhei: the CJK font `ofa-preprocess sample` renders the OCR text lines with
  # (ofa_scale/data/sample_ocr.py; tests/finetune/test_ocr*.py); the smallest Debian CJK font package
  fonts-wqy-microhei
)

missing=()
for pkg in "${PACKAGES[@]}"; do
  # dpkg-query prints "install ok installed" only for a fully installed package (not a half-removed one)
  if [[ $(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null) != "install ok installed" ]]; then
    missing+=("$pkg")
  fi
done
if [[ ${#missing[@]} -eq 0 ]]; then
  exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
  echo "$0: WARNING: missing Debian packages ${missing[*]}; run this script as root to install them (the tests" \
       "that need them skip until then)" >&2
  exit 0
fi
echo "install_system_packages: installing ${missing[*]} (apt-get)" >&2
apt-get update -q >/dev/null || echo "install_system_packages: apt-get update failed; trying the cached lists" >&2
if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; then
  # one package this Debian lacks must not block the others; the tests that need a missing one skip and say why
  for pkg in "${missing[@]}"; do
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$pkg" >/dev/null \
      || echo "install_system_packages: WARNING: could not install $pkg; the tests that need it will skip" >&2
  done
fi
