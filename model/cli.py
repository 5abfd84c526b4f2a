"""`edm-serve sample | inspect | convert | models | pull`: the reference's generate.py, and checkpoint tools.

`sample` takes the options of NVlabs generate.py with the same names and meanings (--model in
place of --network) and writes the same files. It runs the worker's slot engine, so it writes the
service's PNG bytes; with --pass-sizes 1+ (unpadded passes, as the reference's calls) the
reference's, for any batch. Unlike the reference it also runs on the CPU.

Every model argument is a source (model/sources.py): a local file, a catalogue name or an https://
URL (optionally ``#sha256=HEX``). Downloads go to EDM_CACHE_DIR (or --cache-dir) with a progress
bar; EDM_ALLOW_HTTP, EDM_MAX_DOWNLOAD_BYTES and EDM_MAX_PARAMETERS apply as in the service.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from typing import Any

from model.choices import DISCRETIZATIONS, SCALINGS, SCHEDULES, SOLVERS

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
    g.add_argument("--solver", choices=SOLVERS, help="ablate ODE solver")
    g.add_argument("--disc", dest="discretization", choices=DISCRETIZATIONS,
                   help="ablate time step discretization {t_i}")
    g.add_argument("--schedule", choices=SCHEDULES, help="ablate noise schedule sigma(t)")
    g.add_argument("--scaling", choices=SCALINGS, help="ablate signal scaling s(t)")


def add_device_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N [default: cuda if available, else cpu]")
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="network precision; auto = the checkpoint's choice (fp16 on CUDA if trained so)")


def add_source_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model sources (a path, a catalogue name or an https:// URL)")
    g.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="download cache [EDM_CACHE_DIR; default ~/.cache/edm-serve]")
    g.add_argument("--allow-http", action="store_true", default=None,
                   help="allow plain http:// downloads [EDM_ALLOW_HTTP]")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, "").strip()
    return int(text) if text else default


def source_options(args: argparse.Namespace) -> dict[str, Any]:
    """Cache and limits for model sources: options, else the service's EDM_* variables."""
    from pathlib import Path

    from model.download import DEFAULT_MAX_DOWNLOAD_BYTES, default_cache_dir
    from model.nvlabs_pickle import DEFAULT_MAX_PARAMETERS

    cache = getattr(args, "cache_dir", None) or os.environ.get("EDM_CACHE_DIR") or default_cache_dir()
    allow_http = getattr(args, "allow_http", None)
    return dict(cache_dir=Path(cache), allow_http=_env_flag("EDM_ALLOW_HTTP") if allow_http is None else allow_http,
                max_bytes=_env_int("EDM_MAX_DOWNLOAD_BYTES", DEFAULT_MAX_DOWNLOAD_BYTES),
                max_parameters=_env_int("EDM_MAX_PARAMETERS", DEFAULT_MAX_PARAMETERS))


