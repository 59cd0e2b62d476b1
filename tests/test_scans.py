"""Poisoning scans: penultimate features, activation clustering and spectral signatures on planted
poison (synthetic clusters, then a backdoored digits model), scan reports, Neural Cleanse on a
backdoored and a clean model, and (slow) ART's implementations of the same algorithms side by side."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from torch import nn

from harness.attacks.scans import (
    ANOMALY_THRESHOLD,
    activation_clustering,
    anomaly_index,
    neural_cleanse,
    penultimate,
    scan_report,
    spectral_signatures,
    write_flagged,
)
from tests.conftest import tiny_linear

# The tests' backdoor: a white 3x3 patch in the bottom-right corner of training digits drawn from
# classes 1-9 and relabelled 0; the builtin architecture trained on them for 10 epochs. Two doses:
# 2% of the training set (16% of class 0) for the training-set scans, whose rules assume the poison
# is a minority of its class, and 5% (33% of class 0) for Neural Cleanse, which needs a trigger
# smaller than the ones the clean classes take. At 2% the model needs the whole patch (9 pixels),
# as large as those (measured: Neural Cleanse index 1.75 with NC_FAST); at 10%, half of class 0 is
# poison and the data scans find none of it (measured: activation clustering recall 0.0,
# spectral signatures 0.13 at eps 0.05).
TARGET = 0
PATCH = 3
SCAN_DOSE = 0.02
NC_DOSE = 0.05


def _stamp(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[..., -PATCH:, -PATCH:] = 1.0
    return x


def _predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1)


def _backdoor(x: torch.Tensor, y: torch.Tensor, dose: float, seed: int = 0):
    """(model, poisoned x, poisoned y, poisoned positions): a few seconds of training."""
    from harness.sources.builtin import DigitsCNN
    from harness.sources.models import BoundedModel

    g = torch.Generator().manual_seed(seed)
    sources = (y != TARGET).nonzero().flatten()
    poisoned = sources[torch.randperm(sources.numel(), generator=g)[: int(dose * len(y))]].sort().values
    xp, yp = x.clone(), y.clone()
    xp[poisoned], yp[poisoned] = _stamp(x[poisoned]), TARGET
    torch.manual_seed(seed)
    net = DigitsCNN()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(10):
        for batch in torch.randperm(len(yp), generator=g).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(net(xp[batch]), yp[batch]).backward()
            opt.step()
    return BoundedModel(net), xp, yp, poisoned


@pytest.fixture(scope="module")
def digits_train() -> tuple[torch.Tensor, torch.Tensor]:
    from harness.sources.data import digits_split

    return digits_split("train")


@pytest.fixture(scope="module")
def scanned(digits_train):
    """The 2% backdoor and the penultimate features of its poisoned training set."""
    model, xp, yp, poisoned = _backdoor(*digits_train, SCAN_DOSE)
    return model, penultimate(model, xp), yp, poisoned


@pytest.fixture(scope="module")
def backdoored(digits_train):
    return _backdoor(*digits_train, NC_DOSE)[0]


@pytest.fixture(scope="module")
def clean_features(wrapped_digits, digits_train) -> torch.Tensor:
    return penultimate(wrapped_digits, digits_train[0])


@pytest.mark.parametrize("fixture", ["scanned", "backdoored"])
def test_the_backdoors_work(request, fixture, digits_test):
    model = request.getfixturevalue(fixture)
    model = model[0] if isinstance(model, tuple) else model
    x, y = digits_test
    assert float((_predict(model, x) == y).float().mean()) > 0.95  # still a good digits model
    assert float((_predict(model, _stamp(x[y != TARGET])) == TARGET).float().mean()) > 0.8  # the patch sends digits to 0


# --- penultimate features -----------------------------------------------------------------------


def test_penultimate_is_the_input_of_the_last_linear(digits_model, wrapped_digits, digits_test):
    x = digits_test[0][:100]
    with torch.no_grad():
        truth = digits_model.classifier[:-1](digits_model.features(x))
    feats = penultimate(wrapped_digits, x, batch_size=32)
    assert feats.shape == (100, 128) and feats.device.type == "cpu"
    torch.testing.assert_close(feats, truth)
    torch.testing.assert_close(penultimate(wrapped_digits, x, batch_size=7), truth)


class _HeadFirst(nn.Module):
    """Registers its head before its body: "last" must mean last to run, not last declared."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(5, 3)
        self.body = nn.Linear(64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.head(torch.relu(self.body(x.flatten(1)))), dim=1)


