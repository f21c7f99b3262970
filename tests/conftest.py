"""Shared test fixtures: llama.cpp's tools (built once, cached) and the real test models."""

from __future__ import annotations

import os

import pytest
import torch

# One torch thread: the reference-order numerics are many small ops, and OpenMP spinning on a loaded 2-core
# machine makes them up to 100x slower.
torch.set_num_threads(1)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def llamacpp():
    from quantmix.tools.llamacpp import ensure_llamacpp

    return ensure_llamacpp()
