"""`edm-serve generate`: call a running server over gRPC; with --stream, watch the images form.

    edm-serve generate --server 127.0.0.1:50051 --seeds 0-3 --class 7 --stream --outdir out

writes out/000000.png ... (the final images, with their generation metadata), and with --stream
also out/frames/000000/0001.png ... (the denoised estimate x0 after each network evaluation)
and out/000000.gif (an animation of those frames ending on the final image; --anim apng for a
lossless APNG). Sampler options have the names and defaults of `edm-serve sample`. The API key
comes from --api-key or EDM_API_KEY. Ctrl-C (or --timeout) cancels the job on the server.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from pathlib import Path
from typing import Any

from model.cli import add_sampler_options, parse_int_list

ENUMS = {"solver": "SOLVER", "discretization": "DISCRETIZATION", "schedule": "SCHEDULE", "scaling": "SCALING"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edm-serve generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", required=True, metavar="HOST:PORT", help="the gateway's gRPC address")
    parser.add_argument("--outdir", required=True, metavar="DIR", help="where to write the images (and frames)")
    parser.add_argument("--model", default="", help="model name [default: the server's default model]")
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seeds", type=parse_int_list, metavar="LIST", help="seeds, e.g. 1,2,5-10 [default: 0]")
    seeds.add_argument("--count", type=int, metavar="N", help="N images from seeds --start.. (see --start)")
    parser.add_argument("--start", type=int, default=None, metavar="SEED", help="first seed with --count [0]")
    parser.add_argument("--class", dest="class_label", default=None, metavar="INT|NAME",
                        help="class index or name from the model card [default: drawn per seed]")
    add_sampler_options(parser)
    parser.add_argument("--stream", action="store_true", help="stream the events and write every frame")
    parser.add_argument("--preview-every", type=int, default=1, metavar="K",
                        help="with --stream: a frame every K-th network evaluation (and the last) [1]")
    parser.add_argument("--anim", choices=["gif", "apng", "none"], default="gif",
                        help="with --stream: animation of each image's frames [gif]")
    parser.add_argument("--anim-scale", type=int, default=0, metavar="S",
                        help="enlarge the animation S times (nearest neighbour) [0: to at least 256 px]")
    parser.add_argument("--api-key", default=os.environ.get("EDM_API_KEY"), help="[EDM_API_KEY]")
    parser.add_argument("--timeout", type=float, default=None, metavar="S",
                        help="deadline of the call in seconds; the job is cancelled when it passes [none]")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def spec_message(args: argparse.Namespace, job_pb2: Any) -> Any:
    """The command line as a GenerationSpec (unset options keep the server's defaults)."""
    spec = job_pb2.GenerationSpec(model=args.model)
    if args.count is not None:
        spec.count = args.count
        if args.start is not None:
            spec.start = args.start
    else:
        spec.seeds.extend(args.seeds if args.seeds is not None else [args.start or 0])
    if args.class_label is not None:
        if args.class_label.isdigit():
            spec.class_index = int(args.class_label)
        else:
            spec.class_name = args.class_label
    sampler = spec.sampler
    sampler.num_steps = args.num_steps
    for name in ("sigma_min", "sigma_max"):
        if getattr(args, name) is not None:
            setattr(sampler, name, getattr(args, name))
    sampler.rho = args.rho
    sampler.s_churn, sampler.s_min, sampler.s_noise = args.S_churn, args.S_min, args.S_noise
    if args.S_max != float("inf"):
        sampler.s_max = args.S_max
    for name, prefix in ENUMS.items():
        value = getattr(args, name)
        if value is not None:
            setattr(sampler, name, getattr(job_pb2, f"{prefix}_{value.upper()}"))
    return spec


class Output:
    """Writes images, frames and animations under one folder, each named by its seed."""

    def __init__(self, outdir: Path, seeds: list[int], anim: str, anim_scale: int):
        self.outdir = outdir
        self.seeds = seeds                         # image index -> seed (the client always sends them)
        self.anim = anim
        self.anim_scale = anim_scale
        self.frames: dict[int, list[bytes]] = {}   # image index -> PNGs, in order
        self.images: dict[int, Path] = {}
        outdir.mkdir(parents=True, exist_ok=True)

    def frame(self, index: int, nfe: int, png: bytes) -> None:
        self.frames.setdefault(index, []).append(png)
        folder = self.outdir / "frames" / f"{self.seeds[index]:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{nfe:04d}.png").write_bytes(png)

    def image(self, index: int, seed: int, png: bytes) -> Path:
        path = self.images[index] = self.outdir / f"{seed:06d}.png"
        path.write_bytes(png)
        return path

    def animations(self) -> list[Path]:
        if self.anim == "none":
            return []
        written = []
        for index, pngs in sorted(self.frames.items()):
            if index in self.images:
                path = self.outdir / f"{self.seeds[index]:06d}.{self.anim}"
                write_animation(path, [*pngs, self.images[index].read_bytes()], self.anim_scale)
                written.append(path)
        return written


