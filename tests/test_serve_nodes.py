"""`spectrum-xdit serve` on two Ray nodes: ``ray.cluster_utils.Cluster`` starts both on this
machine, each bound to 127.0.0.1 (by default Ray binds the machine's interface address; these
tests send traffic to loopback only), each with 2 CPUs.

A rank that reserves 2 CPUs (``worker_cpus``) fits one per node, so a group of two ranks
placed with ``PACK`` spreads over both nodes, and meets through rank 0's TCP store (its ranks
have two Ray node ids), and two one-rank replicas sit one per node. Every wait is bounded.
"""

import time

import pytest

pytest.importorskip("ray.serve")
requests = pytest.importorskip("requests")

from serving import (TINY_WAN_SERVER, create_video, fresh_latents, npy, relative_error, served_latents,  # noqa: E402
                     with_own_store)
from spectrum_xdit.parallel.testing import free_port  # noqa: E402

pytestmark = pytest.mark.ray

LOOPBACK = "127.0.0.1"
NODE_CPUS = 2
STEPS = 6
SETTINGS = {**TINY_WAN_SERVER, "num_inference_steps": STEPS, "worker_cpus": float(NODE_CPUS),
            "placement_strategy": "PACK", "batching": "sequential"}


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes on loopback, a driver connected to them, and Serve's proxy on the head only
    (two proxies of one machine would want the same port); yields the port."""
    import ray
    from ray import serve
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    with pytest.MonkeyPatch.context() as patch:
        # ray.init turns 127.0.0.1 into this machine's interface address unless Ray takes the
        # machine for a one-node one (read at call time in the driver, at import in its children)
        patch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
        patch.setenv(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, "0")
        yield from _two_nodes(ray, serve, Cluster)


def _two_nodes(ray, serve, Cluster):
    nodes = Cluster(initialize_head=True, head_node_args={"node_ip_address": LOOPBACK, "num_cpus": NODE_CPUS,
                                                          "include_dashboard": False})
    try:
        nodes.add_node(node_ip_address=LOOPBACK, num_cpus=NODE_CPUS)
        ray.init(address=nodes.address, _node_ip_address=LOOPBACK, log_to_driver=False)
        assert {node["NodeManagerAddress"] for node in ray.nodes() if node["Alive"]} == {LOOPBACK}
        assert len([node for node in ray.nodes() if node["Alive"]]) == 2
        port = free_port()
        serve.start(proxy_location="HeadOnly", http_options={"host": LOOPBACK, "port": port})
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()
        nodes.shutdown()


def deploy(port: int, settings: dict) -> str:
    from ray import serve

    from spectrum_xdit.launch.serve.app import APP_NAME, build_app
    from spectrum_xdit.launch.serve.main import wait_until_ready

    serve.run(build_app(with_own_store(settings)), name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://{LOOPBACK}:{port}"
    wait_until_ready(url, timeout=300)
    return url


def undeploy() -> None:
    from ray import serve

    from spectrum_xdit.launch.serve.app import APP_NAME

    serve.delete(APP_NAME)


def bundle_nodes(cpus: float) -> list[list[str]]:
    """The node ids of each live placement group's bundles of ``cpus`` CPUs."""
    import ray

    groups = ray.util.placement_group_table().values()
    return [[group["bundles_to_node_id"][index] for index in sorted(group["bundles"])] for group in groups
            if group["state"] == "CREATED" and all(bundle.get("CPU") == cpus for bundle in group["bundles"].values())]


@pytest.mark.timeout(600)
def test_a_rank_group_spread_over_two_nodes_serves_its_one_process_run(cluster):
    url = deploy(cluster, SETTINGS)
    try:
        (group,) = bundle_nodes(float(NODE_CPUS))
        assert len(group) == 2 and len(set(group)) == 2, group    # one rank on each node
        payload = {"prompt": "two nodes", "seed": 31, "height": 32, "width": 48, "num_frames": 5}
        latents, report = served_latents(url, payload)
        assert relative_error(latents, fresh_latents(payload, STEPS)) <= 1e-5
        assert report["nfe"]
    finally:
        undeploy()


@pytest.mark.timeout(600)
def test_two_replicas_on_two_nodes_share_the_jobs(cluster):
    """Every job answers every poll, whichever replica the poll reaches, and each completes with its
    one-process run; both replicas run jobs (each completed job's report names the replica that
    ran it). Before the shared queue all 8 ran on the head node's replica, and the other none."""
    url = deploy(cluster, {**SETTINGS, "ulysses_degree": 1, "num_replicas": 2})
    try:
        replicas = bundle_nodes(float(NODE_CPUS))
        assert len(replicas) == 2 and len({nodes[0] for nodes in replicas}) == 2, replicas
        payloads = [{"prompt": f"shared {index}", "seed": 40 + index, "height": 32, "width": 48, "num_frames": 5,
                     "output_format": "npy"} for index in range(8)]
        ids = []
        for payload in payloads:
            created = create_video(url, payload)
            assert created.status_code == 200, created.text
            ids.append(created.json()["id"])
        polls, not_found, ran_on = 0, 0, set()
        deadline = time.monotonic() + 400
        for video_id in ids:
            while True:
                answer = requests.get(f"{url}/v1/videos/{video_id}", timeout=30)
                polls += 1
                not_found += answer.status_code == 404
                if answer.status_code == 200 and answer.json()["status"] in ("completed", "failed"):
                    break
                assert time.monotonic() < deadline, answer.text
                time.sleep(0.2)
            assert answer.json()["status"] == "completed", answer.text
            ran_on.add(answer.json()["report"]["replica"])
        assert not_found == 0, f"{not_found} of {polls} polls answered 404"
        for video_id, payload in zip(ids, payloads):
            content = requests.get(f"{url}/v1/videos/{video_id}/content", timeout=60)
            assert content.status_code == 200, content.text
            assert relative_error(npy(content.content), fresh_latents(payload, STEPS)) <= 1e-5
        # Serve's proxy (head node) prefers the replica of its own node: only a shared queue lets the other work
        assert len(ran_on) == 2, ran_on
    finally:
        undeploy()
