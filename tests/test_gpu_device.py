"""The one command for a lent GPU (``make gpu-check``: ``benchmarks.gpu_device``) and what it runs
(``benchmarks.gpu_check``, ``benchmarks.wan_rank``).

The command is proven here the closest way this machine allows: with ``--small``, in a bare
virtualenv laid out like the lent machine's image, holding torch, the image's packages that the
checks import (at the image's versions where the device's notes give them) and nothing else, plus
the carried wheels (this machine's cp311 builds of the versions ``make gpu-wheels`` fetches).

Cost: the wheels (about 11 MiB, from pip's cache or PyPI), the virtualenv and the installed wheels
are kept under ``build/gpu-bare`` between runs. On a clean clone the test took 30 s on this 2-core
machine (both parts' own runs 14 s of it), up to a minute and a half with other work sharing
the cores. Without a reachable package index and nothing kept, it is skipped.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

from benchmarks import gpu_wheels, wan_rank

ROOT = Path(__file__).resolve().parents[1]
BARE = ROOT / "build" / "gpu-bare"
INDEX = "https://pypi.org/simple/"
VENV_OWN = ("pip", "setuptools")   # the image's own: this virtualenv's pip is linked, setuptools left out


def _index_reachable() -> bool:
    try:
        urllib.request.urlopen(INDEX + "pip/", timeout=15).close()
        return True
    except OSError:
        return False


def _requirements(name: str) -> list[str]:
    """The distributions ``name`` needs on this interpreter (no extras)."""
    names = []
    for text in importlib.metadata.requires(name) or []:
        requirement = Requirement(text)
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            names.append(requirement.name)
    return names


def _image_closure() -> dict[str, str]:
    """``gpu_wheels.IMAGE`` and what it needs, as this virtualenv has them (name: version), less
    what the image lacks, what is installed at the image's own version, and what every virtualenv
    has."""
    lacking = set(gpu_wheels.CARRIED) - set(gpu_wheels.IMAGE)
    skip = {gpu_wheels.normalized(name) for name in (*lacking, *gpu_wheels.IMAGE_VERSIONS, *VENV_OWN)}
    found, todo = {}, list(gpu_wheels.IMAGE)
    while todo:
        name = todo.pop()
        key = gpu_wheels.normalized(name)
        if key in skip or key in found:
            continue
        try:
            found[key] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        todo.extend(_requirements(name))
    return found


def _link(name: str, site: Path) -> None:
    """This virtualenv's installed files of distribution ``name``, linked into ``site``."""
    distribution = importlib.metadata.distribution(name)
    base = Path(distribution.locate_file(""))
    for top in sorted({Path(file).parts[0] for file in distribution.files or ()}):
        if top in ("..", "__pycache__") or top.endswith(".pth"):
            continue
        target = site / top
        if not target.is_symlink():
            target.symlink_to(base / top)


def _bare_virtualenv(venv: Path) -> Path:
    """The virtualenv (kept while what it should hold is unchanged); its python."""
    python = venv / "bin" / "python"
    linked = _image_closure()
    stamp = json.dumps({"linked": linked, "image": gpu_wheels.IMAGE_VERSIONS}, sort_keys=True)
    marker = venv / "image.json"
    site = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    if marker.exists() and marker.read_text() == stamp and all(link.exists() for link in site.iterdir()):
        return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", "--without-pip", str(venv)], check=True)
    for name in (*linked, "pip"):
        _link(name, site)
    pinned = [f"{name}=={version}" for name, version in gpu_wheels.IMAGE_VERSIONS.items()]
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", *pinned], check=True)
    marker.write_text(stamp)
    return python


