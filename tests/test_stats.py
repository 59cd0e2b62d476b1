"""Statistics behind verdicts (McNemar, paired and unpaired intervals, metric intervals), per-sample
outcomes (outcomes.json) and the scorecard files that carry them."""

import base64
import json
import math

import numpy as np
import pytest

from harness.config import GateConfig
from harness.core.errors import BadInput
from harness.core.files import sha256_file
from harness.core.stats import mcnemar_p_value, newcombe_interval, paired_drop_interval, wilson_interval
from harness.verdicts.metrics import metric_intervals
from harness.verdicts.outcomes import Outcomes, sample_digests
from harness.reports.scorecard import Scorecard

ROBUST = "robust_accuracy:pgd-linf@0.1"
WORST = "robust_accuracy:worst-linf@0.1"


# --- McNemar and intervals ----------------------------------------------------------------------

def test_mcnemar_exact_reference_values():
    assert mcnemar_p_value(10, 2) == pytest.approx(0.0386, abs=1e-4)  # 2 * 79 / 4096
    assert mcnemar_p_value(10, 2) == pytest.approx(2 * (1 + 12 + 66) / 2**12, rel=1e-12)
    assert mcnemar_p_value(2, 10) == mcnemar_p_value(10, 2)
    assert mcnemar_p_value(0, 6) == pytest.approx(2 / 64, rel=1e-12)
    assert mcnemar_p_value(0, 0) == 1.0 and mcnemar_p_value(5, 5) == 1.0 and mcnemar_p_value(3, 4) == 1.0
    # large counts stay finite and exact enough (the tail sum never forms 2**D)
    assert mcnemar_p_value(2000, 2000) == 1.0
    assert 0.0 <= mcnemar_p_value(60_000, 40_000) < 1e-200
    with pytest.raises(ValueError):
        mcnemar_p_value(-1, 3)


def test_mcnemar_matches_scipy_binomial_test():
    stats = pytest.importorskip("scipy.stats")
    for n10, n01 in [(1, 0), (7, 3), (26, 30), (900, 1000), (99_000, 100_000)]:
        assert mcnemar_p_value(n10, n01) == pytest.approx(stats.binomtest(n10, n10 + n01).pvalue, rel=1e-8)


def test_paired_drop_interval_reference_values():
    # Tango's (1998) score interval, against published examples computed by ratesci::pairbinci and
    # contingencytables (b = n10, c = n01): Tango's own (9, 3 of 32), Agresti & Min 2005 (16, 8 of 86),
    # Fagerland et al. 2014's Bentur data (1, 7 of 21), and 0, 1 of 44 at 90%
    assert paired_drop_interval(9, 3, 32) == pytest.approx((-0.027, 0.390), abs=5e-4)
    assert paired_drop_interval(16, 8, 86) == pytest.approx((-0.020, 0.207), abs=5e-4)
    assert paired_drop_interval(1, 7, 21) == pytest.approx((-0.517, -0.026), abs=5e-4)
    assert paired_drop_interval(0, 1, 44, z=1.6448536269514722) == pytest.approx((-0.096, 0.037), abs=5e-4)
    a, b = paired_drop_interval(7, 3, 500)
    c, d = paired_drop_interval(3, 7, 500)
    assert (a, b) == pytest.approx((-d, -c))  # swapping the runs mirrors the interval
    with pytest.raises(ValueError):
        paired_drop_interval(6, 6, 10)


def test_paired_drop_interval_with_no_discordant_pair_widens_with_one_over_n():
    # nothing changed on n samples: the interval is +-z^2/(n + z^2), not [0, 0]; ten samples show little
    z2 = 1.959963984540054 ** 2
    for n in (10, 100, 1000):
        assert paired_drop_interval(0, 0, n) == pytest.approx((-z2 / (n + z2), z2 / (n + z2)), rel=1e-9)
    assert paired_drop_interval(0, 0, 10)[1] == pytest.approx(0.2775, abs=1e-4)


@pytest.mark.parametrize("n, p_worse, p_better", [(300, 0.01, 0.0), (1000, 0.006, 0.002), (50, 0.0, 0.0),
                                                  (50, 0.03, 0.03), (300, 0.10, 0.06)])
