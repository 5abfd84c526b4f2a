"""Sample quality of a class-conditional digits model: class accuracy and a Fréchet distance.

FID's recipe, shrunk to 8x8 digits: instead of Inception features we use a small CNN that this
module trains on scikit-learn's digits (with a held-out split, whose accuracy we report). Then

* class accuracy: the share of class-conditional samples that the classifier assigns to the class
  they were generated for;
* Fréchet distance (FD): fit a Gaussian to the classifier's penultimate-layer features of the real
  digits (all 1,797) and one to those of the samples, and measure
      FD = ||mu_r - mu_s||^2 + Tr(S_r + S_s - 2 (S_r S_s)^(1/2)).
  Lower is better; like FID it is biased upwards for small sample counts, so only compare FDs
  measured with the same number of samples.

Sampling goes through model.generate (the sampler the service runs), and samples are scored as
the PNG pixels a user would get: x = (pixel - 127.5) / 127.5.

The classifier is retrained on every evaluation, deterministically for a given platform; another
torch build or CPU gives slightly different weights (e.g. 98.9% vs 99.1% held-out accuracy), so
compare figures measured with the same software, as eval.json records it.

The sweep's sampler presets (PRESETS) are the four columns of Table 1 of the paper (VP, VE,
iDDPM+DDIM, EDM) plus Euler on EDM time steps and the stochastic sampler (Algorithm 2).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from model.data import load_digits_dataset
from model.generate import EvalEvent, generate
from model.precond import Precond
from model.samplers import SamplerSettings

__all__ = [
    "PRESETS",
    "TABLE1",
    "Classifier",
    "DigitCNN",
    "RunResult",
    "evaluate_run",
    "frechet_distance",
    "gaussian_stats",
    "num_steps_for",
    "plot_sweep",
    "real_data_fd",
    "reference_stats",
    "sample_grid_png",
    "sample_images",
    "settings_for",
    "train_classifier",
]

# name -> (description, sampler settings other than num_steps). A solver of None means Heun.
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "VP": ("Table 1 VP column: Euler, vp time steps, vp schedule, vp scaling",
           {"solver": "euler", "discretization": "vp", "schedule": "vp", "scaling": "vp"}),
    "VE": ("Table 1 VE column: Euler, ve time steps, ve schedule, no scaling",
           {"solver": "euler", "discretization": "ve", "schedule": "ve", "scaling": "none"}),
    "iDDPM+DDIM": ("Table 1 iDDPM+DDIM column: Euler, iddpm time steps, linear schedule, no scaling",
                   {"solver": "euler", "discretization": "iddpm", "schedule": "linear", "scaling": "none"}),
    "EDM": ("Table 1 EDM column: Heun, edm (rho = 7) time steps, linear schedule, no scaling "
            "(the default sampler, Algorithm 1)", {}),
    "Euler+EDM steps": ("Euler with EDM time steps, linear schedule, no scaling",
                        {"solver": "euler", "discretization": "edm", "schedule": "linear", "scaling": "none"}),
    "EDM stochastic": ("Algorithm 2: Heun, EDM steps, S_churn 40, S_min 0.05, S_max 50, S_noise 1.003 "
                       "(the paper's ImageNet-64 settings)",
                       {"S_churn": 40.0, "S_min": 0.05, "S_max": 50.0, "S_noise": 1.003}),
}
TABLE1 = ("VP", "VE", "iDDPM+DDIM", "EDM")


def num_steps_for(nfe: int, solver: str | None) -> int:
    """N for a budget of `nfe` evaluations: Euler uses N, Heun 2N - 1 (so odd NFEs for Heun)."""
    return max(nfe, 2) if solver == "euler" else max((nfe + 1) // 2, 2)


def settings_for(preset: str, nfe: int) -> SamplerSettings:
    _, kwargs = PRESETS[preset]
    return SamplerSettings(num_steps=num_steps_for(nfe, kwargs.get("solver")), **kwargs).validate()


# ---------------------------------------------------------------------------------------------
# The digit classifier


class DigitCNN(nn.Module):
    """Conv stages 8x8 -> 4x4 -> 2x2, a 64-d feature layer, and the class logits (small: it is
    retrained, deterministically, on every evaluation)."""

    feature_dim = 64

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(64 * 2 * 2, self.feature_dim), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(self.feature_dim, num_classes))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(logits, penultimate features) of images in [-1, 1]."""
        features = self.features(self.conv(x))
        return self.head(features), features


