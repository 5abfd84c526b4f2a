"""`edm-serve sample | inspect | convert` as a user runs them: a real process, real files."""

import json
import os
import subprocess
import sys

import pytest

from model.checkpoint import save_model
from model.cli import parse_int_list
from tests.model.test_generate import TINY_KWARGS, tiny_net


def edm_serve(*args, cwd=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "service.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.json"
    save_model(tiny_net(), path, name="tiny", class_names=[str(i) for i in range(10)], init_kwargs=TINY_KWARGS)
    return str(path)


def test_seed_list_syntax():
    assert parse_int_list("1,2,5-10") == [1, 2, 5, 6, 7, 8, 9, 10]
    assert parse_int_list("0-3") == [0, 1, 2, 3]
    for bad in ("a", "5-2", "1,,2", "-3"):
        with pytest.raises(Exception, match="seed|range"):
            parse_int_list(bad)


def test_sample_writes_reproducible_pngs(checkpoint, tmp_path):
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    r = edm_serve("sample", "--model", checkpoint, "--seeds", "0-4", "--batch", "2", "--steps", "4",
                  "--outdir", str(out_a), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out_a)) == [f"{s:06d}.png" for s in range(5)]
    r = edm_serve("sample", "--model", checkpoint, "--seeds", "4,0-3", "--batch", "5", "--steps", "4",
                  "--outdir", str(out_b), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    for name in os.listdir(out_a):  # other batching, same bytes
        assert (out_a / name).read_bytes() == (out_b / name).read_bytes()


def test_sample_subdirs_and_class(checkpoint, tmp_path):
    r = edm_serve("sample", "--model", checkpoint, "--seeds", "999-1000", "--subdirs", "--class", "3",
                  "--steps", "3", "--outdir", str(tmp_path), "--S_churn", "10")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "000000" / "000999.png").exists() and (tmp_path / "001000" / "001000.png").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--class", "10"], "--class must be below 10"),
    (["--steps", "1"], "--steps"),
    (["--solver", "rk4"], "--solver"),
    (["--sigma_min", "-1"], "--sigma_min"),
])
def test_sample_rejects_bad_options(checkpoint, tmp_path, args, message):
    r = edm_serve("sample", "--model", checkpoint, "--outdir", str(tmp_path), "--seeds", "0", *args)
    assert r.returncode == 2 and message in r.stderr


def test_sample_missing_model_is_a_clear_error(tmp_path):
    r = edm_serve("sample", "--model", str(tmp_path / "nope.pkl"), "--outdir", str(tmp_path), "--seeds", "0")
    assert r.returncode == 2 and "nope.pkl" in r.stderr and "Traceback" not in r.stderr


def test_inspect_prints_the_card(checkpoint):
    r = edm_serve("inspect", checkpoint)
    assert r.returncode == 0, r.stderr
    card = json.loads(r.stdout)
    assert card["label_dim"] == 10 and card["class_names"][3] == "3" and card["parameters"] > 10_000


def test_unknown_command_is_usage_error():
    r = edm_serve("frobnicate")
    assert r.returncode == 2 and "unknown command" in r.stderr
