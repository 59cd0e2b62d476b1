"""The embedded default model: a small CNN on scikit-learn's 8x8 digits, trained on first use.

Training is deterministic from the recipe (seed included) and always runs on the CPU with the
recipe's number of intra-op threads: float sums are split by thread count, so a 1-thread and a
2-thread training give different weights, and the cache must not depend on which process (a
`harness run`, a test session) trained first. The cache key is a hash of the recipe.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

__all__ = ["DigitsCNN", "RECIPE", "noise_recipe", "recipe_for", "digits_cnn", "cache_dir", "train_digits_cnn"]

# threads: 2, what a first `harness run` used on the 2-core machines the figures in the README and
# the tests were measured with
RECIPE = {"arch": "digits-cnn/v1", "seed": 0, "epochs": 30, "batch_size": 64, "lr": 1e-3, "split": "sklearn-digits/75-25/seed0",
          "threads": 2}


class DigitsCNN(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def noise_recipe(sigma: float) -> dict:
    """The builtin recipe trained under Gaussian noise of standard deviation `sigma` (every batch, [0, 1]
    input space, not clipped): `model: {source: builtin:digits-cnn, kwargs: {noise_sigma: 0.25}}`."""
    return {**RECIPE, "noise_sigma": float(sigma)}


def recipe_for(kwargs: dict) -> dict:
    """The recipe `model: {source: builtin:digits-cnn, kwargs: ...}` names: RECIPE, or with `noise_sigma`
    the recipe trained under that noise. BadInput naming the key for any other kwarg or a bad sigma."""
    from harness.core.errors import BadInput

    unknown = sorted(set(kwargs) - {"noise_sigma"})
    if unknown:
        raise BadInput(f"model.kwargs.{unknown[0]}", "builtin:digits-cnn takes only `noise_sigma` (train under Gaussian noise of that "
                       "standard deviation, for randomized smoothing)")
    sigma = kwargs.get("noise_sigma")
    if sigma is None:
        return RECIPE
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not 0 < sigma < float("inf"):
        raise BadInput("model.kwargs.noise_sigma", f"must be a positive number, got {sigma!r}")
    return noise_recipe(sigma)


def cache_dir() -> Path:
    """HARNESS_CACHE_DIR, else $XDG_CACHE_HOME/harness, else ~/.cache/harness."""
    if os.environ.get("HARNESS_CACHE_DIR"):
        return Path(os.environ["HARNESS_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "harness"


def recipe_key(recipe: dict) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((net(x).argmax(1) == y).float().mean())


def train_digits_cnn(recipe: dict = RECIPE) -> tuple[DigitsCNN, float]:
    """Trains the model from the recipe on the digits train split, with the recipe's thread count;
    returns it and its test accuracy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(recipe.get("threads", threads))
    try:
        return _train(recipe)
    finally:
        torch.set_num_threads(threads)


def _train(recipe: dict) -> tuple[DigitsCNN, float]:
    from harness.sources.data import digits_split

    x_tr, y_tr = digits_split("train")
    x_te, y_te = digits_split("test")
    torch.manual_seed(recipe["seed"])
    g = torch.Generator().manual_seed(recipe["seed"])
    net = DigitsCNN()
    opt = torch.optim.Adam(net.parameters(), lr=recipe["lr"])
    loss_fn = nn.CrossEntropyLoss()
    sigma = float(recipe.get("noise_sigma", 0.0))
    for _ in range(recipe["epochs"]):
        net.train()
        for batch in torch.randperm(len(y_tr), generator=g).split(recipe["batch_size"]):
            opt.zero_grad()
            xb = x_tr[batch]
            if sigma > 0:  # Gaussian augmentation (Cohen et al. 2019): the model a smoothing certificate needs
                xb = xb + sigma * torch.randn(xb.shape, generator=g)
            loss_fn(net(xb), y_tr[batch]).backward()
            opt.step()
    net.eval()
    return net, accuracy(net, x_te, y_te)


def weights_path(recipe: dict = RECIPE) -> Path:
    """Where the builtin model trained by `recipe` is cached."""
    return cache_dir() / "models" / f"digits-cnn-{recipe_key(recipe)}.safetensors"  # RECIPE's key is the one it always had


def digits_cnn(recipe: dict = RECIPE) -> tuple[DigitsCNN, Path]:
    """The trained builtin model, from the cache or trained now (a few seconds) and cached."""
    from safetensors.torch import load_file, save_file

    from harness.core.files import atomic_path

    path = weights_path(recipe)
    net = DigitsCNN()
    if path.is_file():
        try:
            net.load_state_dict(load_file(str(path)))
            return net.eval(), path
        except Exception:
            pass  # a damaged cache entry is retrained, not trusted
    net, test_acc = train_digits_cnn(recipe)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(net.state_dict(), str(tmp), metadata={"recipe": json.dumps(recipe), "test_accuracy": f"{test_acc:.4f}"})
    return net, path
