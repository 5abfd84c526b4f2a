"""`edm-serve sample | inspect | convert`: the reference's generate.py, and checkpoint tools.

`sample` takes the options of NVlabs generate.py with the same names and meanings (--model in
place of --network) and writes the same files: given the same pickle and options on the same
device type, the same PNG bytes. Unlike the reference it also runs on the CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys

DTYPES = ("auto", "fp32", "fp16", "bf16")


def parse_int_list(text: str) -> list[int]:
    """'1,2,5-10' -> [1, 2, 5, 6, 7, 8, 9, 10] (the reference's seed syntax)."""
    values: list[int] = []
    for part in text.split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d+)-(\d+)", part)
        if match:
            first, last = int(match.group(1)), int(match.group(2))
            if last < first:
                raise argparse.ArgumentTypeError(f"empty range {part!r}")
            values.extend(range(first, last + 1))
        elif re.fullmatch(r"\d+", part):
            values.append(int(part))
        else:
            raise argparse.ArgumentTypeError(f"not a seed or range: {part!r} (expected e.g. 0-63 or 1,2,5-10)")
    return values


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _at_least(minimum: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {text}")
        return value
    return parse


def add_sampler_options(parser: argparse.ArgumentParser) -> None:
    """The sampler options of generate.py, shared by `sample` and `eval`."""
    g = parser.add_argument_group("sampler (names and defaults as in NVlabs generate.py)")
    g.add_argument("--steps", dest="num_steps", type=_at_least(2), default=18, help="number of sampling steps N")
    g.add_argument("--sigma_min", type=_positive, help="lowest noise level [default: varies]")
    g.add_argument("--sigma_max", type=_positive, help="highest noise level [default: varies]")
    g.add_argument("--rho", type=_positive, default=7.0, help="time step exponent")
    g.add_argument("--S_churn", type=_non_negative, default=0.0, help="stochasticity strength")
    g.add_argument("--S_min", type=_non_negative, default=0.0, help="stoch. min noise level")
    g.add_argument("--S_max", type=_non_negative, default=math.inf, help="stoch. max noise level")
    g.add_argument("--S_noise", type=float, default=1.0, help="stoch. noise inflation")
    g.add_argument("--solver", choices=["euler", "heun"], help="ablate ODE solver")
    g.add_argument("--disc", dest="discretization", choices=["vp", "ve", "iddpm", "edm"],
                   help="ablate time step discretization {t_i}")
    g.add_argument("--schedule", choices=["vp", "ve", "linear"], help="ablate noise schedule sigma(t)")
    g.add_argument("--scaling", choices=["vp", "none"], help="ablate signal scaling s(t)")


def add_device_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N [default: cuda if available, else cpu]")
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="network precision; auto = the checkpoint's choice (fp16 on CUDA if trained so)")


def settings_from_args(args: argparse.Namespace):
    from model.samplers import SamplerSettings

    keys = ("num_steps", "sigma_min", "sigma_max", "rho", "S_churn", "S_min", "S_max", "S_noise",
            "solver", "discretization", "schedule", "scaling")
    return SamplerSettings(**{key: getattr(args, key) for key in keys})


def load_for_sampling(path: str, device_name: str | None, dtype_name: str):
    """Load a checkpoint onto the requested device with the requested network precision."""
    import torch

    from model.checkpoint import load_model

    device = torch.device(device_name or ("cuda" if torch.cuda.is_available() else "cpu"))
    loaded = load_model(path, device=device)
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if dtype_name != "auto":
        loaded.net.compute_dtype = dtypes[dtype_name]
    return loaded, device


