"""MoE balancing under data parallelism (issue 11, point 5): with the balancer's group set, the load-balancing
loss of 2 gloo ranks (each half the batch, gradients averaged as FSDP/DDP do) equals the loss and the router
gradients of one process on the whole batch, and both ranks move the routing bias by the same global loads."""

import pytest
import torch
import torch.distributed as dist
from parallel_workers import spawn
from tiny_moe import tiny_nemotron_h

from audex.parts.moe import MoeBalancer

pytestmark = pytest.mark.slow
ROWS, LENGTH = 4, 24


def batch():
    ids = torch.randint(0, 64, (ROWS, LENGTH), generator=torch.Generator().manual_seed(1))
    valid = torch.ones(ROWS, LENGTH, dtype=torch.bool)
    valid[1, 15:] = False                        # padding, on rank 0's half only: the halves count differently
    valid[3, 20:] = False
    return ids, valid


def aux_step(rows, group=None):
    """The balancing loss alone on ``rows`` of the batch: (loss, router gradients, biases after one update)."""
    lm = tiny_nemotron_h()
    balancer = MoeBalancer(lm, bias_update_rate=1e-3, aux_loss_coeff=1e-2)
    balancer.group = group
    ids, valid = batch()
    with balancer.recording(valid[rows]):
        lm(input_ids=ids[rows], use_cache=False)
    aux = balancer.load_balancing_loss()
    aux.backward()
    grads = {n: p.grad.clone() for n, p in lm.named_parameters() if n.endswith("gate.weight")}
    balancer.update_bias()
    biases = {name: r.e_score_correction_bias.clone() for name, r in balancer.routers}
    return aux.detach(), grads, biases


def worker(rank, world, tmp):
    loss, grads, biases = aux_step(slice(2 * rank, 2 * rank + 2), group=dist.group.WORLD)
    for g in grads.values():                     # FSDP/DDP average the gradients over the data-parallel ranks
        dist.all_reduce(g)
        g /= world
    dist.all_reduce(loss)
    torch.save((loss / world, grads, biases), tmp / f"rank{rank}.pt")


def test_two_data_parallel_ranks_equal_one_process(tmp_path):
    spawn(worker, 2, tmp_path)
    ref_loss, ref_grads, ref_biases = aux_step(slice(0, ROWS))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for loss, grads, biases in ranks:
        assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=0), (loss, ref_loss)
        for name, g in ref_grads.items():
            assert g.abs().sum() > 0
            torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-9)
        for name, b in ref_biases.items():
            assert torch.equal(biases[name], b)  # both ranks moved the bias by the same global loads
    # without the group, each rank's loss is its own half's: the mean differs from the whole batch's
    halves = [aux_step(slice(2 * r, 2 * r + 2))[0] for r in range(2)]
    assert not torch.allclose(sum(halves) / 2, ref_loss, rtol=1e-5, atol=0)