class _Bar:
    """A tqdm bar for one download, opened on the first report."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.bar: Any = None

    def __call__(self, done: int, total: int | None) -> None:
        import tqdm

        if self.bar is None:
            self.bar = tqdm.tqdm(total=total, initial=done, unit="B", unit_scale=True, unit_divisor=1024,
                                 desc=self.label, file=sys.stderr)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def local_model(text: str, args: argparse.Namespace) -> str:
    """A model source -> a local checkpoint file (downloaded and converted into the cache if remote)."""
    from model.sources import materialize, parse_source

    source = parse_source(text)
    if source.url is None:
        return text
    opts = source_options(args)
    bar = _Bar(source.name)
    try:
        path = materialize(source, opts["cache_dir"], allow_http=opts["allow_http"], max_bytes=opts["max_bytes"],
                           max_parameters=opts["max_parameters"], progress=bar)
    finally:
        bar.close()
    return str(path)


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
    parser.add_argument("--model", required=True, metavar="SOURCE",
                        help="checkpoint: .pkl, .json card or .safetensors; a catalogue name (edm-serve models); "
                             "or an https:// URL")
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
    add_source_options(parser)
    args = parser.parse_args(argv)

    import torch
    import tqdm

    from model.allocator import reuse_freed_memory
    from model.generate import generate
    from model.images import encode_png

    reuse_freed_memory()  # as the worker does: forward passes reuse their activations' memory

    settings = settings_from_args(args)
    try:
        settings.validate()
        loaded, device = load_for_sampling(local_model(args.model, args), args.device, args.dtype)
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
    parser.add_argument("path", metavar="SOURCE", help="checkpoint: .pkl, .json card or .safetensors; a catalogue "
                        "name or an https:// URL (downloaded and converted into the cache)")
    add_source_options(parser)
    args = parser.parse_args(argv)
    from model.checkpoint import inspect

    try:
        card = inspect(local_model(args.path, args))
    except (ValueError, OSError) as error:
        print(f"edm-serve inspect: {error}", file=sys.stderr)
        return 2
    print(json.dumps(card, indent=2))
    return 0


def convert_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="edm-serve convert",
                                     description="Convert an NVlabs pickle to safetensors + JSON model card.")
    parser.add_argument("pkl", metavar="SOURCE", help="NVlabs network-snapshot pickle: a path, a catalogue name or "
                        "an https:// URL")
    parser.add_argument("out", help="NAME.json (writes NAME.json + NAME.safetensors beside it) or a folder")
    add_source_options(parser)
    args = parser.parse_args(argv)
    from model.checkpoint import convert
    from model.sources import conversion_options, download, parse_source

    try:
        source = parse_source(args.pkl)
        if source.url is None:
            card = convert(args.pkl, args.out, max_parameters=source_options(args)["max_parameters"])
        else:
            opts = source_options(args)
            bar = _Bar(source.name)
            try:
                got = download(source, opts["cache_dir"], allow_http=opts["allow_http"], max_bytes=opts["max_bytes"],
                               progress=bar)
            finally:
                bar.close()
            card = convert(got.path, args.out, max_parameters=opts["max_parameters"],
                           **conversion_options(source, got))
    except (ValueError, OSError) as error:
        print(f"edm-serve convert: {error}", file=sys.stderr)
        return 2
    print(json.dumps(card.model_dump(mode="json") if hasattr(card, "model_dump") else card, indent=2))
    return 0


def models_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="edm-serve models",
                                     description="The official EDM checkpoints by name; * = in the cache.")
    parser.add_argument("--json", action="store_true", help="one JSON object per model, with URL and settings")
    add_source_options(parser)
    args = parser.parse_args(argv)
    from model.catalogue import CATALOGUE
    from model.download import cached_download
    from model.sources import cached_card_path, parse_source

    cache = source_options(args)["cache_dir"]
    rows = []
    for entry in CATALOGUE.values():
        source = parse_source(entry.name)
        converted = cached_card_path(source, cache) if source.url else None
        state = "converted" if converted else ("downloaded" if cached_download(cache, entry.url) else "")
        rows.append((entry, state, converted))
    if args.json:
        for entry, state, converted in rows:
            print(json.dumps({**entry.describe(), "cached": state or None,
                              "card": str(converted) if converted else None}))
        return 0
    print(f"{'':2}{'name':<34} {'res':>5} {'classes':>7} {'params':>7}  {'precond':<12} recommended")
    for entry, state, _ in rows:
        rec = " ".join(f"{k}={v}" for k, v in entry.recommended.items())
        mark = "*" if state == "converted" else ("+" if state else " ")
        print(f"{mark:2}{entry.name:<34} {entry.img_resolution:>5} {entry.label_dim or '-':>7} "
              f"{entry.parameters / 1e6:>6.1f}M  {entry.preconditioner:<12} {rec}")
    print(f"\n* cached and converted, + downloaded (converted on first load); cache: {cache}", file=sys.stderr)
    return 0


def pull_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="edm-serve pull",
                                     description="Download models into the cache and convert them, ahead of time.")
    parser.add_argument("sources", nargs="+", metavar="NAME|URL",
                        help="catalogue names or https:// URLs (NAME#sha256=HEX pins the digest)")
    add_source_options(parser)
    args = parser.parse_args(argv)
    status = 0
    for text in args.sources:
        try:
            path = local_model(text, args)
        except (ValueError, OSError) as error:
            print(f"edm-serve pull: {error}", file=sys.stderr)
            status = 2
            continue
        print(path)
    return status