def test_paired_drop_interval_covers_the_true_drop(n, p_worse, p_better):
    # 4,000 simulated paired evaluations (seeded) per case: the nominal 95% interval holds the true drop
    # p_worse - p_better at least 93% of the time, from D = 0 to D ~ 50. The interval conditioned on D
    # that it replaces covered 0.568 at (300, 1%, 0) and 0.817 at (1000, 0.6%, 0.2%).
    rng = np.random.default_rng(0)
    counts = rng.multinomial(n, [p_worse, p_better, 1 - p_worse - p_better], size=4000)
    cache: dict = {}
    hits = 0
    for n10, n01, _ in counts.tolist():
        lo, hi = cache.setdefault((n10, n01), paired_drop_interval(n10, n01, n))
        hits += lo - 1e-12 <= p_worse - p_better <= hi + 1e-12
    assert hits / 4000 >= 0.93


def test_newcombe_reference_values():
    # Newcombe (1998), "Interval estimation for the difference between independent proportions", table II, method 10
    table = [((56, 70, 48, 80), (0.0524, 0.3339)), ((9, 10, 3, 10), (0.1705, 0.8090)), ((6, 7, 2, 7), (0.0582, 0.8062)),
             ((5, 56, 0, 29), (-0.0381, 0.1926)), ((0, 10, 0, 20), (-0.1611, 0.2775)), ((0, 10, 0, 10), (-0.2775, 0.2775)),
             ((10, 10, 0, 20), (0.6791, 1.0)), ((10, 10, 0, 10), (0.6075, 1.0))]
    for args, expected in table:
        assert newcombe_interval(*args) == pytest.approx(expected, abs=1e-4), args


def _record(n: int = 200, clean: float = 0.9, robust: float = 0.5, **prov) -> dict:
    return {
        "schema_version": 1, "name": "stats", "passed": True, "verdict": "pass",
        "metrics": {"clean_accuracy": clean, ROBUST: robust, f"attack_success_rate:pgd-linf@0.1": 0.4,
                    "median_perturbation:deepfool-l2": 1.7, WORST: robust},
        "gates": [], "probes": [], "defenses": [], "checks": [],
        "attacks": [{"id": "pgd-linf", "name": "pgd", "backend": "native", "norm": "linf", "epsilon": "0.1", "epsilon_value": 0.1,
                     "robust_accuracy": robust, "attack_success_rate": 0.4, "n": n, "n_attacked": round(clean * n), "seconds": 0.1,
                     "perturbation": {"median": 0.1, "max": 0.1}}],
        "provenance": {"samples": n, "data_source": "builtin:digits", "split": "test", "seed": 0, "duration_s": 0.5, **prov},
    }


def test_metric_intervals_of_a_record():
    intervals = metric_intervals(_record())
    assert set(intervals) == {"clean_accuracy", ROBUST, "attack_success_rate:pgd-linf@0.1", WORST}  # no median_perturbation
    assert intervals["clean_accuracy"] == [round(x, 6) for x in wilson_interval(180, 200)]
    assert intervals["attack_success_rate:pgd-linf@0.1"] == [round(x, 6) for x in wilson_interval(72, 180)]
    assert intervals[ROBUST] == pytest.approx([0.431361, 0.568639], abs=1e-6)
    assert metric_intervals({"metrics": {"clean_accuracy": 0.5}}) == {}  # no sample count, no interval


# --- per-sample outcomes --------------------------------------------------------------------------

def _outcomes(n: int = 1000, seed: int = 0) -> Outcomes:
    rng = np.random.default_rng(seed)
    ids = rng.permutation(5 * n)[:n]
    clean = rng.random(n) < 0.95
    robust = clean & (rng.random(n) < 0.5)
    return Outcomes(ids, {"clean_accuracy": clean, ROBUST: robust, WORST: robust & (rng.random(n) < 0.9)})


def test_outcomes_json_round_trip_is_compact():
    o = _outcomes(1000)
    text = o.to_json()
    body = json.loads(text)
    assert body["schema_version"] == 1 and body["n"] == 1000 and set(body["flags"]) == set(o.flags)
    assert all(len(v) == 168 for v in body["flags"].values())  # 125 packed bytes per metric, base64
    assert len(text) < 8000 * 4 / 3 + 3 * 170 + 200  # the int64 ids dominate; one bit per flag
    back = Outcomes.from_json(text, "outcomes.json")
    assert np.array_equal(back.ids, o.ids) and back.ids.dtype == np.int64
    assert set(back.flags) == set(o.flags) and all(np.array_equal(back.flags[m], o.flags[m]) for m in o.flags)
    assert back.to_json() == text
    empty = Outcomes(np.array([], dtype=np.int64), {"clean_accuracy": np.array([], dtype=bool)})
    assert Outcomes.from_json(empty.to_json(), "x").n == 0