def test_penultimate_follows_execution_order():
    torch.manual_seed(0)
    model = _HeadFirst()
    x = torch.rand(10, 1, 8, 8)
    with torch.no_grad():
        truth = torch.relu(model.body(x.flatten(1)))
    torch.testing.assert_close(penultimate(model, x), truth)
    # a parameter-free layer after the last Linear (a softmax here) does not hide it
    assert penultimate(nn.Sequential(nn.Flatten(), nn.Linear(64, 4), nn.ReLU(), nn.Linear(4, 3), nn.Softmax(1)), x).shape == (10, 4)


@pytest.mark.parametrize("model, message", [
    (nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()), "no nn.Linear"),
    (nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Unflatten(1, (1, 4, 4)), nn.Conv2d(1, 3, 4), nn.Flatten()), "is Conv2d"),
    (nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.Unflatten(1, (1, 10)), nn.Linear(10, 3)), "takes a"),
], ids=["no-linear", "conv-head", "3d-input"])
def test_penultimate_refuses_a_model_without_a_final_linear(model, message):
    with pytest.raises(ValueError, match=message):
        penultimate(model, torch.rand(4, 1, 8, 8))


# --- scan reports and the flagged file ----------------------------------------------------------


def test_scan_report_counts_against_the_truth():
    flagged = torch.tensor([True, True, False, False, True, False])
    report = scan_report(flagged, poisoned_ids=[0, 1, 3])
    assert report["flagged_ids"] == [0, 1, 4] and report["n_flagged"] == 3 and report["n"] == 6
    assert report["true_positives"] == 2 and report["n_poisoned"] == 3
    assert report["precision"] == pytest.approx(2 / 3) and report["recall"] == pytest.approx(2 / 3)
    assert "precision" not in scan_report(flagged)  # no truth, no figures
    assert scan_report(torch.zeros(4, dtype=torch.bool), [1])["precision"] is None  # nothing flagged
    assert scan_report(flagged, [])["recall"] is None  # nothing poisoned
    assert scan_report(flagged, [4, 4, 0])["recall"] == 1.0  # ids count once
    with pytest.raises(ValueError, match="positions"):
        scan_report(flagged, [6])


def test_write_flagged_writes_json_atomically(tmp_path):
    path = write_flagged(tmp_path / "scans" / "flagged.json", torch.tensor([3, 17, 42]))
    assert json.loads(path.read_text()) == {"n_flagged": 3, "flagged_ids": [3, 17, 42]}
    write_flagged(path, [], scan="spectral-signatures")
    assert json.loads(path.read_text()) == {"scan": "spectral-signatures", "n_flagged": 0, "flagged_ids": []}
    assert [p.name for p in path.parent.iterdir()] == ["flagged.json"]  # no temporary file left behind
    with pytest.raises(TypeError, match="not a mask"):
        write_flagged(path, torch.tensor([True, False]))


# --- the algorithms on synthetic features with known truth ----------------------------------------