@dataclass
class Classifier:
    net: DigitCNN
    heldout_accuracy: float
    train_size: int
    test_size: int
    info: dict[str, Any] = field(default_factory=dict)

    @torch.no_grad()
    def __call__(self, images: Tensor, batch: int = 1024) -> tuple[Tensor, Tensor]:
        """(predicted class, features float64) for images [N, 1, 8, 8] in [-1, 1]."""
        device = next(self.net.parameters()).device
        preds, feats = [], []
        for chunk in images.split(batch):
            logits, features = self.net(chunk.to(device, torch.float32))
            preds.append(logits.argmax(1).cpu())
            feats.append(features.cpu().to(torch.float64))
        return torch.cat(preds), torch.cat(feats)


def _shift(images: Tensor, generator: torch.Generator) -> Tensor:
    """Random whole-pixel shifts by -1..1 (background -1 filled in): the classifier should not care
    whether a generated digit sits one pixel off the data's centring."""
    padded = F.pad(images, (1, 1, 1, 1), value=-1.0)
    dx, dy = torch.randint(0, 3, [2], generator=generator).tolist()
    return padded[:, :, dy:dy + 8, dx:dx + 8]


def train_classifier(*, seed: int = 0, test_fraction: float = 0.25, epochs: int = 40, batch: int = 64,
                     device: torch.device | str = "cpu") -> Classifier:
    """Train DigitCNN on a stratified (1 - test_fraction) split of load_digits, deterministically on
    the CPU, and measure it on the rest. The global RNG is left untouched."""
    from sklearn.model_selection import train_test_split

    data = load_digits_dataset()
    assert data.labels is not None
    index = np.arange(len(data))
    train_idx, test_idx = train_test_split(index, test_size=test_fraction, random_state=seed,
                                           stratify=data.labels.numpy())
    x_train, y_train = data.images[train_idx], data.labels[train_idx]
    x_test, y_test = data.images[test_idx], data.labels[test_idx]

    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        net = DigitCNN(len(data.class_names or []))
        optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
        net.train()
        for _ in range(epochs):
            order = torch.randperm(len(x_train), generator=g)
            for rows in order.split(batch):
                logits, _ = net(_shift(x_train[rows], g))
                loss = F.cross_entropy(logits, y_train[rows])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            scheduler.step()
    net.eval().requires_grad_(False)
    classifier = Classifier(net, 0.0, len(train_idx), len(test_idx))
    predicted, _ = classifier(x_test)
    classifier.heldout_accuracy = float((predicted == y_test).double().mean())
    classifier.info = {
        "architecture": "DigitCNN: conv16-conv32-pool-conv64-pool-fc64(features)-dropout-fc10",
        "feature_dim": DigitCNN.feature_dim,
        "data": "sklearn.datasets.load_digits, stratified split "
                f"(train_test_split test_size={test_fraction}, random_state={seed})",
        "train_size": len(train_idx),
        "test_size": len(test_idx),
        "heldout_accuracy": classifier.heldout_accuracy,
        "epochs": epochs,
        "train_seconds": round(time.perf_counter() - start, 1),
    }
    classifier.net.to(device)
    return classifier


# ---------------------------------------------------------------------------------------------
# Fréchet distance


