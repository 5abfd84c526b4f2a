"""`edm-serve eval`: class accuracy and Fréchet distance of a digits model's samples, across samplers.

Writes to --outdir:
  eval.json       everything measured, self-describing (model, classifier, settings of every run)
  grid.png        10 classes x 8 seeds with the sampler options given on the command line
  fd_vs_nfe.png   FD and class accuracy vs NFE per sampler preset (when a sweep ran)

--sweep picks the runs beside the one with the given sampler options ("main"):
  none   only main
  bars   EDM at 35 and 255 NFE, VE at 35 NFE: the figures the issue's bars need
  table  the four Table-1 columns (VP, VE, iDDPM+DDIM, EDM) at NFE 9, 17, 35, 79, 255
  full   every preset (Table 1 + Euler on EDM steps + stochastic) at every --nfe (5 ... 255)

Examples:
  edm-serve eval --sweep bars --outdir out/eval                      # CPU, a few minutes
  edm-serve eval --sweep full --device cuda --outdir out/eval-full   # the whole FD-vs-NFE figure
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from model.cli import _at_least, add_device_options, add_sampler_options, load_for_sampling, settings_from_args

SWEEPS = ("none", "bars", "table", "full")
DEFAULT_NFE = [5, 9, 17, 35, 79, 255]
TABLE_NFE = [9, 17, 35, 79, 255]

# The acceptance bars.
BAR_ACCURACY = 0.98
BAR_CONVERGED = 1.15
BAR_VE_RATIO = 3.0


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 2:
        raise argparse.ArgumentTypeError("NFE values must be >= 2")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edm-serve eval",
        description="Measure class accuracy and Fréchet distance (digit-classifier features) of class-conditional "
                    "samples of an 8x8 digits model, for the given sampler options and optional sampler sweeps.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", metavar="PATH", help="checkpoint (.json card, .safetensors or .pkl) "
                                                        "[default: the bundled digits model]")
    parser.add_argument("--outdir", default="out/eval", metavar="DIR", help="where to write eval.json and the plots")
    parser.add_argument("--samples", type=_at_least(10), default=1000,
                        help="samples per run: seeds 0..N-1, class = seed mod 10 [default: 1000]")
    parser.add_argument("--sweep", choices=SWEEPS, default="none", help="extra runs beside main (see below)")
    parser.add_argument("--presets", metavar="LIST", help="comma-separated presets for --sweep full [default: all]")
    parser.add_argument("--nfe", type=_int_list, default=DEFAULT_NFE, metavar="LIST",
                        help="NFE budgets for --sweep full [default: 5,9,17,35,79,255]")
    parser.add_argument("--batch", dest="max_batch_size", type=_at_least(1), default=1000, help="maximum batch size")
    parser.add_argument("--grid_seeds", type=_at_least(1), default=8, help="columns of the sample grid")
    parser.add_argument("--write_card", action="store_true",
                        help="record the measured figures in the model card's quality section")
    parser.add_argument("--classifier_seed", type=int, default=0, help="seed of the classifier and its split")
    add_sampler_options(parser)
    add_device_options(parser)
    parser.epilog = "Writes to --outdir:" + (__doc__ or "").split("Writes to --outdir:", 1)[1]
    return parser


def planned_runs(sweep: str, presets: list[str], nfe: list[int]) -> list[tuple[str, int]]:
    if sweep == "none":
        return []
    if sweep == "bars":
        return [("EDM", 35), ("EDM", 255), ("VE", 35)]
    if sweep == "table":
        from model.evaluate import TABLE1

        return [(p, n) for p in TABLE1 for n in TABLE_NFE]
    return [(p, n) for p in presets for n in nfe]


def bars(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's quality bars, from whichever runs were measured."""
    fd = {(r["name"], r["nfe"]): r for r in results}
    out: dict[str, Any] = {}
    if ("EDM", 35) in fd:
        acc = fd["EDM", 35]["accuracy"]
        out["class_accuracy_heun_edm_35nfe"] = {"value": acc, "bar": f">= {BAR_ACCURACY}", "pass": acc >= BAR_ACCURACY}
    if ("EDM", 35) in fd and ("EDM", 255) in fd:
        ratio = fd["EDM", 35]["fd"] / fd["EDM", 255]["fd"]
        out["fd_heun_edm_35_over_255"] = {"value": ratio, "bar": f"<= {BAR_CONVERGED}", "pass": ratio <= BAR_CONVERGED}
    if ("EDM", 35) in fd and ("VE", 35) in fd:
        ratio = fd["VE", 35]["fd"] / fd["EDM", 35]["fd"]
        out["fd_ve_35_over_heun_edm_35"] = {"value": ratio, "bar": f">= {BAR_VE_RATIO}", "pass": ratio >= BAR_VE_RATIO}
    return out


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)

    import torch
    import tqdm

    from model.bundled import DEFAULT_MODEL
    from model.card import ModelCard, load_card, save_card
    from model.evaluate import (
        PRESETS,
        evaluate_run,
        plot_sweep,
        real_data_fd,
        reference_stats,
        sample_grid_png,
        sample_images,
        settings_for,
        train_classifier,
    )
    from model.generate import generate
    from model.images import encode_png

    started = time.perf_counter()
    model_path = Path(args.model) if args.model else DEFAULT_MODEL
    presets = [p.strip() for p in args.presets.split(",")] if args.presets else list(PRESETS)
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        print(f"edm-serve eval: unknown preset(s) {unknown}; choose from {list(PRESETS)}", file=sys.stderr)
        return 2
    if args.write_card and model_path.suffix != ".json":
        print("edm-serve eval: --write_card needs our .json model card as --model", file=sys.stderr)
        return 2
    try:
        main_settings = settings_from_args(args).validate()
        loaded, device = load_for_sampling(str(model_path), args.device, args.dtype)
    except (ValueError, OSError) as error:
        print(f"edm-serve eval: {error}", file=sys.stderr)
        return 2
    net, card = loaded.net, loaded.card
    if (net.img_resolution, net.img_channels, net.label_dim) != (8, 1, 10):
        print("edm-serve eval: the digit classifier scores class-conditional 8x8 grayscale models with 10 classes; "
              f"this one is {net.img_resolution}x{net.img_resolution}x{net.img_channels} with label_dim "
              f"{net.label_dim}", file=sys.stderr)
        return 2

    print(f"Training the digit classifier (CPU, seed {args.classifier_seed})...", file=sys.stderr)
    classifier = train_classifier(seed=args.classifier_seed, device=device)
    print(f"  held-out accuracy {classifier.heldout_accuracy:.2%} on {classifier.test_size} digits", file=sys.stderr)
    reference = reference_stats(classifier)

    # Runs: main first, then the sweep; identical settings are sampled once.
    runs: list[tuple[str, Any]] = [("main", main_settings)]
    runs += [(name, settings_for(name, nfe)) for name, nfe in planned_runs(args.sweep, presets, args.nfe)]
    unique = list(dict.fromkeys(settings for _, settings in runs))
    grid_count = 10 * args.grid_seeds
    total = sum(s.nfe_total for s in unique) * args.samples + main_settings.nfe_total * (grid_count + 32)
    bar = tqdm.tqdm(total=total, unit="img·NFE", unit_scale=True, file=sys.stderr, dynamic_ncols=True)

    measured: dict[Any, Any] = {}
    for settings in unique:
        names = sorted({name for name, s in runs if s == settings})
        bar.set_description(f"{'/'.join(names)} @ {settings.nfe_total} NFE")
        measured[settings] = evaluate_run(net, classifier, reference, names[0], settings, num_samples=args.samples,
                                          batch=args.max_batch_size, on_progress=bar.update)
    results = []
    main_result: dict[str, Any] = {}
    for name, settings in runs:
        row = {**measured[settings].to_dict(), "name": name}
        if name == "main":
            main_result = row
        else:
            results.append(row)

    # Sample grid (rows: classes, columns: seeds 0..grid_seeds-1) with the main settings.
    bar.set_description("grid")
    seeds = [seed for _ in range(10) for seed in range(args.grid_seeds)]
    labels = [c for c in range(10) for _ in range(args.grid_seeds)]
    grid = sample_images(net, seeds, labels, main_settings, batch=args.max_batch_size, on_progress=bar.update)

    # Determinism: the same seeds twice give the same PNG bytes.
    bar.set_description("determinism")

    def png_bytes() -> list[bytes]:
        images = generate(net, list(range(16)), [s % 10 for s in range(16)], main_settings,
                          on_eval=lambda ev: bar.update(len(ev.rows)) and None)  # None: drop no rows
        return [encode_png(image.pixels) for image in images if image is not None]

    identical = png_bytes() == png_bytes()
    bar.close()

    outdir = Path(args.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / "grid.png").write_bytes(sample_grid_png(grid, 10, args.grid_seeds))
    swept = {r["name"] for r in results if sum(q["name"] == r["name"] for q in results) > 1}
    if swept:
        plot_sweep([r for r in results if r["name"] in swept], str(outdir / "fd_vs_nfe.png"),
                   title=f"{card.name}: {args.samples} class-conditional samples per point")

    table: dict[str, dict[str, float]] = {}
    for r in results:
        table.setdefault(r["name"], {})[str(r["nfe"])] = r["fd"]
    report = {
        "what": "edm-serve eval: quality of class-conditional samples of an 8x8 digits model",
        "metrics": {
            "accuracy": "share of samples that the digit classifier assigns to the class they were generated for",
            "fd": "Fréchet distance between Gaussians fitted to the classifier's 64-d penultimate features of the "
                  "samples and of all 1,797 load_digits images; lower is better; biased upwards at small sample "
                  "counts, so compare only at equal num_samples",
            "nfe": "network evaluations per image (Heun: 2 * num_steps - 1, Euler: num_steps)",
        },
        "command": "edm-serve eval " + shlex.join(argv),
        "evaluated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": {"path": str(model_path), "name": card.name, "weights_sha256": card.weights_sha256,
                  "parameters": card.parameters, "preconditioner": card.preconditioner,
                  "architecture": card.architecture},
        "environment": {"device": str(device), "device_name": torch.cuda.get_device_name(device)
                        if device.type == "cuda" else platform.processor() or platform.machine(),
                        "dtype": args.dtype, "torch": torch.__version__, "torch_threads": torch.get_num_threads()},
        "classifier": classifier.info,
        "reference": {"data": "all 1,797 sklearn load_digits images, x = v / 8 - 1",
                      "fd_of_1000_real_digits": real_data_fd(classifier, reference)},
        "samples": {"num_samples": args.samples, "seeds": f"0..{args.samples - 1}",
                    "class_labels": "seed mod 10", "scored_as": "PNG pixels p, x = (p - 127.5) / 127.5"},
        "presets": {name: desc for name, (desc, _) in PRESETS.items()},
        "main": main_result,
        "results": results,
        "fd_table": table,
        "bars": bars(results),
        "png_identical_run_to_run": identical,
        "files": {"grid": "grid.png (rows: classes 0-9, columns: seeds 0.."
                          f"{args.grid_seeds - 1}, main sampler settings)",
                  "plot": "fd_vs_nfe.png" if swept else None},
        "seconds": round(time.perf_counter() - started, 1),
    }
    (outdir / "eval.json").write_text(json.dumps(report, indent=2, allow_nan=False, default=_json_default) + "\n")

    if args.write_card:
        card_on_disk = load_card(model_path)
        quality = card_quality(card_on_disk.quality, report)
        save_card(ModelCard.model_validate({**card_on_disk.model_dump(), "quality": quality}), model_path)

    _print_summary(report)
    print(f"Wrote {outdir / 'eval.json'} and plots ({report['seconds']:.0f} s).", file=sys.stderr)
    return 0


