"""`edm-serve train`: train a model with the EDM recipe (or the VP/VE losses) and save it in our
format (safetensors + model card).

A run lives in --outdir: `training-state.pt` (resumable checkpoint, written every
--checkpoint_every steps and at the end) and `log.jsonl` (loss, images/s). `--resume` continues a
stopped run exactly where it left off; the finished model (the EMA weights) goes to --out.

The bundled model (model/bundled/) was made by this command; its card's provenance records the
exact command lines of every session (a run extended with --resume continues bit-exactly), the
data, steps and wall time.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

STATE_FILE = "training-state.pt"
LOG_FILE = "log.jsonl"


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _name_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edm-serve train",
        description="Train an EDM denoiser (EDMPrecond around a DDPM++ SongUNet) and save it as safetensors + "
                    "model card.",
        epilog="example: edm-serve train --data digits --outdir runs/digits "
               "--out model/bundled/edm-digits-8x8-cond.json",
    )
    io = parser.add_argument_group("data and output")
    io.add_argument("--data", required=True, metavar="digits|DIR",
                    help="'digits' (scikit-learn's 8x8 digits) or a folder of same-size square PNGs")
    io.add_argument("--labels", metavar="FILE", help="labels for a PNG folder: dataset.json or 'FILE,LABEL' lines "
                                                    "(omit for an unconditional model)")
    io.add_argument("--outdir", required=True, metavar="DIR", help="run folder: resumable checkpoint and log")
    io.add_argument("--out", required=True, metavar="PATH.json",
                    help="where to write the finished model (card + weights)")
    io.add_argument("--name", help="model name on the card [default: the --out file's stem]")
    io.add_argument("--resume", action="store_true", help="continue the run saved in --outdir")
    io.add_argument("--checkpoint_every", type=int, default=500, metavar="STEPS", help="checkpoint interval")

    recipe = parser.add_argument_group("recipe")
    recipe.add_argument("--loss", choices=["edm", "vp", "ve"], default="edm",
                        help="loss and preconditioner of Table 1 [default: edm]")
    recipe.add_argument("--sigma_data", type=float, default=0.5, help="EDM loss/preconditioner sigma_data")
    recipe.add_argument("--steps", type=int, default=3000, help="optimizer steps")
    recipe.add_argument("--batch", type=int, default=128, help="batch size")
    recipe.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    recipe.add_argument("--lr_rampup", type=float, default=10.0, metavar="KIMG", help="learning-rate warm-up")
    recipe.add_argument("--ema", type=float, default=25.0, metavar="KIMG", help="EMA half-life")
    recipe.add_argument("--augment", type=_name_list, default=[], metavar="LIST",
                        help="opt-in non-leaking augmentations: xflip,yflip,translate,scale,rotate [default: none]")
    recipe.add_argument("--augment_p", type=float, default=0.12, help="probability of each augmentation")
    recipe.add_argument("--seed", type=int, default=0, help="seed of weights, data order and noise")

    net = parser.add_argument_group("network (SongUNet, DDPM++ configuration)")
    net.add_argument("--channels", type=int, default=24, help="model_channels")
    net.add_argument("--channel_mult", type=_int_list, default=[1, 2], metavar="LIST", help="per resolution")
    net.add_argument("--blocks", type=int, default=2, help="residual blocks per resolution")
    net.add_argument("--attn", type=_int_list, default=[4], metavar="LIST", help="resolutions with self-attention")
    net.add_argument("--emb_mult", type=int, default=2, help="channel_mult_emb")
    net.add_argument("--dropout", type=float, default=0.1, help="dropout probability")

    run = parser.add_argument_group("execution")
    run.add_argument("--device", help="cpu, cuda or cuda:N [default: cuda if available, else cpu]")
    run.add_argument("--threads", type=int, help="torch CPU threads [default: torch's choice]")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)

    import torch
    import tqdm

    from model.checkpoint import save_model
    from model.data import load_dataset
    from model.train import TrainConfig, Trainer, validation_loss

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(args.out)
    if out.suffix != ".json":
        print("edm-serve train: --out must name the model card, PATH.json", file=sys.stderr)
        return 2
    outdir = Path(args.outdir)
    state_path = outdir / STATE_FILE
    if state_path.exists() and not args.resume:
        print(f"edm-serve train: {state_path} exists; pass --resume to continue it or choose another --outdir",
              file=sys.stderr)
        return 2

    try:
        dataset = load_dataset(args.data, args.labels)
        config = TrainConfig(
            loss=args.loss,
            network={"model_channels": args.channels, "channel_mult": args.channel_mult, "num_blocks": args.blocks,
                     "attn_resolutions": args.attn, "channel_mult_emb": args.emb_mult, "dropout": args.dropout},
            loss_kwargs={"sigma_data": args.sigma_data} if args.loss == "edm" else {},
            batch_size=args.batch, total_steps=args.steps, lr=args.lr, lr_rampup_kimg=args.lr_rampup,
            ema_halflife_kimg=args.ema, augment=args.augment, augment_p=args.augment_p, seed=args.seed)
        trainer = Trainer(config, dataset, device)
        if args.resume:
            if not state_path.exists():
                raise ValueError(f"--resume: no {state_path}")
            trainer.load_checkpoint(state_path)
    except (ValueError, OSError) as error:
        print(f"edm-serve train: {error}", file=sys.stderr)
        return 2

    outdir.mkdir(parents=True, exist_ok=True)
    command = "edm-serve train " + shlex.join(argv)
    session = {"command": command, "from_step": trainer.step, "to_step": config.total_steps, "wall_time_s": None}
    trainer.history.append(session)
    session_wall = trainer.wall_seconds
    print(f"Training {trainer.parameters:,} parameters on {len(dataset)} images ({dataset.description['name']}) "
          f"on {device}, steps {trainer.step}..{config.total_steps}", file=sys.stderr)
    bar = tqdm.tqdm(total=config.total_steps, initial=trainer.step, unit="step", file=sys.stderr,
                    dynamic_ncols=True)
    recent: list[float] = []
    window_start = [time.perf_counter(), trainer.step]
    with open(outdir / LOG_FILE, "a", encoding="utf-8") as log:
        def on_step(step: int, loss: float) -> None:
            recent.append(loss)
            del recent[:-100]
            bar.update(1)
            if step % 10 == 0 or step == config.total_steps:
                now = time.perf_counter()
                rate = (step - window_start[1]) * config.batch_size / max(now - window_start[0], 1e-9)
                window_start[:] = [now, step]
                avg = sum(recent) / len(recent)
                bar.set_postfix(loss=f"{avg:.4f}", img_s=f"{rate:.0f}")
                if step % 50 == 0 or step == config.total_steps:
                    log.write(json.dumps({"step": step, "kimg": step * config.batch_size / 1000, "loss": avg,
                                          "images_per_s": rate, "wall_s": trainer.wall_seconds}) + "\n")
                    log.flush()

        trainer.run(checkpoint_path=state_path, checkpoint_every=args.checkpoint_every, on_step=on_step)
    bar.close()
    session["wall_time_s"] = round(trainer.wall_seconds - session_wall, 1)
    trainer.save_checkpoint(state_path)  # with this session's wall time

    final_loss = sum(recent) / len(recent) if recent else None
    provenance = {
        "trained_by": "edm-serve train",
        # Every session of the run, in order: running these commands again reproduces the weights
        # bit for bit on the same device type (resume is exact).
        "command": " && ".join(entry["command"] for entry in trainer.history),
        "sessions": trainer.history,
        "data": dataset.description,
        "loss": config.loss,
        "config": config.to_dict(),
        "steps": trainer.step,
        "images_seen": trainer.step * config.batch_size,
        "wall_time_s": round(trainer.wall_seconds, 1),
        "device": str(device),
        "torch_threads": torch.get_num_threads() if device.type == "cpu" else None,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "train_loss_last_100_steps": final_loss,
        "validation_loss_ema": validation_loss(trainer.ema, trainer.loss_fn, dataset),
        "weights": "EMA",
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    card = save_model(trainer.ema, out, name=args.name or out.stem, class_names=dataset.class_names,
                      provenance=provenance, init_kwargs=trainer.precond_init_kwargs)
    print(f"Saved {out} ({card.parameters:,} parameters, {trainer.step} steps, "
          f"{trainer.wall_seconds / 60:.1f} min).", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