def gaussian_stats(features: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(features, dtype=np.float64)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).

    Tr (S1 S2)^(1/2) = Tr (S1^(1/2) S2 S1^(1/2))^(1/2): the inner matrix is symmetric PSD, so its
    square-root trace is the sum of the square roots of its eigenvalues (no complex sqrtm needed)."""
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = root1 @ sigma2 @ root1
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_sqrt)


# ---------------------------------------------------------------------------------------------
# Sampling and scoring


@dataclass
class RunResult:
    name: str
    settings: SamplerSettings
    nfe: int
    num_samples: int
    accuracy: float
    per_class_accuracy: list[float]
    fd: float
    seconds: float
    images: Tensor  # [N, 1, R, R] in [-1, 1] (as decoded from the pixels)
    labels: Tensor

    def to_dict(self) -> dict[str, Any]:
        s = self.settings
        return {
            "name": self.name,
            "nfe": self.nfe,
            "num_steps": s.num_steps,
            "solver": s.solver or "heun",
            "discretization": s.discretization or "edm",
            "schedule": s.schedule or "linear",
            "scaling": s.scaling or "none",
            "stochastic": s.S_churn > 0,
            "settings": {k: (v if not (isinstance(v, float) and math.isinf(v)) else "Infinity")
                         for k, v in s.as_dict().items()},
            "num_samples": self.num_samples,
            "accuracy": self.accuracy,
            "per_class_accuracy": self.per_class_accuracy,
            "fd": self.fd,
            "seconds": round(self.seconds, 2),
        }


def sample_images(net: Precond, seeds: Sequence[int], labels: Sequence[int], settings: SamplerSettings, *,
                  batch: int = 500, on_progress: Callable[[int], None] | None = None) -> Tensor:
    """Class-conditional samples as [N, C, R, R] in [-1, 1], decoded from their PNG pixels."""
    out: list[Tensor] = []

    def on_eval(event: EvalEvent) -> None:
        if on_progress is not None:
            on_progress(len(event.rows))

    for start in range(0, len(seeds), batch):
        images = generate(net, list(seeds[start:start + batch]), list(labels[start:start + batch]), settings,
                          on_eval=on_eval)
        pixels = np.stack([image.pixels for image in images if image is not None])
        out.append(torch.from_numpy(pixels).permute(0, 3, 1, 2).to(torch.float32))
    return (torch.cat(out) - 127.5) / 127.5


def evaluate_run(net: Precond, classifier: Classifier, reference: tuple[np.ndarray, np.ndarray], name: str,
                 settings: SamplerSettings, *, num_samples: int, num_classes: int = 10, batch: int = 500,
                 on_progress: Callable[[int], None] | None = None) -> RunResult:
    """Sample seeds 0..num_samples-1 with class = seed mod num_classes; score accuracy and FD."""
    start = time.perf_counter()
    seeds = list(range(num_samples))
    labels = [seed % num_classes for seed in seeds]
    images = sample_images(net, seeds, labels, settings, batch=batch, on_progress=on_progress)
    predicted, features = classifier(images)
    target = torch.tensor(labels)
    correct = (predicted == target).double()
    per_class = [float(correct[target == c].mean()) for c in range(num_classes)]
    fd = frechet_distance(*reference, *gaussian_stats(features))
    return RunResult(name, settings, settings.nfe_total, num_samples, float(correct.mean()), per_class, fd,
                     time.perf_counter() - start, images, target)


def reference_stats(classifier: Classifier) -> tuple[np.ndarray, np.ndarray]:
    """Feature Gaussian of all 1,797 real digits."""
    _, features = classifier(load_digits_dataset().images)
    return gaussian_stats(features)


def real_data_fd(classifier: Classifier, reference: tuple[np.ndarray, np.ndarray], *, num: int = 1000,
                 seed: int = 0) -> float:
    """FD of `num` real digits against all of them: a floor for what samples can reach at this
    sample count (the sets overlap, so it is optimistic)."""
    data = load_digits_dataset()
    index = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:num]
    _, features = classifier(data.images[index])
    return frechet_distance(*reference, *gaussian_stats(features))


# ---------------------------------------------------------------------------------------------
# Pictures


def sample_grid_png(images: Tensor, rows: int, cols: int, *, scale: int = 8, gap: int = 2) -> bytes:
    """rows x cols tiles of [rows * cols, C, R, R] images in [-1, 1], row-major, nearest upscaled."""
    from model.images import encode_png

    n, c, r, _ = images.shape
    tile = r * scale
    canvas = np.full((rows * tile + (rows + 1) * gap, cols * tile + (cols + 1) * gap, c), 128, np.uint8)
    pixels = ((images * 127.5 + 128).clip(0, 255).to(torch.uint8)).permute(0, 2, 3, 1).numpy()
    for k in range(min(n, rows * cols)):
        i, j = divmod(k, cols)
        up = pixels[k].repeat(scale, axis=0).repeat(scale, axis=1)
        y, x = gap + i * (tile + gap), gap + j * (tile + gap)
        canvas[y:y + tile, x:x + tile] = up
    return encode_png(canvas)


def plot_sweep(results: Sequence[dict[str, Any]], path: str, *, title: str) -> None:
    """FD and class accuracy vs NFE, one line per sampler preset."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_name: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_name.setdefault(r["name"], []).append(r)
    fig, (ax_fd, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, rows in by_name.items():
        rows = sorted(rows, key=lambda r: r["nfe"])
        style = "-" if name in TABLE1 else "--"
        ax_fd.plot([r["nfe"] for r in rows], [r["fd"] for r in rows], style, marker="o", label=name)
        ax_acc.plot([r["nfe"] for r in rows], [100 * r["accuracy"] for r in rows], style, marker="o", label=name)
    nfes = sorted({r["nfe"] for r in results})
    for ax in (ax_fd, ax_acc):
        ax.set_xscale("log")
        ax.set_xticks(nfes, [str(n) for n in nfes])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("NFE (network evaluations per image)")
        ax.grid(True, which="both", alpha=0.3)
    ax_fd.set_yscale("log")
    ax_fd.set_ylabel("Fréchet distance (classifier features), lower is better")
    ax_acc.set_ylabel("class accuracy of samples (%)")
    ax_fd.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