def _malformed_cases() -> list[tuple[str, str, str]]:
    good = json.loads(_outcomes(13).to_json())
    ids = np.arange(13, dtype="<i8")

    def with_(**kw):
        return json.dumps({**good, **kw})

    dup = ids.copy()
    dup[5] = 2
    padded = bytearray(np.packbits(np.ones(13, dtype=bool)).tobytes())
    padded[-1] |= 0x01  # a bit past sample 13
    return [
        ("not json", "{not json", "not readable outcomes JSON"),
        ("array", "[1, 2]", "not an object"),
        ("missing key", json.dumps({k: v for k, v in good.items() if k != "flags"}), "need the keys flags"),
        ("schema", with_(schema_version=2), "unsupported outcomes schema_version 2 (valid: 1)"),
        ("n negative", with_(n=-1), "non-negative integer"),
        ("n bool", with_(n=True), "non-negative integer"),
        ("ids base64", with_(ids="@@not*base64@@"), "ids: not valid base64"),
        ("ids type", with_(ids=[1, 2, 3]), "ids must be a base64 string"),
        ("ids length", with_(ids=base64.b64encode(ids[:12].tobytes()).decode()), "ids: 96 bytes, expected 104"),
        ("ids duplicate", with_(ids=base64.b64encode(dup.tobytes()).decode()), "ids: sample id 2 appears 2 times"),
        ("ids negative", with_(ids=base64.b64encode((ids - 1).tobytes()).decode()), "cannot be negative"),
        ("flags type", with_(flags=[1]), "flags must be an object"),
        ("flag base64", with_(flags={"clean_accuracy": "%%%"}), "flags['clean_accuracy']: not valid base64"),
        ("flag length", with_(flags={"clean_accuracy": base64.b64encode(b"\xff").decode()}), "1 bytes, expected 2 for n=13"),
        ("flag padding", with_(flags={"clean_accuracy": base64.b64encode(bytes(padded)).decode()}), "padding bits"),
        ("n mismatch", with_(n=12), "ids: 104 bytes, expected 96"),
    ]


@pytest.mark.parametrize("name, text, message", _malformed_cases(), ids=[c[0] for c in _malformed_cases()])
def test_malformed_outcomes_are_bad_input(name, text, message):
    with pytest.raises(BadInput) as e:
        Outcomes.from_json(text, "run/outcomes.json")
    assert e.value.where == "run/outcomes.json" and message in e.value.problem


def test_outcomes_constructor_checks_shapes():
    with pytest.raises(ValueError, match="appears 2 times"):
        Outcomes([1, 1], {})
    with pytest.raises(ValueError, match="bool array of shape"):
        Outcomes([1, 2], {"clean_accuracy": np.array([1, 0])})
    with pytest.raises(ValueError, match="bool array of shape"):
        Outcomes([1, 2], {"clean_accuracy": np.array([True])})


def test_pairs_and_flipped():
    base = Outcomes([0, 1, 2, 3, 4, 5, 9], {ROBUST: np.array([1, 1, 0, 0, 1, 0, 1], dtype=bool)})
    now = Outcomes([5, 4, 3, 2, 1, 0, 7], {ROBUST: np.array([1, 0, 0, 1, 1, 0, 0], dtype=bool)})
    # shared ids 0..5: base 1 1 0 0 1 0, now (by id) 0 1 1 0 0 1
    assert now.pairs(base, ROBUST) == (1, 2, 2, 1)
    worse, better = now.flipped(base, ROBUST)
    assert worse.tolist() == [0, 4] and better.tolist() == [2, 5]
    assert base.pairs(now, ROBUST) == (1, 2, 2, 1)  # roles swap: n10 now counts ids 2 and 5
    assert [x.tolist() for x in base.flipped(now, ROBUST)] == [[2, 5], [0, 4]]
    with pytest.raises(KeyError, match="baseline has no per-sample outcomes"):
        now.pairs(Outcomes([0], {}), ROBUST)