@pytest.mark.distributed
@pytest.mark.timeout(900)
def test_the_gpu_command_runs_in_a_bare_virtualenv(tmp_path):
    try:
        wheels = gpu_wheels.download(BARE / "wheels", python=platform.python_version())
        python = _bare_virtualenv(BARE / "venv")
    except subprocess.CalledProcessError:
        if _index_reachable():
            raise
        pytest.skip(f"pip cannot reach {INDEX} and build/gpu-bare holds no copy of the carried wheels")
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["OMP_NUM_THREADS"] = "1"
    bare = subprocess.run([str(python), "-c", "import torch, transformers, numpy; import diffusers"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert "No module named 'diffusers'" in bare.stderr, bare.stderr[-2000:]   # only the wheels bring it

    done = subprocess.run([str(python), "-m", "benchmarks.gpu_device", "--small", "--wheels", str(wheels[0].parent),
                           "--site", str(BARE / "site"), "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=800)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    summary = json.loads((tmp_path / "gpu_device.json").read_text())
    assert summary["small"] and summary["wheels"] == sorted(path.name for path in wheels)
    assert {name: part["returncode"] for name, part in summary["parts"].items()} == {"gpu_check": 0, "wan_rank": 0}
    check = json.loads((tmp_path / "gpu_check.json").read_text())
    rank = json.loads((tmp_path / "wan_rank.json").read_text())
    assert check["status"] == rank["status"] == 0 and check["small"] and rank["small"]
    assert check["accuracy_max_relative_error"]["reference_vectors"] < 1e-4
    assert rank["setup"]["attention_backend"] and rank["setup"]["diffusers"] == importlib.metadata.version("diffusers")
    assert (tmp_path / "gpu_device.log").read_text().count("[wan_rank] vae done") == 1
    shape = wan_rank.SMALL_RANK
    loops = rank["loops"]
    assert loops["none"]["nfe"] == shape.steps and loops["none"]["speedup_wall"] == 1.0
    assert loops["paper"]["nfe"] < shape.steps and loops[f"target_nfe_{shape.target_nfe}"]["nfe"] <= shape.target_nfe
    assert all(row["host_syncs"] is None and row["finite"] for row in loops.values())   # counted on CUDA only
    assert rank["calls"]["forecast_ms"] < rank["calls"]["real_ms"]
    assert [row["rows"] for row in rank["batch"]] == list(wan_rank.ROWS)
    assert set(rank["forecaster"]) >= {"update", "forecast", "score"}
    assert rank["vae"]["frames"] == 1 + 4 * (shape.video_latent[0] - 1)


def test_the_carried_wheels_are_one_of_each_and_stale_ones_go(tmp_path):
    """A wheel of another version left from an earlier download is removed, a wanted one kept."""
    (tmp_path / "ftfy-0.0.1-py3-none-any.whl").write_bytes(b"")
    kept = tmp_path / "pydantic-2.0.0-py3-none-any.whl"
    kept.write_bytes(b"")
    wheels = gpu_wheels.download(tmp_path, versions={"pydantic": "2.0.0"})
    assert wheels == [kept] and not (tmp_path / "ftfy-0.0.1-py3-none-any.whl").exists()
    assert set(gpu_wheels.carried_versions()) == set(gpu_wheels.CARRIED)


def test_the_rank_attention_is_diffusers_at_degree_one_and_keeps_shapes_at_two():
    """Ulysses' layout on one device: at degree 1 the processor computes what diffusers' does;
    at degree 2 it attends at half the heads over twice the tokens and gives the same shape back."""
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    torch.manual_seed(0)
    model = wan_rank.build_model(wan_rank.SMALL_WAN, torch.device("cpu"), torch.float32)
    inputs = wan_rank.Inputs(wan_rank.SMALL_WAN, wan_rank.SMALL_RANK, 1, torch.device("cpu"), torch.float32)
    timestep = inputs.timestep(500.0)
    stock = wan_rank.call(model, inputs.latents, timestep, inputs.text)
    shapes = []

    def attention(q, k, v):
        shapes.append(tuple(q.shape))
        return wan_rank.torch_attention(q, k, v)

    for degree in (1, 2):
        for block in model.blocks:
            block.attn1.set_processor(wan_rank.UlyssesRankAttention(degree, attention))
        out = wan_rank.call(model, inputs.latents, timestep, inputs.text)
        assert out.shape == stock.shape and torch.isfinite(out).all()
        if degree == 1:
            torch.testing.assert_close(out, stock, rtol=1e-4, atol=1e-5)
    tokens, heads = wan_rank.SMALL_RANK.tokens(), wan_rank.SMALL_WAN["num_attention_heads"]
    assert shapes[0] == (1, heads, tokens, 16) and shapes[-1] == (1, heads // 2, 2 * tokens, 16)
    for block in model.blocks:
        block.attn1.set_processor(WanAttnProcessor())
    torch.testing.assert_close(wan_rank.call(model, inputs.latents, timestep, inputs.text), stock)
