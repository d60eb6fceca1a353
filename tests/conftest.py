"""Test environment: offline, Triton through its interpreter on CPU, tiny_models importable, a fixed seed.

Helpers live in `tiny_models.py` (importable), not here.
"""

import os
import sys
import warnings

import pytest
import torch


# Triton kernels run on CPU tensors through the interpreter (set before any kernel is defined).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", message=".*generation flags are not valid.*")

import peft_clm  # noqa: E402,F401  registers CLM with PEFT


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
