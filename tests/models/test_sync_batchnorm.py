"""dino_fast.models.CpuSyncBatchNorm: torch's SyncBatchNorm for CPU process groups (gloo), which
torch's refuses. Against ``nn.BatchNorm2d`` over the whole batch, in float64: outputs, input gradients,
parameter gradients (summed over ranks, as the batch's loss is the sum of the ranks' losses) and
running statistics, with ranks holding unequal shares."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision
from torch import nn

from dino_fast.models import CpuSyncBatchNorm, convert_sync_batchnorm

SHARES = (3, 5)  # samples per rank: unequal, so a mean of the ranks' means would be wrong


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(sum(SHARES), 4, 3, 5, generator=g, dtype=torch.float64) * 3 + 1
    upstream = torch.randn(x.shape, generator=g, dtype=torch.float64)  # d(loss)/d(output)
    return x, upstream


def reference(momentum: float | None) -> dict[str, torch.Tensor]:
    """One plain batch norm over the whole batch, two training steps."""
    bn = nn.BatchNorm2d(4, momentum=momentum).double()
    nn.init.uniform_(bn.weight, 0.5, 1.5)
    nn.init.uniform_(bn.bias, -0.5, 0.5)
    x, upstream = batch()
    for _ in range(2):
        x = x.detach().requires_grad_()
        bn.zero_grad()
        out = bn(x)
        (out * upstream).sum().backward()
    return {"out": out, "grad_x": x.grad, "grad_w": bn.weight.grad, "grad_b": bn.bias.grad, **bn.state_dict()}


def _rank(rank: int, world: int, init_file: str, momentum: float | None, result: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # the same initial parameters as the reference
        bn = convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(4, momentum=momentum)), "cpu").double()[0]
        nn.init.uniform_(bn.weight, 0.5, 1.5)
        nn.init.uniform_(bn.bias, -0.5, 0.5)
        x_all, upstream_all = batch()
        mine = slice(0, SHARES[0]) if rank == 0 else slice(SHARES[0], None)
        for _ in range(2):
            x = x_all[mine].clone().requires_grad_()
            bn.zero_grad()
            out = bn(x)
            (out * upstream_all[mine]).sum().backward()
        for grad in (bn.weight.grad, bn.bias.grad):
            dist.all_reduce(grad)
        grads = {"out": out.detach(), "grad_x": x.grad, "grad_w": bn.weight.grad, "grad_b": bn.bias.grad}
        result[rank] = {**grads, **bn.state_dict()}  # one assignment: the manager's dict holds copies
        bn.eval()  # inference normalizes with the running statistics and synchronizes nothing
        with torch.no_grad():
            result[("eval", rank)] = bn(x_all[mine])
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum-0.1", "cumulative-average"])
def test_two_gloo_ranks_normalize_as_one_batch_norm_over_the_whole_batch(tmp_path, momentum) -> None:
    torch.manual_seed(0)
    expected = reference(momentum)
    result = mp.Manager().dict()
    mp.spawn(_rank, args=(2, str(tmp_path / "init"), momentum, result), nprocs=2, join=True)
    for name in ("out", "grad_x"):
        got = torch.cat([result[0][name], result[1][name]])
        torch.testing.assert_close(got, expected[name], rtol=1e-10, atol=1e-12, msg=name)
    for rank in (0, 1):
        for name in ("grad_w", "grad_b", "running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(result[rank][name], expected[name], rtol=1e-10, atol=1e-12, msg=name)
    # Eval: the reference's running statistics applied to each rank's share.
    bn = nn.BatchNorm2d(4).double().eval()
    bn.load_state_dict(
        {k: expected[k] for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    )
    x, _ = batch()
    torch.testing.assert_close(torch.cat([result[("eval", 0)], result[("eval", 1)]]), bn(x))


def test_without_a_process_group_it_is_a_plain_batch_norm() -> None:
    torch.manual_seed(0)
    plain = nn.BatchNorm2d(4).double()
    synced = convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(4)), "cpu").double()[0]
    synced.load_state_dict(plain.state_dict())
    x, _ = batch()
    torch.testing.assert_close(synced(x), plain(x), rtol=0, atol=0)
    torch.testing.assert_close(synced.running_var, plain.running_var, rtol=0, atol=0)


def test_a_ddp_module_on_a_cpu_accepts_it(tmp_path) -> None:
    # DDP refuses torch's SyncBatchNorm on a CPU ("SyncBatchNorm layers only work with GPU modules").
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        model = convert_sync_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), "cpu")
        nn.parallel.DistributedDataParallel(model)(torch.randn(2, 3, 4, 4)).sum().backward()
    finally:
        dist.destroy_process_group()


def test_on_an_accelerator_the_conversion_is_torchs() -> None:
    model = convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(4)), "cuda")
    assert type(model[0]) is nn.SyncBatchNorm


def test_conversion_keeps_every_key_and_value_of_a_resnet() -> None:
    model = torchvision.models.resnet18()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = convert_sync_batchnorm(model, "cpu")
    norms = [m for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(type(m) is CpuSyncBatchNorm for m in norms)
    after = converted.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())
