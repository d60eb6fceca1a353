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


def perturb(peft_model, seed: int = 0, scale: float = 0.05, adapter: str = "default") -> None:
    """Stand-in for training: move every parameter of one adapter's layer."""
    g = torch.Generator().manual_seed(seed)
    layer = peft_model.base_model.clm_layer().clm_layers[adapter]
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * scale)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