def _planted(n_clean: int = 170, n_poison: int = 30, d: int = 32, shift: float = 8.0, seed: int = 0):
    """Two classes of Gaussian features; class 1 has n_poison points moved `shift` along one direction."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(2 * n_clean + n_poison, d, generator=g)
    labels = torch.tensor([0] * n_clean + [1] * (n_clean + n_poison))
    feats[2 * n_clean:, 0] += shift
    return feats, labels, list(range(2 * n_clean, 2 * n_clean + n_poison))


def test_spectral_signatures_find_a_planted_direction():
    feats, labels, truth = _planted()
    eps = 30 / 200
    flagged, per_class = spectral_signatures(feats, labels, eps=eps, factor=1.5)
    report = scan_report(flagged, truth)
    assert report["recall"] == 1.0
    # the rule flags round(1.5 * eps * n) in every class, the clean one included
    assert [c["n_flagged"] for c in per_class] == [round(1.5 * eps * 170), round(1.5 * eps * 200)]
    assert report["true_positives"] == 30 and report["n_flagged"] == 38 + 45


def test_activation_clustering_flags_a_small_separate_cluster_only():
    feats, labels, truth = _planted()
    flagged, per_class = activation_clustering(feats, labels)
    assert flagged.nonzero().flatten().tolist() == truth  # exactly the planted cluster
    assert [c["flagged"] for c in per_class] == [False, True]
    assert per_class[1]["relative_size"] == pytest.approx(30 / 200) and per_class[1]["silhouette"] > 0.25
    assert per_class[0]["silhouette"] < 0.25  # a Gaussian splits, but not into two clusters
    # whitening ("ica") gives the planted direction the variance of each noise direction: 2-means
    # then splits the noise instead (why "pca" is the default)
    assert scan_report(activation_clustering(feats, labels, method="ica").flagged, truth)["recall"] < 0.5
    # the same cluster holding half the class is not "small": the relative-size rule lets it be
    feats, labels, _ = _planted(n_clean=100, n_poison=100)
    assert not bool(activation_clustering(feats, labels).flagged.any())


def test_ica_clusters_as_sklearn_fastica_would():
    """FastICA whitens and then rotates; k-means distances do not see rotations, so "ica" is whitened
    PCA. The pairwise distances of sklearn's sources equal those of the whitened components."""
    from sklearn.decomposition import FastICA

    from harness.attacks.scans import _reduce

    g = torch.Generator().manual_seed(0)
    x = torch.randn(150, 40, generator=g, dtype=torch.float64) @ torch.randn(40, 40, generator=g, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FastICA's convergence warning: its rotation does not matter here
        sources = FastICA(n_components=10, max_iter=1000, tol=0.005, random_state=0).fit_transform(x.numpy())
    ours = _reduce(x, 10, whiten=True)
    s = torch.from_numpy(sources)
    torch.testing.assert_close(torch.cdist(ours, ours), torch.cdist(s, s), rtol=1e-6, atol=1e-6)


def test_anomaly_index_reference_values():
    norms = torch.tensor([2.0, 8, 9, 10, 11, 12, 13, 14, 15, 16])
    # median 11.5; absolute deviations' median 2.5; (11.5 - 2) / (1.4826 * 2.5)
    index = anomaly_index(norms)
    assert float(index[0]) == pytest.approx(9.5 / (1.4826 * 2.5))
    assert float(index[4]) == pytest.approx(0.5 / (1.4826 * 2.5))
    assert anomaly_index(torch.full((10,), 7.0)).tolist() == [0.0] * 10
    assert math.isfinite(float(anomaly_index(torch.tensor([1.0, 5, 5, 5, 5]))[0]))  # MAD 0: large, finite


# --- the backdoored digits model ---------------------------------------------------------------


def test_spectral_signatures_find_the_backdoor(scanned, clean_features, digits_train):
    _, feats, yp, poisoned = scanned
    assert poisoned.numel() == 26 and int((yp == TARGET).sum()) == 159
    flagged, per_class = spectral_signatures(feats, yp, eps=0.16)  # the target class's poisoned fraction, 26/159
    report = scan_report(flagged, poisoned.tolist())
    target = per_class[TARGET]
    in_target = int(flagged[poisoned].sum()) / target["n_flagged"]
    print(f"spectral signatures, 2% backdoor: precision {report['precision']:.3f} recall {report['recall']:.3f}; "
          f"in class {TARGET}, {target['n_flagged']} flagged, {in_target:.0%} of them poison")
    assert report["recall"] >= 0.75
    assert in_target >= 0.5  # poison is 16% of the class, and most of what the scan takes from it
    clean, per_class = spectral_signatures(clean_features, digits_train[1])
    print(f"spectral signatures, clean: {int(clean.sum())} of {clean.numel()} flagged")
    # the rule's budget, 1.5 * 5% of each class, and nothing beyond it
    assert int(clean.sum()) == sum(round(0.075 * c["n"]) for c in per_class) <= 0.08 * clean.numel()


def test_activation_clustering_finds_the_backdoor(scanned, clean_features, digits_train):
    _, feats, yp, poisoned = scanned
    flagged, per_class = activation_clustering(feats, yp)
    report = scan_report(flagged, poisoned.tolist())
    flagged_classes = [c["class"] for c in per_class if c["flagged"]]
    print(f"activation clustering, 2% backdoor: precision {report['precision']:.3f} recall {report['recall']:.3f}, "
          f"classes flagged {flagged_classes}")
    assert report["recall"] >= 0.75 and TARGET in flagged_classes
    cluster = per_class[TARGET]["n_flagged"]
    assert int(flagged[poisoned].sum()) >= 0.75 * cluster  # the target's flagged cluster is mostly poison
    clean = activation_clustering(clean_features, digits_train[1])
    print(f"activation clustering, clean: {int(clean.flagged.sum())} of {clean.flagged.numel()} flagged, "
          f"classes {[c['class'] for c in clean.per_class if c['flagged']]}")
    assert float(clean.flagged.float().mean()) < 0.06 and not clean.per_class[TARGET]["flagged"]


# --- Neural Cleanse ------------------------------------------------------------------------------

NC_FAST = dict(samples=50, steps=150)


def test_neural_cleanse_flags_the_backdoored_model(backdoored, digits_test):
    x, y = digits_test
    res = neural_cleanse(backdoored, x, y, num_classes=10, **NC_FAST)
    print(f"neural cleanse, 5% backdoor: anomaly index {res['anomaly_index']:.2f}, norms {res['norms']}, {res['seconds']:.1f}s")
    assert res["anomaly_index"] > ANOMALY_THRESHOLD and res["flagged"] and TARGET in res["flagged_classes"]
    assert res["target"] == TARGET and all(res["reached"])
    assert res["norms"][TARGET] < 0.6 * sorted(res["norms"])[1]  # well below every other class
    mask, pattern = res["mask"], res["pattern"]
    assert mask.shape == (8, 8) and pattern.shape == (1, 8, 8) and mask.device.type == "cpu"
    assert 0 <= float(mask.min()) and float(mask.max()) <= 1 and 0 <= float(pattern.min()) and float(pattern.max()) <= 1
    # the trigger found sits where the planted one does: most of its mass in the patch's corner
    assert float(mask[-PATCH:, -PATCH:].sum()) > 0.6 * float(mask.sum())


def test_neural_cleanse_passes_the_clean_model(wrapped_digits, digits_test):
    x, y = digits_test
    res = neural_cleanse(wrapped_digits, x, y, num_classes=10, **NC_FAST)
    print(f"neural cleanse, clean: anomaly index {res['anomaly_index']:.2f}, norms {res['norms']}, {res['seconds']:.1f}s")
    assert res["anomaly_index"] < ANOMALY_THRESHOLD and not res["flagged"] and res["flagged_classes"] == []


def test_neural_cleanse_refuses_one_class():
    with pytest.raises(ValueError, match="at least 2"):
        neural_cleanse(tiny_linear(), torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long), num_classes=1)


