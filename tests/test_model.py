"""model.py against references: Hugging Face's GPT-2, nanoGPT's checkpoint format, and itself
(SDPA vs explicit attention, cached vs uncached generation)."""

import math
import os
import subprocess
import sys

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from nanogpt import checkpoints
import model as model_py
from model import GPT, GPTConfig
from nanogpt import hf as hf_py
from nanogpt.generate import KVCache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32, dropout=0.0)


def tiny_gpt(seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, **kw})).eval()


def all_logits(model, idx):
    logits, _ = model(idx, targets=torch.zeros_like(idx))  # with targets: logits at every position
    return logits


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random GPT-2 saved in Hugging Face format (what from_pretrained reads offline)."""
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=2, initializer_range=0.2
        )
    )  # large weights make the test sharp
    path = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(path)
    return path, hf.eval()


@pytest.mark.architecture
def test_from_pretrained_local_dir_matches_transformers(hf_dir):
    path, hf = hf_dir
    model = GPT.from_pretrained(str(path)).eval()
    assert model.config.block_size == 16 and model.config.vocab_size == 50 and model.config.bias
    idx = torch.randint(0, 50, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(idx).logits
        ours = all_logits(model, idx)
    assert model.config.gelu == 'tanh'  # GPT-2's 'gelu_new'
    assert (ours - ref).abs().max().item() <= 1e-5
    # greedy generation agrees with transformers' own greedy decoding
    out = model.generate(idx[:1, :4], 8, temperature=0)
    ref_out = hf.generate(idx[:1, :4], max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref_out)


class RMSNorm(torch.nn.Module):
    """A researcher's change: RMSNorm for LayerNorm, a gain and no bias."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(ndim))

    def forward(self, x):
        return torch.nn.functional.rms_norm(x, self.weight.shape, self.weight, 1e-5)


class RMSNormWithBias(RMSNorm):
    """The same change with GPT-2's parameter names and shapes: only the function tells it apart."""

    def __init__(self, ndim, bias):
        super().__init__(ndim, bias)
        self.bias = torch.nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return super().forward(x) + (0 if self.bias is None else self.bias)


@pytest.mark.parametrize(
    "norm, imported, exported",
    [
        (
            RMSNorm,
            "parameters differ from .*: missing none; unexpected transformer.h.0.ln_1.bias, ",
            "parameters differ from GPT-2's format: missing transformer.h.0.ln_1.bias, ",
        ),
        (
            RMSNormWithBias,
            "computes another function than .* with the same weights",
            "computes another function than GPT-2's format with the same weights",
        ),
    ],
)
@pytest.mark.architecture
def test_a_changed_architecture_is_refused_by_import_and_export(
    hf_dir, tmp_path, monkeypatch, norm, imported, exported
):
    path, _ = hf_dir
    monkeypatch.setattr(model_py, 'LayerNorm', norm)
    with pytest.raises(ValueError, match=imported) as refused:
        GPT.from_pretrained(str(path))
    assert '\n' not in str(refused.value)
    export = tmp_path / 'export'
    with pytest.raises(ValueError, match=exported) as refused:
        tiny_gpt(bias=True).export_hf(str(export))
    assert '\n' not in str(refused.value) and not export.exists()  # nothing written


@pytest.mark.architecture
def test_from_pretrained_dropout_override_and_bad_args(hf_dir):
    path, _ = hf_dir
    assert GPT.from_pretrained(str(path), dict(dropout=0.2)).config.dropout == 0.2
    with pytest.raises(ValueError, match="only dropout"):
        GPT.from_pretrained(str(path), dict(n_layer=3))
    with pytest.raises(
        ValueError, match="unknown pretrained model 'gpt3'.*gpt2-xl.*local directory"
    ):
        GPT.from_pretrained("gpt3")


