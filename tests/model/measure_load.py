"""Measure model load time and peak memory: NVlabs pickle vs our cached safetensors + card.

    OMP_NUM_THREADS=1 .venv/bin/python -m tests.model.measure_load [--repeat 3] [--sizes bundled,cifar,imagenet]

For each size: writes a pickle in the reference's format (tests/model/nvlabs_format.py) and its
conversion, then loads each in a fresh process (`load_model`, CPU), reporting wall time and the
peak RSS above the RSS before the load (VmHWM after /proc/self/clear_refs), next to the size of
the weights. Not a test: numbers for the README and the issue's closing note.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CIFAR = dict(img_resolution=32, img_channels=3, label_dim=10, model_type="SongUNet", embedding_type="positional",
             encoder_type="standard", decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1],
             model_channels=128, channel_mult=[2, 2, 2], augment_dim=9, dropout=0.13, use_fp16=False)

IMAGENET = dict(img_resolution=64, img_channels=3, label_dim=1000, model_type="DhariwalUNet", model_channels=192,
                channel_mult=[1, 2, 3, 4], dropout=0.1, use_fp16=True)
CONFIGS = {"cifar": CIFAR, "imagenet": IMAGENET}

PROBE = textwrap.dedent("""
    import json, sys, time
    import torch
    from model.checkpoint import load_model

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))

    torch.set_num_threads(1)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
    started = time.perf_counter()
    loaded = load_model(sys.argv[1])
    seconds = time.perf_counter() - started
    weights = sum(t.numel() * t.element_size() for t in loaded.net.state_dict().values())
    print(json.dumps({"seconds": seconds, "peak_mib": (status("VmHWM") - before) / 1024,
                      "weights_mib": weights / 2**20}))
""")


def make(size: str, folder: Path) -> tuple[Path, Path]:
    import torch

    from model.checkpoint import convert, load_model
    from model.precond import EDMPrecond
    from tests.model import nvlabs_format as nv

    if size == "bundled":
        loaded = load_model(ROOT / "model/bundled/edm-digits-8x8-cond.json")
        net, kwargs = loaded.net, loaded.net.init_kwargs  # type: ignore[attr-defined]
        for t in (*net.parameters(), *net.buffers()):  # loaded weights are views of one buffer: own copies,
            t.data = t.data.clone()                      # or the pickle would hold that buffer once per tensor
    else:
        torch.manual_seed(0)
        net, kwargs = EDMPrecond(**CONFIGS[size]), CONFIGS[size]  # type: ignore[arg-type]
    pkl = folder / f"{size}.pkl"
    pkl.write_bytes(nv.snapshot_bytes(net, dict(kwargs)))
    convert(pkl, folder / f"{size}.json")
    return pkl, folder / f"{size}.json"


def probe(path: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", PROBE, str(path)], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=600, check=True)
    return json.loads(r.stdout)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sizes", default="bundled,cifar")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            pkl, card = make(size, Path(tmp))
            cases = (("pickle", pkl, pkl), ("cached safetensors", card, card.with_suffix(".safetensors")))
            for label, path, data in cases:
                runs = [probe(path) for _ in range(args.repeat)]
                seconds = [r["seconds"] for r in runs]
                peak = max(r["peak_mib"] for r in runs)
                print(f"{size:8} {label:19} median {statistics.median(seconds):.3f} s "
                      f"(min {min(seconds):.3f}, max {max(seconds):.3f}; n={len(runs)}); "
                      f"peak +{peak:.1f} MiB for {runs[0]['weights_mib']:.1f} MiB of weights; "
                      f"file {data.stat().st_size / 2**20:.1f} MiB", flush=True)


if __name__ == "__main__":
    main()