def test_outcomes_from_an_evaluation():
    import torch

    from harness.config import AttackConfig
    from harness.evaluation.runner import AttackResult, Evaluation

    correct = torch.tensor([1, 1, 1, 0, 1, 1], dtype=torch.bool)
    robust = torch.tensor([1, 0, 1, 0, 0, 1], dtype=torch.bool)
    cfg = AttackConfig(name="pgd", norm="linf", epsilons=[0.1])
    res = AttackResult(cfg, "pgd-linf", "0.1", 0.1, robust, correct.clone(), correct & ~robust, torch.full((6,), float("nan")))
    ev = Evaluation(n=6, correct=correct, results=[res], groups={("linf", 0.1): "0.1"})
    from harness.sources.data import TensorData

    data = TensorData(x=torch.rand(6, 1, 2, 2), y=torch.tensor([0, 1, 2, 0, 1, 2]), ids=torch.tensor([3, 8, 10, 11, 20, 21]),
                      source="test", split="test")
    o = Outcomes.from_evaluation(ev, data)
    assert o.ids.tolist() == [3, 8, 10, 11, 20, 21] and set(o.flags) == {"clean_accuracy", ROBUST, WORST}
    metrics = ev.metrics()
    assert all(o.flags[m].mean() == pytest.approx(metrics[m]) for m in o.flags)  # the bits add up to the metrics


# --- scorecard files ------------------------------------------------------------------------------

