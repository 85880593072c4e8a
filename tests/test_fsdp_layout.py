"""What runtime.parallelize makes of a GPT under FSDP2, checked inside the process where a torchrun run
cannot show it: the device mesh FSDP shards on. One process in a gloo group of one is enough for that."""
import pytest
import torch
import torch.distributed as dist

import runtime
from model import GPT, GPTConfig

CONFIG = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=65, dropout=0.0, bias=False)


@pytest.fixture
def group_of_one():
    dist.init_process_group('gloo', store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_fsdp_shards_on_the_runs_device(group_of_one, monkeypatch):
    # torch reports the machine's accelerator, CUDA on any machine with a GPU, whatever --device says;
    # fully_shard without a mesh builds its mesh there and moves the weights to the GPU while the batches
    # stay on the CPU (pytorch#132471). This machine has no GPU, so the test reports CUDA as a GPU machine
    # does; everything else is the real FSDP: the mesh must be the run's own device's, the weights stay put
    monkeypatch.setattr(torch._C, '_get_accelerator', lambda: torch.device('cuda'))
    torch.manual_seed(0)
    model = GPT(GPTConfig(**CONFIG))
    runtime.parallelize(model, 'cpu', 'float32', True, fsdp=True)
    params = dict(model.named_parameters())
    assert all(p.device_mesh.device_type == 'cpu' and p.device.type == 'cpu' for p in params.values())
    x = torch.randint(65, (2, 16))
    _, loss = model(x, x)
    loss.backward()
    assert all(p.grad.device.type == 'cpu' for p in params.values())
