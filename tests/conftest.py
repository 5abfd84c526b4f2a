"""Shared test setup: torch on one thread (a 2-core machine shared with other work)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

try:
    import torch
except ImportError:  # the gateway-only tests run without torch
    pass
else:
    torch.set_num_threads(1)