# --- slow: ART's implementations of the same algorithms, on the same features ----------------------


def _by_class(feats: torch.Tensor, labels: torch.Tensor) -> tuple[list, list[torch.Tensor]]:
    idx = [(labels == c).nonzero().flatten() for c in range(10)]
    return [feats[i].double().numpy() for i in idx], idx


@pytest.mark.slow
def test_activation_clustering_agrees_with_art(scanned):
    """ART's reduce_dimensionality (sklearn's PCA) gives our components up to sign, and our ten
    k-means++ starts end within 1% of the inertia of sklearn's KMeans with ten (the same split on the
    target class). ART's own pipeline runs one start; on the target class it lands in a worse split."""
    import numpy as np
    from art.defences.detector.poison.activation_defence import cluster_activations, reduce_dimensionality
    from sklearn.cluster import KMeans

    from harness.attacks.scans import _reduce, _two_means

    def inertia(z: torch.Tensor, assign: torch.Tensor) -> float:
        return sum(float((z[assign == j] - z[assign == j].mean(0)).pow(2).sum()) for j in (0, 1) if bool((assign == j).any()))

    _, feats, yp, poisoned = scanned
    per_class, idx = _by_class(feats, yp)
    for c in range(10):
        z = _reduce(torch.from_numpy(per_class[c]), 10, whiten=False)
        art = torch.from_numpy(reduce_dimensionality(per_class[c], nb_dims=10, reduce="PCA"))
        torch.testing.assert_close(z.abs(), art.abs(), rtol=1e-6, atol=1e-6)
        split = _two_means(z, torch.Generator().manual_seed(0))
        theirs = torch.from_numpy(KMeans(n_clusters=2, n_init=10, random_state=0).fit_predict(z.numpy())).long()
        assert inertia(z, split) <= 1.01 * inertia(z, theirs), c
        if c == TARGET:
            assert bool((split == theirs).all() or (split != theirs).all())

    np.random.seed(0)  # ART's KMeans draws from numpy's global generator
    clusters, reduced = cluster_activations(per_class, nb_clusters=2, nb_dims=10, reduce="PCA")
    z = torch.from_numpy(reduced[TARGET])
    ours = _two_means(_reduce(torch.from_numpy(per_class[TARGET]), 10, whiten=False), torch.Generator().manual_seed(0))
    theirs = torch.from_numpy(clusters[TARGET]).long()
    print(f"class {TARGET} inertia: ours {inertia(z, ours):.1f}, ART's single start {inertia(z, theirs):.1f}; "
          f"recall of the smaller cluster: ours {_recall(idx[TARGET], ours, poisoned):.3f}, "
          f"ART's {_recall(idx[TARGET], theirs, poisoned):.3f}")
    assert inertia(z, ours) <= inertia(z, theirs) * (1 + 1e-9)


