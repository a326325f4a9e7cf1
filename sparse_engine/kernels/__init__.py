"""Triton kernels, each beside its PyTorch reference. `triton_available()` gates their use."""

from __future__ import annotations

import os


def triton_available(device) -> bool:
    """True where a Triton kernel can run: a CUDA device, or the CPU interpreter (TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    return getattr(device, "type", str(device)) == "cuda"