def card_quality(previous: dict[str, Any] | None, report: dict[str, Any]) -> dict[str, Any]:
    """The card's quality section: this report's runs merged into earlier ones (a run measured again
    with the same sample count replaces the old figure), the bars recomputed from all of them."""
    keep = ("name", "nfe", "num_steps", "solver", "discretization", "schedule", "scaling", "stochastic",
            "num_samples", "accuracy", "fd")
    runs = {(r["name"], r["nfe"], r["num_samples"]): r for r in (previous or {}).get("runs", [])}
    for r in report["results"]:
        runs[r["name"], r["nfe"], r["num_samples"]] = {
            **{k: r[k] for k in keep}, "device": report["environment"]["device"], "command": report["command"]}
    rows = sorted(runs.values(), key=lambda r: (r["name"], r["nfe"], r["num_samples"]))
    largest = max((r["num_samples"] for r in rows), default=0)
    main = report["main"]
    return {
        "evaluated_by": "edm-serve eval (model/evaluate.py)",
        "last_evaluated_at": report["evaluated_at"],
        "classifier": {k: report["classifier"][k] for k in ("architecture", "data", "heldout_accuracy")},
        "metrics": report["metrics"],
        "fd_reference": report["reference"],
        "main": {**{k: main[k] for k in ("nfe", "solver", "discretization", "num_samples", "accuracy", "fd")},
                 "command": report["command"]},
        "fd_table": {f"{r['name']} @ {r['nfe']} NFE": r["fd"] for r in rows if r["num_samples"] == largest},
        "bars": bars([r for r in rows if r["num_samples"] == largest]),
        "png_identical_run_to_run": report["png_identical_run_to_run"],
        "runs": rows,
    }


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and math.isinf(value):
        return "Infinity"
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _print_summary(report: dict[str, Any]) -> None:
    main = report["main"]
    print(f"classifier held-out accuracy {report['classifier']['heldout_accuracy']:.2%}; "
          f"main ({main['solver']}/{main['discretization']}, {main['nfe']} NFE): "
          f"accuracy {main['accuracy']:.2%}, FD {main['fd']:.4f}")
    for name, row in report["fd_table"].items():
        cells = ", ".join(f"{nfe}: {fd:.4f}" for nfe, fd in sorted(row.items(), key=lambda kv: int(kv[0])))
        print(f"  FD {name:<16} {cells}")
    for key, bar in report["bars"].items():
        print(f"  bar {key}: {bar['value']:.4f} ({bar['bar']}) {'PASS' if bar['pass'] else 'FAIL'}")
    print(f"  PNGs identical run to run: {report['png_identical_run_to_run']}")