def write_animation(path: Path, pngs: list[bytes], scale: int = 0, frame_ms: int = 80, hold_ms: int = 1500) -> None:
    """An animated GIF or APNG of the PNGs (the last one held longer)."""
    from PIL import Image

    frames: list[Image.Image] = [Image.open(io.BytesIO(png)) for png in pngs]
    width = frames[0].width
    factor = scale if scale > 0 else max(1, -(-256 // width))
    if factor > 1:
        frames = [f.resize((f.width * factor, f.height * factor), Image.Resampling.NEAREST) for f in frames]
    durations = [frame_ms] * (len(frames) - 1) + [hold_ms]
    fmt = "GIF" if path.suffix == ".gif" else "PNG"
    frames[0].save(path, format=fmt, save_all=True, append_images=frames[1:], duration=durations, loop=0)


class Bar:
    """A progress bar over network evaluations (tqdm on stderr), or nothing with --quiet."""

    def __init__(self, quiet: bool):
        self.bar: Any = None
        self.quiet = quiet

    def status(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description(text)
        elif not self.quiet:
            print(text, file=sys.stderr, flush=True)

    def progress(self, event: Any) -> None:
        if self.quiet:
            return
        import tqdm

        if self.bar is None or self.bar.total != event.nfe_total or event.nfe < self.bar.n:
            self.close()
            self.bar = tqdm.tqdm(total=event.nfe_total, unit="eval", file=sys.stderr, desc="sampling")
        self.bar.update(event.nfe - self.bar.n)
        self.bar.set_postfix(step=f"{event.step}/{event.num_steps}", sigma=f"{event.sigma:.3g}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.preview_every < 0:
        print("edm-serve generate: --preview-every must be >= 0", file=sys.stderr)
        return 2
    import grpc

    from service.grpc.stubs import job_pb2, service_grpc, service_pb2

    metadata = [("authorization", f"Bearer {args.api_key}")] if args.api_key else []
    spec = spec_message(args, job_pb2)
    seeds = list(spec.seeds) or list(range(spec.start, spec.start + spec.count))
    out = Output(Path(args.outdir), seeds, args.anim, args.anim_scale)
    with grpc.insecure_channel(args.server) as channel:
        stub = service_grpc.GenerationServiceStub(channel)
        try:
            if not args.stream:
                response = stub.Generate(service_pb2.GenerateRequest(spec=spec), metadata=metadata,
                                         timeout=args.timeout)
                for image in response.images:
                    print(out.image(image.index, image.seed, image.png))
                return 0
            return _stream(stub, service_pb2, spec, args, metadata, out)
        except grpc.RpcError as error:
            print(f"edm-serve generate: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:  # the call is cancelled as the channel closes, and with it the job
            print("edm-serve generate: cancelled", file=sys.stderr)
            return 130


def _stream(stub: Any, service_pb2: Any, spec: Any, args: argparse.Namespace, metadata: list[tuple[str, str]],
            out: Output) -> int:
    request = service_pb2.GenerateStreamRequest(spec=spec, preview_every=args.preview_every)
    call = stub.GenerateStream(request, metadata=metadata, timeout=args.timeout)
    bar = Bar(args.quiet)
    try:
        for response in call:
            event = response.event
            kind = event.WhichOneof("event")
            if kind == "queued":
                bar.status(f"job {event.job_id}: queued (position {event.queued.position})")
            elif kind == "started":
                bar.status(f"job {event.job_id}: started on {event.started.worker}")
            elif kind == "progress":
                bar.progress(event.progress)
                for frame in event.progress.frames:
                    out.frame(frame.index, event.progress.nfe, frame.png)
            elif kind == "image":
                image = event.image.image
                path = out.image(image.index, image.seed, image.png)
                bar.close()
                print(path)
            elif kind == "done":
                bar.close()
                for path in out.animations():
                    print(path)
                return 0
            elif kind == "error":
                bar.close()
                print(f"edm-serve generate: job {event.job_id} {_status_name(event.error.status)}: "
                      f"{event.error.message}", file=sys.stderr)
                return 1
    except KeyboardInterrupt:
        call.cancel()  # the server cancels the job at its next network evaluation
        bar.close()
        print("edm-serve generate: cancelled", file=sys.stderr)
        return 130
    finally:
        bar.close()
    print("edm-serve generate: the stream ended before the job did", file=sys.stderr)
    return 1


def _status_name(status: int) -> str:
    from service.grpc.stubs import job_pb2

    return str(job_pb2.JobStatus.Name(status)).removeprefix("JOB_STATUS_").lower()
