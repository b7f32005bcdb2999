"""Shared test setup: deterministic seeds and the interpreter switch."""

import os

import pytest
import torch

# Kernel tests run the Triton code on CPU tensors when TRITON_INTERPRET=1 is set (see kernels/).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