def _card(n: int = 200, outcomes: bool = True, robust: float = 0.5, data: int = 0, **prov) -> Scorecard:
    """A card over n samples; `data` picks the stand-in images (another value: other samples at the same ids)."""
    rng = np.random.default_rng(1)
    clean = np.ones(n, dtype=bool)
    clean[: n // 10] = False
    rob = np.zeros(n, dtype=bool)
    rob[rng.permutation(np.flatnonzero(clean))[: round(robust * n)]] = True
    digests = sample_digests(np.arange(data, data + n, dtype=np.float32).reshape(n, 1, 1, 1), np.arange(n) % 10)
    o = Outcomes(np.arange(n), {"clean_accuracy": clean, ROBUST: rob, WORST: rob}, digests=digests) if outcomes else None
    return Scorecard(_record(n, clean=clean.mean(), robust=rob.mean(), **prov), o)


def test_scorecard_save_and_load_with_outcomes_and_hashes(tmp_path):
    card = _card()
    card.save(tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["junit.xml", "outcomes.json", "report.html", "scorecard.json", "summary.md"]
    record = json.loads((tmp_path / "scorecard.json").read_text())
    outputs = record["provenance"]["outputs"]
    assert set(outputs) == {"report.html", "junit.xml", "summary.md", "outcomes.json"}
    assert all(outputs[name] == sha256_file(tmp_path / name) for name in outputs)
    assert card.provenance["outputs"] == outputs
    assert "outputs" not in (tmp_path / "report.html").read_text()  # a rendering never shows its own hash
    loaded = Scorecard.load(tmp_path)
    assert loaded.record == record and loaded.outcomes is not None
    assert np.array_equal(loaded.outcomes.ids, card.outcomes.ids)
    assert all(np.array_equal(loaded.outcomes.flags[m], card.outcomes.flags[m]) for m in card.outcomes.flags)
    # saving again renders the same bytes: the previous save's hashes stay out of the renderings
    loaded.save(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "scorecard.json").read_text())["provenance"]["outputs"] == outputs


def test_scorecard_without_outcomes_removes_a_stale_file(tmp_path):
    _card().save(tmp_path)
    _card(outcomes=False).save(tmp_path)
    assert not (tmp_path / "outcomes.json").exists()
    assert set(json.loads((tmp_path / "scorecard.json").read_text())["provenance"]["outputs"]) == {"report.html", "junit.xml", "summary.md"}
    assert Scorecard.load(tmp_path / "scorecard.json").outcomes is None


def test_outcomes_beside_a_scorecard_must_belong_to_it(tmp_path):
    _card().save(tmp_path / "a")
    _card(outcomes=False).save(tmp_path / "b")
    other = (tmp_path / "a" / "outcomes.json").read_bytes()
    (tmp_path / "b" / "outcomes.json").write_bytes(other)
    assert Scorecard.load(tmp_path / "b").outcomes is None  # not among its outputs: another run's file
    (tmp_path / "a" / "outcomes.json").write_bytes(_outcomes(200, seed=5).to_json().encode())
    with pytest.raises(BadInput, match="does not match the sha256") as e:
        Scorecard.load(tmp_path / "a")
    assert e.value.where.endswith("outcomes.json")


def test_malformed_outcomes_beside_a_scorecard_is_bad_input(tmp_path):
    legacy = tmp_path / "legacy"  # a card that lists no outputs takes the file beside it at its word
    legacy.mkdir()
    (legacy / "scorecard.json").write_text(json.dumps(_record()))
    (legacy / "outcomes.json").write_text('{"schema_version": 1, "n": 2, "ids": "!!", "flags": {}}')
    with pytest.raises(BadInput) as e:
        Scorecard.load(legacy / "scorecard.json")
    assert e.value.where == str(legacy / "outcomes.json") and "not valid base64" in e.value.problem
    (legacy / "outcomes.json").write_text(_outcomes(150).to_json())
    with pytest.raises(BadInput, match="holds 150 samples but its scorecard was run on 200"):
        Scorecard.load(legacy)
    (legacy / "outcomes.json").write_text(_card().outcomes.to_json())
    assert Scorecard.load(legacy).outcomes.n == 200


def test_rejudge_pairs_outcomes_and_keeps_the_policy(tmp_path):
    base, now = _card(robust=0.5), _card(robust=0.47)
    base.save(tmp_path / "base")
    now.save(tmp_path / "now")
    base, now = Scorecard.load(tmp_path / "base"), Scorecard.load(tmp_path / "now")
    gate = [GateConfig(metric=ROBUST, max_drop=0.02)]
    (g,) = now.rejudge(gate, base).gates
    # the same random order picks the robust points, so the 94 robust now are a subset of the 100 before
    assert g["test"] == "mcnemar" and (g["n10"], g["n01"], g["n_pairs"]) == (6, 0, 200)
    assert g["drop"] == pytest.approx(0.03) and g["verdict"] == "inconclusive"
    assert g["flipped"]["n_worse"] == 6 and len(g["flipped"]["worse"]) == 6
    judged = now.rejudge(gate, base)
    assert (judged.passed, judged.verdict) == (False, "inconclusive") and judged.outcomes is now.outcomes
    lenient = now.rejudge(gate, base, on_inconclusive="pass")
    assert (lenient.passed, lenient.verdict, lenient.record["on_inconclusive"]) == (True, "inconclusive", "pass")
    stored = Scorecard({**now.record, "on_inconclusive": "pass"}, now.outcomes)  # the policy the run was built with
    assert stored.rejudge(gate, base).passed
    assert stored.rejudge(gate, base, on_inconclusive="fail").passed is False
    # a card re-judged with its own gates keeps each gate's own policy
    own = now.rejudge([GateConfig(metric=ROBUST, max_drop=0.02, on_inconclusive="pass")], base)
    assert own.rejudge(baseline=base).passed and own.rejudge(baseline=base).gates[0]["on_inconclusive_from"] == "gate"
    # outcomes of other samples at the same ids cannot be paired: the unpaired interval instead, saying why
    elsewhere = now.rejudge(gate, _card(robust=0.5, data=1, data_source="npz:other.npz")).gates[0]
    assert elsewhere["test"] == "unpaired" and elsewhere["pairing"].startswith("unpaired: 200 of the 200 shared sample ids hold different")
    lacking = now.rejudge(gate, _card(robust=0.5, outcomes=False)).gates[0]
    assert lacking["test"] == "unpaired" and lacking["pairing"] == "unpaired: no per-sample outcomes (outcomes.json) for the baseline"


def test_rejudge_without_a_baseline_judges_intervals():
    card = _card(robust=0.5)
    judged = card.rejudge([GateConfig(metric=ROBUST, min=0.45), GateConfig(metric="clean_accuracy", min=0.8)])
    assert [g["verdict"] for g in judged.gates] == ["inconclusive", "pass"]
    assert judged.gates[0]["ci95"] == pytest.approx([round(x, 6) for x in wilson_interval(100, 200)])
    assert math.isclose(judged.gates[1]["ci95"][0], wilson_interval(180, 200)[0], abs_tol=1e-6)