def sample_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="edm-serve sample",
        description="Generate images with an EDM checkpoint (NVlabs pickle or our safetensors + card).",
        epilog="example: edm-serve sample --model model/bundled/edm-digits-8x8-cond.json --seeds 0-63 --outdir out",
    )
    parser.add_argument("--model", required=True, metavar="PATH", help="checkpoint: .pkl, .json card or .safetensors")
    parser.add_argument("--outdir", required=True, metavar="DIR", help="where to save the output images")
    parser.add_argument("--seeds", type=parse_int_list, default=parse_int_list("0-63"), metavar="LIST",
                        help="random seeds, e.g. 1,2,5-10 [default: 0-63]")
    parser.add_argument("--subdirs", action="store_true", help="create a subdirectory for every 1000 seeds")
    parser.add_argument("--class", dest="class_idx", type=_at_least(0), default=None, metavar="INT",
                        help="class label [default: random]")
    parser.add_argument("--batch", dest="max_batch_size", type=_at_least(1), default=64, help="maximum batch size")
    parser.add_argument("--pass-sizes", default="auto", metavar="SIZES",
                        help="row counts of the forward passes, as the worker's EDM_PASS_SIZES: 'auto' (the worker's "
                             "default for the device: CPU any count from 4, CUDA 8,16,32,64), 'N+' or 'A,B,C'")
    add_sampler_options(parser)
    add_device_options(parser)
    args = parser.parse_args(argv)

    import torch
    import tqdm

    from model.generate import generate
    from model.images import encode_png

    settings = settings_from_args(args)
    try:
        settings.validate()
        loaded, device = load_for_sampling(args.model, args.device, args.dtype)
    except (ValueError, OSError) as error:
        print(f"edm-serve sample: {error}", file=sys.stderr)
        return 2
    net = loaded.net
    from model.slots import PassSizes

    try:
        pass_sizes = None if args.pass_sizes == "auto" else PassSizes.parse(args.pass_sizes)
    except ValueError as error:
        print(f"edm-serve sample: --pass-sizes: {error}", file=sys.stderr)
        return 2
    if args.class_idx is not None and not net.label_dim:
        print("edm-serve sample: --class given but the model is unconditional", file=sys.stderr)
        return 2
    if args.class_idx is not None and args.class_idx >= net.label_dim:
        print(f"edm-serve sample: --class must be below {net.label_dim}", file=sys.stderr)
        return 2

    # The reference's batching: the seed list cut into equal consecutive parts of at most --batch.
    num_batches = (len(args.seeds) - 1) // args.max_batch_size + 1
    batches = [b.tolist() for b in torch.as_tensor(args.seeds).tensor_split(num_batches)]
    print(f'Generating {len(args.seeds)} images to "{args.outdir}" on {device}...', file=sys.stderr)
    for batch_seeds in tqdm.tqdm(batches, unit="batch", file=sys.stderr):
        if not batch_seeds:
            continue
        images = generate(net, batch_seeds, [args.class_idx] * len(batch_seeds), settings, pass_sizes=pass_sizes)
        for image in images:
            assert image is not None
            seed = image.seed
            image_dir = os.path.join(args.outdir, f"{seed - seed % 1000:06d}") if args.subdirs else args.outdir
            os.makedirs(image_dir, exist_ok=True)
            with open(os.path.join(image_dir, f"{seed:06d}.png"), "wb") as f:
                f.write(encode_png(image.pixels))
    print("Done.", file=sys.stderr)
    return 0


def inspect_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="edm-serve inspect", description="Print a checkpoint's model card as JSON.")
    parser.add_argument("path", help="checkpoint: .pkl, .json card or .safetensors")
    args = parser.parse_args(argv)
    from model.checkpoint import inspect

    try:
        card = inspect(args.path)
    except (ValueError, OSError) as error:
        print(f"edm-serve inspect: {error}", file=sys.stderr)
        return 2
    print(json.dumps(card, indent=2))
    return 0


def convert_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="edm-serve convert",
                                     description="Convert an NVlabs network pickle to safetensors + JSON model card.")
    parser.add_argument("pkl", help="NVlabs network-snapshot pickle")
    parser.add_argument("out", help="NAME.json (writes NAME.json + NAME.safetensors beside it) or a folder")
    args = parser.parse_args(argv)
    from model.checkpoint import convert

    try:
        card = convert(args.pkl, args.out)
    except (ValueError, OSError) as error:
        print(f"edm-serve convert: {error}", file=sys.stderr)
        return 2
    print(json.dumps(card.model_dump(mode="json") if hasattr(card, "model_dump") else card, indent=2))
    return 0
