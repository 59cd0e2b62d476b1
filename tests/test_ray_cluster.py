"""The Ray engine on a two-node `ray.cluster_utils.Cluster` (a head and one more node, one CPU each,
both on 127.0.0.1): a node removed mid-run has its units retried on the other, and the results are
the local engine's bit for bit."""

from __future__ import annotations

import time

import pytest
import torch

pytestmark = pytest.mark.ray  # deselected in the default run; a skip under -m ray fails .ci/run


@pytest.fixture(scope="module")
def cluster():
    import logging

    ray = pytest.importorskip("ray")

    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 100 * 2**20, "include_dashboard": False})
    worker = c.add_node(num_cpus=1, object_store_memory=100 * 2**20)
    ray.init(address=c.address, logging_level=logging.WARNING, log_to_driver=False)
    c.wait_for_nodes()
    try:
        yield c, worker
    finally:
        ray.shutdown()
        c.shutdown()


def test_a_node_lost_mid_run_has_its_units_retried_and_the_results_do_not_change(cluster):
    from harness.attacks import PGD
    from harness.engines.base import Unit
    from harness.engines.cluster import RayEngine
    from harness.engines.local import LocalEngine
    from harness.sources.data import load_data
    from harness.sources.models import load_model
    from tests.test_engines import same

    c, worker_node = cluster
    model, _ = load_model("builtin:digits-cnn")
    data = load_data("builtin:digits", "test", 192, 0)
    units = [Unit(attack=PGD(steps=40), norm="linf", epsilon=0.1, rows=tuple(range(k, k + 16)), seed=k, batch_size=16)
             for k in range(0, 192, 16)]
    local = LocalEngine()
    local.start(model, data, [torch.device("cpu")])
    expected = local.run(units)

    engine = RayEngine(workers=2, threads=1)
    engine.start(model, data, [torch.device("cpu")])
    try:
        deadline = time.monotonic() + 120
        while engine.size < 2 and time.monotonic() < deadline:  # one worker on each node
            time.sleep(0.2)
        nodes = {info["node"] for info in engine._pool.info.values()}
        assert engine.size == 2 and len(nodes) == 2
        removed = []

        def lose_a_node(i, result):
            if not removed:
                removed.append(i)
                c.remove_node(worker_node)  # the other node's worker dies with units in flight

        got = engine.run(units, on_done=lose_a_node)
        assert engine._pool.lost == 1 and engine.retried >= 1
    finally:
        engine.close()
    assert len(got) == len(expected)
    assert all(same(a, b) for a, b in zip(got, expected))
