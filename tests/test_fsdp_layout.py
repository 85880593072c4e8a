"""What distributed.parallelize makes of a GPT under FSDP2, checked inside the process where a
torchrun run cannot show it: the device mesh FSDP shards on, and the dtype of what each unit
computes. One process in a gloo group of one is enough for that."""

import pytest
import torch
import torch.distributed as dist

from nanogpt import distributed, runtime
from model import GPT, GPTConfig

CONFIG = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=65, dropout=0.0, bias=False)


@pytest.fixture
def group_of_one():
    dist.init_process_group('gloo', store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_fsdp_shards_on_the_runs_device(group_of_one, monkeypatch):
    # torch reports the machine's accelerator, CUDA on any machine with a GPU, whatever --device
    # says; fully_shard without a mesh builds its mesh there and moves the weights to the GPU while
    # the batches stay on the CPU (pytorch#132471). This machine has no GPU, so the test reports
    # CUDA as a GPU machine does; everything else is the real FSDP: the mesh must be the run's own
    # device's, the weights stay put
    monkeypatch.setattr(torch._C, '_get_accelerator', lambda: torch.device('cuda'))
    torch.manual_seed(0)
    model = GPT(GPTConfig(**CONFIG))
    distributed.parallelize(model, 'cpu', 'float32', True, fsdp=True)
    params = dict(model.named_parameters())
    assert all(
        p.device_mesh.device_type == 'cpu' and p.device.type == 'cpu' for p in params.values()
    )
    x = torch.randint(65, (2, 16))
    _, loss = model(x, x)
    loss.backward()
    assert all(p.grad.device.type == 'cpu' for p in params.values())


def test_fsdp_in_bfloat16_keeps_what_autocast_keeps_in_float32(group_of_one):
    # under autocast without FSDP the residual stream, the LayerNorm gains and the embeddings stay
    # float32 and only matmuls run in bfloat16; FSDP must gather the matmul weights in bfloat16 and
    # nothing else
    torch.manual_seed(0)
    model = GPT(GPTConfig(**CONFIG))
    distributed.parallelize(model, 'cpu', 'bfloat16', True, fsdp=True)
    seen = {}
    for name, module in model.named_modules():
        if name in (
            'transformer.wte',
            'transformer.h.1.ln_1',
            'transformer.h.1.attn.c_attn',
            'transformer.ln_f',
        ):
            module.register_forward_hook(
                lambda m, args, out, name=name: seen.update(
                    {name: (args[0].dtype, m.weight.dtype, out.dtype)}
                )
            )
    x = torch.randint(65, (2, 16))
    with runtime.autocast_context('cpu', 'bfloat16'):
        _, loss = model(x, x)
    f32, bf16 = torch.float32, torch.bfloat16
    assert seen == {
        'transformer.wte': (torch.long, f32, f32),  # so tok_emb + pos_emb is float32
        'transformer.h.1.ln_1': (f32, f32, f32),  # a Block's input: the residual stream
        'transformer.h.1.attn.c_attn': (f32, bf16, bf16),  # autocast casts the input
        'transformer.ln_f': (f32, f32, f32),
    }
    assert loss.dtype == f32