def test_from_pretrained_offline_error_names_model_and_local_dir(tmp_path):
    code = (
        "from model import GPT\n"
        "try:\n    GPT.from_pretrained('gpt2-medium')\n"
        "except OSError as e:\n    print('ERR', e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    line = [l for l in out.stdout.splitlines() if l.startswith("ERR")]
    assert line, out.stdout + out.stderr
    assert len(line) == 1 and "'gpt2-medium'" in line[0] and "init_from='/path/to/gpt2'" in line[0]


@pytest.mark.parametrize(
    "bias, vocab_size, export_vocab, gelu, hf_name",
    [(True, 50, None, 'tanh', 'gelu_new'), (False, 64, 50, 'exact', 'gelu')],
)
@pytest.mark.architecture
@pytest.mark.format
def test_export_roundtrip_through_transformers(
    tmp_path, bias, vocab_size, export_vocab, gelu, hf_name
):
    model = tiny_gpt(bias=bias, vocab_size=vocab_size, gelu=gelu)
    with torch.no_grad():  # move every parameter off its init value so all of them are checked
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    hf_py.export_hf(model, tmp_path, vocab_size=export_vocab)  # model.export_hf calls it
    assert (tmp_path / "config.json").exists() and (tmp_path / "model.safetensors").exists()
    hf = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert hf.config.activation_function == hf_name
    idx = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        ref = hf(idx).logits
        ours = all_logits(model, idx)[..., : ref.size(-1)]
    assert ref.size(-1) == (export_vocab or vocab_size)
    assert (ours - ref).abs().max().item() <= 1e-5
    # and back again: our loader reads what we wrote, GELU included (nanoGPT's GPT.from_pretrained
    # calls hf.from_pretrained)
    again = GPT.from_pretrained(str(tmp_path)).eval()
    assert again.config.gelu == gelu
    assert torch.allclose(all_logits(again, idx), ref, atol=1e-5)


@pytest.mark.architecture
def test_from_pretrained_refuses_an_activation_it_does_not_have(tmp_path):
    GPT2LMHeadModel(
        GPT2Config(
            vocab_size=50,
            n_positions=16,
            n_embd=32,
            n_layer=1,
            n_head=2,
            activation_function='relu',
        )
    ).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="activation_function 'relu' is not a GELU"):
        GPT.from_pretrained(str(tmp_path))


def test_sdpa_and_explicit_attention_agree():
    model = tiny_gpt()
    idx = torch.randint(0, 50, (4, 16))
    fast = all_logits(model, idx)
    for block in model.transformer.h:
        block.attn.flash = False
    slow = all_logits(model, idx)
    assert (fast - slow).abs().max().item() < 1e-5


@pytest.mark.smoke
def test_causality():
    model = tiny_gpt()
    idx = torch.randint(0, 50, (1, 16))
    t = 7
    changed = idx.clone()
    changed[0, t + 1] = (idx[0, t + 1] + 1) % 50
    a, b = all_logits(model, idx), all_logits(model, changed)
    assert torch.equal(a[:, : t + 1], b[:, : t + 1])
    assert not torch.allclose(a[:, t + 1], b[:, t + 1])


@pytest.mark.smoke
def test_loss_at_init_is_uniform():
    model = tiny_gpt(vocab_size=65)
    g = torch.Generator().manual_seed(0)
    idx, targets = (
        torch.randint(0, 65, (32, 16), generator=g),
        torch.randint(0, 65, (32, 16), generator=g),
    )
    logits, loss = model(idx, targets)
    assert logits.shape == (32, 16, 65)
    assert abs(loss.item() - math.log(65)) < 0.1
    ignored = targets.clone()
    ignored[:, :8] = -1  # ignore_index=-1: the loss is the mean over the other positions only
    _, partial = model(idx, ignored)
    ref = torch.nn.functional.cross_entropy(
        logits[:, 8:].reshape(-1, 65), targets[:, 8:].reshape(-1)
    )
    assert torch.allclose(partial, ref)
    last, none = model(idx)
    assert (
        none is None
        and last.shape == (32, 1, 65)
        and torch.allclose(last[:, 0], logits[:, -1], atol=1e-6)
    )


def test_init_statistics():
    model = GPT(GPTConfig(block_size=64, vocab_size=512, n_layer=4, n_head=4, n_embd=256))
    sd = dict(model.named_parameters())
    assert abs(sd["transformer.h.0.attn.c_attn.weight"].std().item() - 0.02) < 0.002
    assert abs(sd["transformer.h.0.mlp.c_proj.weight"].std().item() - 0.02 / math.sqrt(8)) < 0.001
    assert sd["transformer.h.0.attn.c_attn.bias"].abs().max().item() == 0
    assert model.lm_head.weight is model.transformer.wte.weight


