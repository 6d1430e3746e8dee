"""RigL on FSDP2-sharded parameters (``rigl_func.fsdp``), 2 processes, gloo, CPU.

``fully_shard`` runs on CPU with gloo in torch 2.13/2.14, so this is a real test (on an
explicit CPU device mesh: the default mesh is on ``cuda:0`` when a GPU is present): a
float64 MLP whose Linear layers are each ``fully_shard``-ed is trained with
``torch.optim.SGD`` (momentum) on DTensor parameters; every rank gathers the sparse
layers at an update (:func:`rigl_func.fsdp.update_topology_sharded`) and keeps its
shard. The masks after every update must equal - bitwise - those of the unsharded
functional run (same seed, gradients averaged with ``all_reduce_mean``), and the final
weights must be allclose (the optimizers round differently in the last bits).
Cases: RigL, SNFS (EMA gathered every step) and RigL with ``grad_accumulation_n=3``.
"""

from __future__ import annotations

import json
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import _dist_workers as W

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo not available"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    pytest.importorskip("torch.distributed.fsdp", reason="torch.distributed.fsdp not available")
    from torch.distributed import fsdp

    if not hasattr(fsdp, "fully_shard"):
        pytest.skip(f"torch {torch.__version__} has no torch.distributed.fsdp.fully_shard (FSDP2)")
    out = tmp_path_factory.mktemp("fsdp")
    mp.spawn(W.fsdp_phase, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("method,k", W.FSDP_CASES)
def test_fsdp2_masks_equal_unsharded_run(results, method, k):
    for rank, res in enumerate(results):
        outcome = res[f"fsdp_{method}_k{k}"]
        assert outcome == "ok", f"rank {rank}:\n{outcome}"


def test_local_shard_is_identity_for_plain_tensors():
    from rigl_func.fsdp import local_masks, local_shard

    full = torch.arange(6).view(3, 2)
    assert local_shard(full, torch.zeros(3, 2)) is full
    assert local_masks({"w": full > 2}, {"w": torch.zeros(3, 2)})["w"].tolist() == [[False, False], [False, True],
                                                                                     [True, True]]
