"""The Ray engine on a local Ray started here (2 CPUs, a small object store, no dashboard; one for
the module): the same scorecard as the local engine bit for bit, whatever the number of workers; a
python: model shipped to the workers in Ray's runtime environment; out-of-memory halving; SIGTERM
then --resume. The two-node cluster (a lost node) is tests/test_ray_cluster.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import harness

pytestmark = pytest.mark.ray  # deselected in the default run; .ci/run installs .[dev,ray] and counts a skip under -m ray as a failure


@pytest.fixture(scope="module")
def local_ray():
    import logging

    ray = pytest.importorskip("ray")

    ray.init(address="local", num_cpus=2, object_store_memory=150 * 2**20, include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


SUITE = {
    "name": "ray-same", "device": "cpu", "seed": 5,
    "data": {"source": "builtin:digits", "limit": 90, "batch_size": 16},
    "attacks": [
        {"name": "fgsm", "norm": "linf", "epsilons": [0.05, 0.1]},
        {"name": "pgd", "norm": "linf", "epsilons": [0.1, 0.2], "params": {"steps": 5}},
        {"name": "apgd-ce", "norm": "l2", "epsilons": [1.0], "params": {"steps": 5}},
        {"name": "deepfool", "norm": "l2", "epsilons": [0.5, 1.0]},
        {"name": "square", "norm": "linf", "epsilons": [0.1], "params": {"queries": 30}},
        {"name": "corruptions", "kinds": ["gaussian-noise", "blur"], "severities": [1, 3]},
    ],
    "defenses": [{"name": "bit-depth", "params": {"bits": 3}}],
    "gates": [{"metric": "robust_accuracy:worst-linf@0.1", "min": 0.3}],
}


def verdict(out: Path) -> dict:
    """What a scorecard measured and decided (its timings and provenance aside) and the per-sample outcomes."""
    card = json.loads((out / "scorecard.json").read_text())
    drop = ("seconds",)
    attacks = [{k: v for k, v in a.items() if k not in drop and not k.endswith("_s")} for a in card["attacks"]]
    for a in attacks:
        for s in a.get("stages", []):
            s.pop("seconds", None)
    defenses = [{k: v for k, v in d.items() if k != "attacks"} for d in card.get("defenses", [])]
    return {"metrics": card["metrics"], "metric_intervals": card.get("metric_intervals"), "gates": card["gates"],
            "checks": card["checks"], "attacks": attacks, "defenses": defenses, "passed": card["passed"],
            "outcomes": (out / "outcomes.json").read_text()}


@pytest.fixture(scope="module")
def local_card(tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    harness.run(SUITE, out=out, show_progress=False)
    return verdict(out)


@pytest.mark.parametrize("workers", [1, 2])
def test_the_scorecard_is_the_local_engines_bit_for_bit_whatever_the_workers(local_ray, local_card, tmp_path, workers):
    assert torch.get_num_threads() == 1  # conftest: the local engine ran single-threaded, and so do the workers by default
    from harness.engines import engine_for

    engine = engine_for("ray", workers=workers)
    try:
        harness.run(SUITE, out=tmp_path, show_progress=False, engine=engine)
        assert engine.size == workers
    finally:
        engine.close()
    got = verdict(tmp_path)
    for key in local_card:
        assert got[key] == local_card[key], key
    assert any(d["id"] == "bit-depth" for d in got["defenses"])  # the defended variant ran on the workers too


def test_data_that_lives_only_in_memory_travels_once_through_the_object_store(local_ray, digits_test):
    """... and a randomized defense (noise drawn afresh per unit from the unit's seed) gives the local figures too."""
    x, y = digits_test
    suite = {**SUITE, "gates": [], "attacks": SUITE["attacks"][:2], "defenses": [{"name": "gaussian-noise", "sigma": 0.1, "eot": 2}]}
    local = harness.run(suite, data=(x[:70], y[:70]), show_progress=False)
    remote = harness.run(suite, data=(x[:70], y[:70]), show_progress=False, engine={"name": "ray", "workers": 2})
    assert remote.metrics == local.metrics and remote.metrics["clean_accuracy"] > 0.9
    assert remote.metrics["robust_accuracy:gaussian-noise/worst-linf@0.1"] < remote.metrics["clean_accuracy:gaussian-noise"]
    assert [(c["name"], c["status"]) for c in remote.checks] == [(c["name"], c["status"]) for c in local.checks]


NETS = '''
import torch
from torch import nn


class Small(nn.Module):
    """Runs out of "memory" (raises torch.OutOfMemoryError) on batches larger than `fits`."""

    def __init__(self, fits):
        super().__init__()
        self.fits = fits
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):
        if self.fits and x.shape[0] > self.fits:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated: a batch of %d)" % x.shape[0])
        return self.body(x)


def build(fits=0, log=None):
    if log:
        with open(log, "a") as f:
            f.write(__file__ + "\\n")
    torch.manual_seed(1)
    return Small(fits)
'''


def user_model(tmp_path: Path, fits: int, log: Path | None = None) -> Path:
    (tmp_path / "usernets_ray.py").write_text(NETS)
    kwargs = {"fits": fits, **({"log": str(log)} if log else {})}
    cfg = {**SUITE, "name": "user-model", "defenses": [], "gates": [], "attacks": SUITE["attacks"][:2],
           "model": {"source": "python:usernets_ray:build", "kwargs": kwargs, "num_classes": 10}}
    path = tmp_path / "user.yaml"
    path.write_text(json.dumps(cfg))
    return path


def test_a_python_model_reaches_the_workers_through_the_runtime_environment(tmp_path):
    """`harness run --engine ray` starts its own Ray with a copy of the factory's module as the job's
    working directory: every worker imports that copy (each import logs the file it came from)."""
    folder = tmp_path / "project"
    folder.mkdir()
    log = tmp_path / "imports.log"
    path = user_model(folder, 0, log)
    out = tmp_path / "out"
    env = {**os.environ, "CI": "true"}
    result = subprocess.run([sys.executable, "-m", "harness", "run", str(path), "--out", str(out), "--engine", "ray", "--workers", "2"],
                            env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    files = log.read_text().split()
    assert str(folder / "usernets_ray.py") in files  # the driver's import
    copies = [f for f in files if not f.startswith(str(folder))]
    assert copies and all(f.endswith("/usernets_ray.py") and "/runtime_resources/" in f for f in copies), files  # from Ray's copy
    local = harness.run(path, show_progress=False)
    assert json.loads((out / "scorecard.json").read_text())["metrics"] == local.metrics


def test_out_of_memory_on_a_worker_halves_as_locally(local_ray, tmp_path):
    path = user_model(tmp_path, fits=8)  # batches of 16 run out of memory: halved to 8, with the same derived seeds
    local = harness.run(path, show_progress=False)
    remote = harness.run(path, show_progress=False, engine={"name": "ray", "workers": 2})
    assert remote.metrics == local.metrics
    memory = {c["name"]: c for c in remote.checks}["memory"]
    assert memory["status"] == "warn" and "halved down to 8 sample(s)" in memory["detail"]


def test_the_weights_a_worker_loads_must_hash_to_the_provenance_sha256(local_ray):
    from harness.core.errors import RunFailed
    from harness.engines.recipes import build_model, model_recipe
    from harness.sources.models import load_model

    model, info = load_model("builtin:digits-cnn")
    recipe = model_recipe(model)
    assert recipe.sha256 == info["model_sha256"]
    assert torch.equal(build_model(recipe).net.classifier[-1].weight, model.net.classifier[-1].weight)
    other = load_model("python:tests.conftest:tiny_linear", None, 10)[0]
    forged = type(recipe)(**{**recipe.__dict__, "source": "python:tests.conftest:tiny_linear", "weights": model_recipe(other).weights})
    with pytest.raises(RunFailed, match="hash to .* not the run's"):
        build_model(forged)
    with pytest.raises(harness.BadInput, match="without pickling"):
        model_recipe(torch.nn.Linear(64, 10))


SLOW = {
    "name": "ray-sigterm", "device": "cpu", "seed": 1,
    "data": {"source": "builtin:digits", "limit": 120, "batch_size": 30},
    "engine": {"name": "ray", "workers": 2},
    "attacks": [{"name": "pgd", "norm": "linf", "epsilons": [0.02, 0.04, 0.06, 0.08, 0.1, 0.12, 0.14, 0.16], "params": {"steps": 80}}],
}


def test_sigterm_stops_a_ray_run_with_exit_3_and_resume_continues_it(local_ray, tmp_path):
    cfg = tmp_path / "slow.yaml"
    cfg.write_text(json.dumps(SLOW))
    out = tmp_path / "out"
    env = {**os.environ, "CI": "true", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "harness", "run", str(cfg), "--out", str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state = out / "run-state.json"
    deadline = time.monotonic() + 180
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert state.exists(), proc.communicate(timeout=60)
    proc.send_signal(signal.SIGTERM)  # its own local Ray installed a SIGTERM handler: the harness put its own back
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    assert "interrupted" in err and "--resume" in err
    finished = len(json.loads(state.read_text())["results"])
    assert 1 <= finished < 8
    # continue on the cluster this module started, by its address
    resumed = subprocess.run([sys.executable, "-m", "harness", "run", str(cfg), "--out", str(out), "--resume", "--address", local_ray],
                             env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{finished} finished result(s) reused" in resumed.stderr
    card = json.loads((out / "scorecard.json").read_text())
    assert sum(a.get("resumed", False) for a in card["attacks"]) == finished
    whole = harness.run({**SLOW, "engine": "local"}, show_progress=False)
    assert card["metrics"] == whole.metrics


POISON = {
    "name": "ray-poison", "device": "cpu", "seed": 2,
    "data": {"source": "builtin:digits", "limit": 120, "batch_size": 40},
    "train": {"epochs": 6, "data": {"limit": 400}},
    "attacks": [],
    "probes": [{"name": "badnets", "fractions": [0.02, 0.1], "target": 0, "size": 3, "scans": ["activation-clustering"]},
               {"name": "label-flip", "fractions": [0.1], "mode": "random"}],
}


def test_poisoning_fractions_train_side_by_side_on_the_workers_with_the_local_answer(local_ray, tmp_path):
    local = harness.run(POISON, out=tmp_path / "local", show_progress=False)
    remote = harness.run(POISON, out=tmp_path / "ray", show_progress=False, engine={"name": "ray", "workers": 2})
    strip = lambda recs: [{k: v for k, v in r.items() if k != "seconds"} for r in recs]  # noqa: E731
    assert strip(remote.record["probes"]) == strip(local.record["probes"]) and len(remote.record["probes"]) == 3
    assert remote.metrics == local.metrics
    assert remote.metrics["attack_success_rate:badnets@0.1"] > 0.5 and remote.metrics["clean_accuracy:badnets@0.1"] > 0.6  # trained models, not empty ones
    for rel in ("scans/badnets@0.02-activation-clustering.json", "scans/badnets@0.1-activation-clustering.json"):
        assert (tmp_path / "ray" / rel).read_text() == (tmp_path / "local" / rel).read_text()  # written by the driver


PRIVACY = {
    "name": "privacy-ray", "seed": 0, "device": "cpu",
    "model": {"source": "builtin:digits-cnn"},
    "data": {"source": "builtin:digits", "split": "test", "limit": 150},
    "attacks": [],
    "train": {"epochs": 3, "data": {"limit": 300}},
    "probes": [{"name": "membership-inference", "id": "mia", "shadow_models": 6},
               {"name": "extraction", "id": "steal", "queries": "holdout", "budgets": [100, 200], "min_steps": 40,
                "defenses": ["labels-only"]}],
}


def test_privacy_shadow_models_and_query_budgets_run_on_the_workers_with_the_local_answer(local_ray, tmp_path):
    """Each membership-inference shadow model and each extraction budget is a job on a worker
    (RayEngine.map); the records, metrics, intervals, ROC points and keep masks are the local run's."""
    from harness.engines.cluster import RayEngine

    class Watched(RayEngine):
        """A RayEngine that keeps what each map call sent and what came back from the workers."""

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.maps: list[tuple[str, int, list]] = []

        def map(self, fn, jobs, on_done=None):
            results = super().map(fn, jobs, on_done)
            self.maps.append((f"{fn.__module__}.{fn.__name__}", len(jobs), results))
            return results

    local = harness.run(PRIVACY, out=tmp_path / "local", show_progress=False)
    engine = Watched(workers=2, threads=1, device="cpu")
    try:
        remote = harness.run(PRIVACY, out=tmp_path / "ray", show_progress=False, engine=engine)
        assert engine.size == 2
    finally:
        engine.close()
    strip = lambda recs: [{k: v for k, v in r.items() if k != "seconds"} for r in recs]  # noqa: E731
    assert [r["kind"] for r in remote.record["probes"]] == ["membership", "extraction", "extraction"]
    assert strip(remote.record["probes"]) == strip(local.record["probes"])  # every metric, interval, level and ROC point
    assert remote.metrics == local.metrics
    for key in ("intervals", "interval_methods"):
        assert remote.record[key] == local.record[key], key
    assert remote.record["intervals"]["auc:mia"]
    assert remote.record["interval_methods"]["tpr_at_fpr:mia@0.001"]["method"] == "absent"  # 450 non-member trials: too few
    rel = "privacy/mia-keep.json"
    assert remote.record["probes"][0]["keep_file"] == rel
    assert (tmp_path / "ray" / rel).read_text() == (tmp_path / "local" / rel).read_text()  # written by the driver
    # the units ran as jobs on the workers: six shadow models, then the two budgets, and what came back is the record
    # (the runner's validity checks are a map job too: checks_job, before the probes)
    jobs = [(name, n, results) for name, n, results in engine.maps if name.startswith("harness.evaluation.privacy.")]
    assert [(name, n) for name, n, _ in jobs] == [("harness.evaluation.privacy.shadow_job", 6),
                                                  ("harness.evaluation.privacy.budget_job", 2)]
    shadows, budgets = jobs[0][2], jobs[1][2]
    assert [s["model"] for s in shadows] == list(range(6)) and all(len(s["loss"]) == 300 for s in shadows)
    keep = json.loads((tmp_path / "ray" / rel).read_text())["keep"]
    assert [s["n_train"] for s in shadows] == [sum(row) for row in keep]
    assert strip(budgets) == strip(remote.record["probes"][1:])
    # trained models, not empty ones (chance is 0.1 on digits)
    assert remote.record["probes"][0]["shadow_accuracy"]["members"] > 0.25
    assert all(r["stolen_accuracy"] > 0.5 and r["victim_accuracy"] > 0.9 for r in remote.record["probes"][1:])


ENDPOINT_SUITE = {
    "name": "ray-endpoint", "device": "cpu", "seed": 0,
    "data": {"source": "builtin:digits", "split": "test", "limit": 60},
    "attacks": [{"name": "square", "norm": "linf", "epsilons": [0.05, 0.1], "queries": 40}],
    "probes": [{"name": "rate-limit", "burst": 20}],
}


def _at(url: str, **kwargs) -> dict:
    return {**ENDPOINT_SUITE, "model": {"source": url, "kwargs": kwargs}}


def test_an_endpoint_runs_on_the_workers_with_one_query_budget_for_the_whole_run(local_ray, tmp_path, digits_model):
    """Workers call the endpoint themselves (its address travels, no weights), with the local engine's
    answer; `max_queries` counts the driver's and every worker's images together (a shared meter), so
    two workers cannot send two budgets; and the rate-limit probe after the attacks still counts."""
    from harness.core.errors import RunFailed

    from .endpoint_server import serve

    with serve(digits_model) as served:
        local = harness.run(_at(served.url), out=tmp_path / "local", show_progress=False)
        sent = served.images
        served.images = 0
        remote = harness.run(_at(served.url, max_queries=sent), out=tmp_path / "ray", show_progress=False,
                             engine={"name": "ray", "workers": 2})
        assert remote.metrics == local.metrics and served.images == sent  # the whole run fits the budget it needs, exactly
        served.images = 0
        with pytest.raises(RunFailed, match=r"max_queries: 3000 images\) would be exceeded"):
            harness.run(_at(served.url, max_queries=3000), out=tmp_path / "short", show_progress=False, engine={"name": "ray", "workers": 2})
        assert served.images <= 3000 < sent  # per process, the driver and two workers could have sent 9000
        (probe,) = json.loads((tmp_path / "ray" / "scorecard.json").read_text())["probes"]
        assert probe["answered"] == 20 and probe["requests_before"] > 0  # the workers' requests counted in the driver
        # the client-side rate holds over the driver and both workers: 50 requests a second, all of them together
        served.arrivals.clear()
        harness.run({**_at(served.url, rate=50), "probes": []}, show_progress=False, engine={"name": "ray", "workers": 2})
        n = len(served.arrivals)
        assert n > 40 and served.arrivals[-1] - served.arrivals[0] >= 0.9 * (n - 1) / 50


def test_an_onnx_file_is_opened_by_the_workers_and_checked_by_its_hash(local_ray, tmp_path, digits_model):
    pytest.importorskip("onnxruntime")
    import warnings

    path = tmp_path / "digits.onnx"

    def export(net: torch.nn.Module) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(net.eval(), (torch.rand(2, 1, 8, 8),), str(path), dynamo=False, input_names=["x"],
                              output_names=["logits"], dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})

    export(digits_model)
    suite = {**ENDPOINT_SUITE, "probes": [], "model": {"source": f"onnx:{path}"},
             "attacks": [*ENDPOINT_SUITE["attacks"], {"name": "pgd", "norm": "linf", "epsilons": [0.1], "steps": 5}]}
    local = harness.run(suite, show_progress=False)
    remote = harness.run(suite, show_progress=False, engine={"name": "ray", "workers": 2})
    assert remote.metrics == local.metrics and local.metrics["robust_accuracy:pgd-linf@0.1"] < local.metrics["clean_accuracy"]

    from harness.core.errors import RunFailed
    from harness.engines.recipes import build_model, model_recipe
    from harness.sources.models import load_model

    recipe = model_recipe(load_model(f"onnx:{path}")[0])
    assert recipe.identity == "file" and recipe.weights == b""
    import copy

    other = copy.deepcopy(digits_model)
    with torch.no_grad():
        other.classifier[-1].bias.add_(0.01)
    export(other)  # the file a worker would open is no longer the run's
    with pytest.raises(RunFailed, match="hashes to .*, not the run's"):
        build_model(recipe)
