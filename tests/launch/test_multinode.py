"""Two nodes on one machine: two torchrun agents (``--nnodes=2``, c10d rendezvous on
localhost, one rank each) train 10 steps whose losses equal a 2-rank single-node run's (the
same global batch; atol 1e-6 in fp32). The multi-node command lines are in docs/multinode.md.
"""

from __future__ import annotations

import socket

import pytest
import torch

from launch.launcher import free_port
from tests.launch import elastic

pytestmark = pytest.mark.slow
STEPS = 10


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_two_single_rank_nodes_match_one_two_rank_node(
    elastic_config, two_rank_reference, tmp_path
):
    port = free_port()
    run_dir = tmp_path / "run"  # a shared file system in a real cluster
    launches = []
    try:
        for node_rank in (0, 1):
            # Both agents run on the endpoint's host here, so say which one hosts the
            # rendezvous store (as node 0 does on a cluster) instead of letting both try;
            # a long read timeout keeps a loaded CI machine from failing a store read.
            command = elastic.torchrun(
                "--nnodes=2", f"--node_rank={node_rank}", "--nproc_per_node=1",
                "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
                "--rdzv_id=two-nodes", f"--rdzv_conf=is_host={int(node_rank == 0)},read_timeout=300",
                train_args=[str(elastic_config), "--run-dir", str(run_dir),
                            f"--set=train.stop_at={STEPS}"],
            )  # fmt: skip
            log = tmp_path / f"node{node_rank}.txt"
            launches.append((elastic.start(command, tmp_path, log), log))
            if node_rank == 0:
                elastic.wait_for(lambda: _listening(port), 120, "node 0's rendezvous store")
        for launch, log in launches:
            assert launch.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        for launch, _ in launches:
            elastic.stop(launch)
    output = "".join(log.read_text() for _, log in launches)
    assert "world size 2 | backend gloo | launcher torchrun" in output, output[-3000:]
    rows = elastic.records(run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    # stop_at keeps train.steps, so the schedule is the reference's for these 10 steps.
    for key in ("loss", "ce_loss", "aux_loss", "z_loss"):
        got = torch.tensor([r[key] for r in rows], dtype=torch.float64)
        want = torch.tensor([r[key] for r in two_rank_reference[:STEPS]], dtype=torch.float64)
        assert torch.allclose(got, want, rtol=0, atol=1e-6), (key, (got - want).abs().max())
