"""Sampler throughput: images/s, FLOPs per forward pass and utilisation of a given peak.

Runs the EDM sampler end to end (per-seed streams, float64 state, PNG-ready pixels) on a
checkpoint or on an official architecture with random weights (no download needed), and prints
and writes JSON. Examples:

    python bench/sampler.py --model model/bundled/edm-digits-8x8-cond.json --batch 64 --steps 18
    python bench/sampler.py --arch cifar10-ddpmpp --device cuda --dtype fp16 --batch 256 --peak-tflops 989
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Official configurations (NVlabs train.py --arch ... with the documented settings).
ARCHS = {
    "cifar10-ddpmpp": dict(img_resolution=32, img_channels=3, label_dim=10, model_type="SongUNet",
                           embedding_type="positional", encoder_type="standard", decoder_type="standard",
                           channel_mult_noise=1, resample_filter=[1, 1], model_channels=128,
                           channel_mult=[2, 2, 2], augment_dim=9),
    "cifar10-ncsnpp": dict(img_resolution=32, img_channels=3, label_dim=10, model_type="SongUNet",
                           embedding_type="fourier", encoder_type="residual", decoder_type="standard",
                           channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=128,
                           channel_mult=[2, 2, 2], augment_dim=9),
    "imagenet64-adm": dict(img_resolution=64, img_channels=3, label_dim=1000, model_type="DhariwalUNet",
                           model_channels=192, channel_mult=[1, 2, 3, 4]),
}
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def build(args):
    import torch

    from model.checkpoint import load_model
    from model.precond import EDMPrecond

    device = torch.device(args.device)
    if args.model:
        net = load_model(args.model, device=device).net
        name = args.model
    else:
        torch.manual_seed(0)
        net = EDMPrecond(**ARCHS[args.arch]).to(device).eval().requires_grad_(False)
        name = args.arch
    if args.dtype != "auto":
        net.compute_dtype = getattr(torch, DTYPES[args.dtype])
    return net, name


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def flops_per_forward(net, batch: int) -> float:
    """FLOPs of one network evaluation per image (torch's flop counter, batch of `batch`)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    device = next(net.parameters()).device
    x = torch.zeros(batch, net.img_channels, net.img_resolution, net.img_resolution, device=device)
    labels = torch.zeros(batch, net.label_dim, device=device) if net.label_dim else None
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(x, torch.tensor(1.0, device=device), labels)
    return counter.get_total_flops() / batch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="checkpoint path (.pkl, .json, .safetensors)")
    source.add_argument("--arch", choices=sorted(ARCHS), help="official architecture with random weights")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=18)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 unless measuring threading)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak, for utilisation")
    parser.add_argument("--json", default="bench/results/sampler.json", help="where to write the figures")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from model.allocator import reuse_freed_memory
    from model.generate import generate

    reuse_freed_memory()  # as the worker and `edm-serve sample` do
    from model.samplers import SamplerSettings

    net, name = build(args)
    settings = SamplerSettings(num_steps=args.steps)
    seeds = list(range(args.batch))

    def run_once() -> float:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        generate(net, seeds, None, settings)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    run_once()  # warm-up: kernels, allocator, caches
    seconds = [run_once() for _ in range(args.repeats)]
    median = statistics.median(seconds)
    flops = flops_per_forward(net, min(args.batch, 8))
    nfe = settings.nfe_total
    achieved = flops * nfe * args.batch / median
    result = {
        "model": name, "device": args.device,
        "device_name": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else cpu_name(),
        "dtype": args.dtype, "batch": args.batch, "steps": args.steps, "nfe_per_image": nfe,
        "threads": args.threads, "seconds": seconds, "median_seconds": median,
        "images_per_second": args.batch / median,
        "forward_passes_per_second": nfe / median,
        "gflop_per_forward_per_image": flops / 1e9,
        "achieved_tflops": achieved / 1e12,
        "peak_tflops": args.peak_tflops,
        "utilisation": (achieved / 1e12 / args.peak_tflops) if args.peak_tflops else None,
        "torch": torch.__version__,
    }
    print(json.dumps(result, indent=2))
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