@pytest.mark.smoke
def test_kv_cache_forward_matches_full_forward():
    model = tiny_gpt()
    idx = torch.randint(0, 50, (2, 16))
    full = all_logits(model, idx)
    for flash in (True, False):
        for block in model.transformer.h:
            block.attn.flash = flash
        cache = KVCache.empty(model.config, 2, 'cpu')
        chunks = [model(idx[:, :5], kv_cache=cache)[0]]  # prefill, then one position at a time,
        # and a multi-token step after a prefix
        chunks.append(model(idx[:, 5:9], kv_cache=cache)[0])
        for t in range(9, 16):
            chunks.append(model(idx[:, t : t + 1], kv_cache=cache)[0])
        last = torch.cat(chunks, dim=1)  # (B, 2 + 7, V): the last logits of each call
        assert torch.allclose(last[:, 0], full[:, 4], atol=1e-5)
        assert torch.allclose(last[:, 1], full[:, 8], atol=1e-5)
        assert torch.allclose(last[:, 2:], full[:, 9:], atol=1e-5)


def test_cached_and_uncached_generation_agree():
    model = tiny_gpt()
    prompt = torch.randint(0, 50, (3, 4))
    greedy = model.generate(prompt, 12, temperature=0)
    assert torch.equal(greedy, model.generate(prompt, 12, temperature=0, use_cache=False))
    for top_k in (None, 5):
        torch.manual_seed(123)
        a = model.generate(prompt, 12, temperature=0.8, top_k=top_k)
        torch.manual_seed(123)
        b = model.generate(prompt, 12, temperature=0.8, top_k=top_k, use_cache=False)
        assert torch.equal(a, b)
    assert a.shape == (3, 16)


def test_generation_past_block_size_uses_the_documented_window():
    model = tiny_gpt()
    bs, keep = model.config.block_size, model.config.block_size // 2
    seq = model.generate(torch.randint(0, 50, (1, 3)), 40, temperature=0)
    assert seq.shape == (1, 43)
    # token j was predicted from seq[start:j]; the window grows to block_size, then restarts from
    # the last block_size // 2 tokens
    start = 0
    for j in range(3, 43):
        if j - start > bs:
            start = j - keep
        assert seq[0, j].item() == model(seq[:, start:j])[0][0, -1].argmax().item()
    # nanoGPT's uncached path also works past block_size (a sliding window)
    assert model.generate(torch.randint(0, 50, (1, 3)), 40, use_cache=False).shape == (1, 43)


def test_temperature_zero_and_top_k():
    model = tiny_gpt()
    prompt = torch.randint(0, 50, (1, 5))
    out = model.generate(prompt, 1, temperature=0)
    assert out[0, -1] == model(prompt)[0][0, -1].argmax()
    top2 = set(model(prompt)[0][0, -1].topk(2).indices.tolist())
    torch.manual_seed(0)
    picks = {model.generate(prompt, 1, temperature=5.0, top_k=2)[0, -1].item() for _ in range(40)}
    assert picks <= top2 and len(picks) == 2