def _recall(members: torch.Tensor, assign: torch.Tensor, poisoned: torch.Tensor) -> float:
    small = int(torch.bincount(assign, minlength=2).argmin())
    return float(torch.isin(poisoned, members[assign == small]).float().mean())


@pytest.mark.slow
def test_spectral_signatures_agree_with_art(scanned):
    """ART's spectral_signature_scores on centred features is the square root of our score. On raw
    features (what ART's detector passes) it is |(r - mean) . v + mean . v|: one-sided, not the
    paper's squared projection, and it flags other samples."""
    import numpy as np
    from art.defences.detector.poison.spectral_signature_defense import SpectralSignatureDefense

    _, feats, yp, poisoned = scanned
    per_class, idx = _by_class(feats, yp)
    eps, factor = 0.16, 1.5
    ours, per = spectral_signatures(feats, yp, eps=eps, factor=factor)
    raw = torch.zeros(len(yp), dtype=torch.bool)
    for c in range(10):
        r = per_class[c]
        centred = SpectralSignatureDefense.spectral_signature_scores(r - r.mean(0))[:, 0]
        top = np.argsort(-centred)[: round(factor * eps * len(r))].copy()
        assert set(idx[c][top].tolist()) == set(idx[c][ours[idx[c]]].tolist())
        assert per[c]["score_cutoff"] == pytest.approx(float(np.sort(centred)[::-1][len(top) - 1]) ** 2, rel=1e-6)
        uncentred = SpectralSignatureDefense.spectral_signature_scores(r)[:, 0]
        raw[idx[c][np.argsort(-uncentred)[: len(top)].copy()]] = True
    print(f"recall: paper's score {scan_report(ours, poisoned.tolist())['recall']:.3f}, "
          f"ART's on raw features {scan_report(raw, poisoned.tolist())['recall']:.3f}")


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_neural_cleanse_flags_other_backdoored_models(digits_train, digits_test, seed):
    """No ART cross-check here: ART's Neural Cleanse takes Keras models only. Instead, two more
    backdoors (other poison draws and initializations), with the default settings."""
    model = _backdoor(*digits_train, NC_DOSE, seed=seed)[0]
    res = neural_cleanse(model, *digits_test, num_classes=10)
    print(f"seed {seed}: anomaly index {res['anomaly_index']:.2f}, norms {res['norms']}, {res['seconds']:.1f}s")
    assert res["target"] == TARGET and res["anomaly_index"] > ANOMALY_THRESHOLD


@pytest.mark.gpu
def test_scans_run_on_the_model_device(backdoored, digits_test):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    x, y = digits_test
    model = backdoored.to("cuda")
    try:
        feats = penultimate(model, x[:64])
        assert feats.device.type == "cpu" and feats.shape == (64, 128)
        res = neural_cleanse(model, x, y, num_classes=10, **NC_FAST)
        assert res["target"] == TARGET and res["anomaly_index"] > ANOMALY_THRESHOLD and res["mask"].device.type == "cpu"
    finally:
        backdoored.to("cpu")
