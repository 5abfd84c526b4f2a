"""`edm-serve generate` against the real stack: frames, final images, animation; errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from model.images import decode_png
from service.grpc.stubs import service_pb2
from tests.grpc.conftest import Stack, spec
from tests.integration.servers import ROOT

pytestmark = [pytest.mark.integration]


def generate(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "service.cli", "generate", "--server", stack.target, *args],
                          cwd=ROOT, env=stack.env, capture_output=True, text=True, timeout=120)


def test_stream_writes_frames_images_and_an_animation(stack: Stack, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = generate(stack, "--seeds", "2,3", "--class", "5", "--steps", "4", "--stream", "--outdir", str(out))
    assert run.returncode == 0, run.stderr
    assert "sampling" in run.stderr and "7/7" in run.stderr  # the progress bar, over 2N-1 evaluations
    unary = stack.stub.Generate(service_pb2.GenerateRequest(spec=spec(seeds=[2, 3], class_index=5,
                                                                      sampler={"num_steps": 4})), timeout=60)
    for image in unary.images:
        name = f"{image.seed:06d}"
        assert (out / f"{name}.png").read_bytes() == image.png
        frames = sorted((out / "frames" / name).glob("*.png"))
        assert [f.name for f in frames] == [f"{k:04d}.png" for k in range(1, 8)]
        assert decode_png(frames[0].read_bytes()).shape == (16, 16, 1)
        with Image.open(out / f"{name}.gif") as gif:
            # 7 frames and the final image, enlarged (GIF merges the last x0 with an equal final image)
            assert gif.n_frames in (7, 8) and gif.size == (256, 256)
    assert set(run.stdout.split()) == {str(out / f"{s:06d}.{ext}") for s in (2, 3) for ext in ("png", "gif")}

    plain = generate(stack, "--seeds", "3", "--class", "5", "--steps", "4", "--outdir", str(tmp_path / "plain"))
    assert plain.returncode == 0, plain.stderr
    assert (tmp_path / "plain" / "000003.png").read_bytes() == (out / "000003.png").read_bytes()
    assert not (tmp_path / "plain" / "frames").exists()


def test_errors_are_reported_with_their_status(stack: Stack, tmp_path: Path) -> None:
    run = generate(stack, "--seeds", "1", "--class", "99", "--stream", "--outdir", str(tmp_path))
    assert run.returncode == 1
    assert "INVALID_ARGUMENT: spec.class_label" in run.stderr
