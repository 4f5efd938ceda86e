"""Run under torchrun (4 processes, gloo) by tests/parallel/test_muon.py: the owner-rank
orthogonalisation of sharded matrices equals orthogonalising each whole matrix, bit for bit,
for rows and columns split unevenly and a last batch padded (6 matrices over 4 ranks)."""

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from gigatrain.parallel.muon import orthogonalize, orthogonalized_shards

dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (4,))
torch.manual_seed(0)
wholes = [torch.randn(shape) for shape in [(10, 7), (10, 7), (7, 10), (10, 7), (10, 7), (13, 3)]]
for dim in (0, 1):
    likes = [distribute_tensor(whole, mesh, [Shard(dim)]) for whole in wholes]
    got = orthogonalized_shards([like.to_local() for like in likes], likes, torch.float32)
    for whole, shard in zip(wholes, got):
        expected = distribute_tensor(orthogonalize(whole, torch.float32), mesh, [Shard(dim)]).to_local()
        assert torch.equal(shard, expected), (dim, tuple(whole.shape), (shard - expected).abs().max().item())
dist.destroy_process_group()
