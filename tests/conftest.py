"""Shared test settings: every test runs offline and writes its cache into a temporary folder unless told not to."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    """A fresh, empty speechtrim cache folder for one test."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("SPEECHTRIM_CACHE", str(folder))
    return folder


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread (and do not thrash when other jobs share the cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