@pytest.mark.architecture
@pytest.mark.format
def test_nanogpt_checkpoint_with_orig_mod_prefix_loads(tmp_path):
    src = tiny_gpt(seed=3)
    model_args = dict(
        n_layer=2, n_head=2, n_embd=32, block_size=16, bias=True, vocab_size=50, dropout=0.0
    )
    optimizer = src.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu", verbose=False)
    ckpt = {
        "model": {"_orig_mod." + k: v for k, v in src.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "model_args": model_args,
        "iter_num": 5,
        "best_val_loss": torch.tensor(2.5),
        "config": {"dataset": "x"},
    }
    torch.save(ckpt, tmp_path / "ckpt.pt")
    loaded = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model = GPT(GPTConfig(**loaded["model_args"])).eval()
    model.load_state_dict(loaded["model"])
    idx = torch.randint(0, 50, (2, 16))
    assert torch.equal(all_logits(model, idx), all_logits(src, idx))
    # and our state_dict has exactly nanoGPT's parameter names, so nanoGPT can load ours
    names = set(model.state_dict())
    expected = {
        "transformer.wte.weight",
        "transformer.wpe.weight",
        "transformer.ln_f.weight",
        "transformer.ln_f.bias",
        "lm_head.weight",
    }
    for i in range(2):
        for part in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
            expected |= {f"transformer.h.{i}.{part}.weight", f"transformer.h.{i}.{part}.bias"}
    assert names == expected


def nanogpt_logits(sd, args, idx):
    """nanoGPT's GPT.forward with targets, written out in plain torch ops from a state dict: its
    exact GELU (nn.GELU()), its explicit masked-softmax attention. idx (B, T) -> logits (B, T, V).
    """
    sd = {k.removeprefix('_orig_mod.'): v for k, v in sd.items()}
    B, T = idx.shape
    C, nh = args['n_embd'], args['n_head']

    def linear(x, name):
        y = x @ sd[name + '.weight'].T
        return y + sd[name + '.bias'] if args['bias'] else y

    def layer_norm(x, name):
        y = (x - x.mean(-1, keepdim=True)) / torch.sqrt(
            x.var(-1, unbiased=False, keepdim=True) + 1e-5
        )
        y = y * sd[name + '.weight']
        return y + sd[name + '.bias'] if args['bias'] else y

    x = sd['transformer.wte.weight'][idx] + sd['transformer.wpe.weight'][:T]  # (B, T, C)
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    for i in range(args['n_layer']):
        h = f'transformer.h.{i}.'
        q, k, v = linear(layer_norm(x, h + 'ln_1'), h + 'attn.c_attn').split(C, dim=2)
        q, k, v = (t.view(B, T, nh, C // nh).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        att = (
            (q @ k.transpose(-2, -1) / math.sqrt(C // nh))
            .masked_fill(future, float('-inf'))
            .softmax(-1)
        )
        x = x + linear((att @ v).transpose(1, 2).reshape(B, T, C), h + 'attn.c_proj')
        m = linear(layer_norm(x, h + 'ln_2'), h + 'mlp.c_fc')  # (B, T, 4C)
        m = 0.5 * m * (1 + torch.erf(m / math.sqrt(2)))  # the exact GELU
        x = x + linear(m, h + 'mlp.c_proj')
    return layer_norm(x, 'transformer.ln_f') @ sd['lm_head.weight'].T


@pytest.mark.architecture
@pytest.mark.format
@pytest.mark.parametrize("bias", [False, True])
def test_nanogpt_checkpoint_computes_nanogpts_function(tmp_path, bias):
    model_args = dict(
        n_layer=2, n_head=2, n_embd=32, block_size=16, bias=bias, vocab_size=50, dropout=0.0
    )
    src = tiny_gpt(seed=4, bias=bias)
    with torch.no_grad():  # weights large enough that the GELU's inputs are of order 1
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    optimizer = src.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu", verbose=False)
    # exactly nanoGPT's keys
    torch.save(
        {
            "model": {"_orig_mod." + k: v for k, v in src.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "model_args": model_args,
            "iter_num": 5,
            "best_val_loss": torch.tensor(2.5),
            "config": {"dataset": "x", "init_from": "scratch"},
        },
        tmp_path / "ckpt.pt",
    )
    ckpt = checkpoints.load_checkpoint(str(tmp_path / "ckpt.pt"))
    idx = torch.randint(0, 50, (3, 16), generator=torch.Generator().manual_seed(2))
    # float64 on both sides, so only the function, not float32 rounding, can differ
    ref = nanogpt_logits({k: v.double() for k, v in ckpt["model"].items()}, model_args, idx)
    for gelu, close in ((checkpoints.checkpoint_gelu(ckpt), True), ("tanh", False)):
        # as sample.py and train.py build it
        model = GPT(GPTConfig(**ckpt["model_args"], gelu=gelu))
        model.load_state_dict(ckpt["model"])
        diff = (all_logits(model.double().eval(), idx) - ref).abs().max().item()
        # tanh: the test can tell them apart
        assert (diff <= 1e-6) if close else (diff > 1e-4), (gelu, diff)


@pytest.mark.format
def test_checkpoint_gelu_record_and_checkpoints_without_one():
    assert checkpoints.checkpoint_gelu({"model_args": {}, "gelu": "tanh"}) == "tanh"
    assert (
        checkpoints.checkpoint_gelu({"model_args": {}, "gelu": "exact", "sampler_state": None})
        == "exact"
    )
    # nanoGPT's keys only: nanoGPT's nn.GELU(), even when finetuned from GPT-2
    assert (
        checkpoints.checkpoint_gelu({"model_args": {}, "config": {"init_from": "gpt2"}}) == "exact"
    )
    # ours from before the record: this code trained every model with the tanh GELU then
    assert (
        checkpoints.checkpoint_gelu(
            {"model_args": {}, "sampler_state": None, "config": {"init_from": "scratch"}}
        )
        == "tanh"
    )
    with pytest.raises(ValueError, match="gelu must be 'exact' or 'tanh', got 'relu'"):
        GPT(GPTConfig(**TINY, gelu="relu"))


@pytest.mark.parametrize(
    "name, shape, total",
    [
        ("gpt2", (12, 12, 768), 124_439_808),
        ("gpt2-medium", (24, 16, 1024), 354_823_168),
        ("gpt2-large", (36, 20, 1280), 774_030_080),
        ("gpt2-xl", (48, 25, 1600), 1_557_611_200),
    ],
)
@pytest.mark.architecture
def test_gpt2_parameter_counts(name, shape, total):
    with torch.device("meta"):
        model = GPT(
            GPTConfig(
                vocab_size=50257,
                block_size=1024,
                bias=True,
                n_layer=shape[0],
                n_head=shape[1],
                n_embd=shape[2],
            )
        )
    assert model.get_num_params(non_embedding=False) == total
    assert model.get_num_params() == total - 1024 * shape[2]
    if name == "gpt2":
        assert f"{model.get_num_params() / 1e6:.2f}M" == "123.65M"


@pytest.mark.architecture
def test_crop_block_size():
    model = tiny_gpt()
    idx = torch.randint(0, 50, (1, 8))
    before = all_logits(model, idx)
    model.crop_block_size(8)
    assert model.transformer.wpe.weight.shape == (8, 32)
    assert torch.equal(all_logits(model, idx), before)
    with pytest.raises(
        ValueError, match="Cannot forward sequence of length 9, block size is only 8"
    ):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="block_size 32 is larger than the model.s 8"):
        model.crop_block_size(32)


@pytest.mark.architecture
def test_configure_optimizers_groups_and_fused(capsys):
    model = tiny_gpt()
    opt = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), "cpu")
    decay, nodecay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and nodecay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(
        p.dim() < 2 for p in nodecay["params"]
    )
    assert len(decay["params"]) + len(nodecay["params"]) == len(list(model.parameters()))
    assert opt.defaults["fused"] is True  # torch 2.13 has the fused AdamW on CPU
    out = capsys.readouterr().out
    assert "num decayed parameter tensors: 10" in out and "using fused AdamW: True" in out


@pytest.mark.architecture
@pytest.mark.parametrize("trains", ["all", "freeze 3 of 4", "lora rank 8"])
def test_flops_per_token_are_the_flops_a_training_step_does(trains):
    """flops_per_token (estimate_mfu's count) against torch's own count of one forward and
    backward: frozen layers and LoRA's frozen base weights get no weight gradients, and the
    frozen blocks at the bottom no gradients at all."""
    from torch.utils.flop_counter import FlopCounterMode

    from nanogpt import lora

    torch.manual_seed(0)
    cfg = GPTConfig(block_size=64, vocab_size=65, n_layer=4, n_head=4, n_embd=256, bias=False)
    model = GPT(cfg)
    if trains == "freeze 3 of 4":
        model.freeze(3)
    elif trains == "lora rank 8":
        lora.add_adapters(model, lora.settings(8, 16, 0.0, 'c_attn,c_proj,c_fc', 'adamw', 0))
    idx = torch.randint(0, 65, (2, 64))
    with FlopCounterMode(display=False) as counter:
        model(idx, idx)[1].backward()
    done, counted = counter.get_total_flops(), model.flops_per_token() * idx.numel()
    assert abs(counted / done - 1) < 0.1, (done, counted)
    if trains == "all":  # nanoGPT's count (PaLM's 6N + 12 L H Q T), N less LayerNorm gains
        N = model.get_num_params() - sum(
            p.numel() for n, p in model.named_parameters() if 'ln' in n
        )
        assert counted == (6 * N + 12 * 4 * 256 * 64) * idx.numel()
    # estimate_mfu: block_size tokens per sequence
    mfu = model.estimate_mfu(8, 0.5, peak_flops=1e12)
    assert mfu == pytest.approx(model.flops_per_token() * 64 * 8 / 0.5 / 1e12)


def test_clear_errors():
    with pytest.raises(ValueError, match=r"n_embd \(30\) must be divisible by n_head \(4\)"):
        GPT(GPTConfig(n_embd=30, n_head=4, n_layer=1, block_size=8, vocab_size=10))
    model = tiny_gpt()
    with pytest.raises(TypeError, match="integer tensor of token ids.*float32"):
        model(torch.zeros(1, 4))
    with pytest.raises(
        ValueError, match="Cannot forward sequence of length 17, block size is only 16"
    ):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_model_py_imports_torch_and_nothing_of_the_repository():
    code = (
        "import sys, model\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('nanogpt', 'configurator')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
