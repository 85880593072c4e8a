"""
The optimizers behind configure_optimizers(muon=...) in model.py: Muon for the blocks' weight
matrices, AdamW for the rest, stepped as one optimizer (MuonAdamW), and Float32Muon, torch's Muon
for machines whose bfloat16 matmuls are emulated (docs/optimizers.md).
"""

import torch


class Float32Muon(torch.optim.Muon):
    """torch.optim.Muon with its Newton-Schulz iteration in float32. torch's casts the update to
    bfloat16 unconditionally (torch/optim/_muon.py, _zeropower_via_newtonschulz: `grad.bfloat16()`,
    with no option), and on CPUs without AVX-512 BF16 or AMX bfloat16 matmuls are emulated: ~0.3
    GFLOP/s against ~30 in float32 on an AVX2 machine, which made a 2-minute run take 11. Everything
    but that dtype is torch's: its arguments and checks, its param groups, its state
    ('momentum_buffer'), its update; so a
    checkpoint moves between the two."""

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is None, "closures are not used here"
        for group in self.param_groups:
            lr, wd, momentum, eps = (
                group['lr'],
                group['weight_decay'],
                group['momentum'],
                group['eps'],
            )
            a, b, c = group['ns_coefficients']
            # the only one configure_optimizers uses
            assert group['adjust_lr_fn'] in (None, 'original')
            for p in group['params']:
                if p.grad is None:
                    continue
                state = self.state[p]
                if 'momentum_buffer' not in state:
                    state['momentum_buffer'] = torch.zeros_like(p.grad)
                buf = state['momentum_buffer']
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group['nesterov'] else buf
                tall = p.size(0) > p.size(1)
                # (short, long): the Gram matrix is the small one
                x = update.float().T if tall else update.float()
                x = x / x.norm().clamp(min=eps)  # spectral norm at most 1
                for _ in range(group['ns_steps']):
                    gram = x @ x.T  # (short, short)
                    x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
                p.mul_(1 - lr * wd)  # decoupled weight decay
                # torch's shape adjustment: the update's RMS does not shrink for tall matrices
                p.add_(x.T if tall else x, alpha=-lr * max(1, p.size(0) / p.size(1)) ** 0.5)


class MuonAdamW:
    """Muon for the blocks' weight matrices and AdamW for everything else, stepped as one
    optimizer. param_groups lists the groups of both; each has an 'lr_scale', its peak learning rate
    over AdamW's, so the training loop's schedule (group['lr'] = lr * group['lr_scale']) moves all
    of them together. state_dict() nests both, so a checkpoint keeps one 'optimizer' entry.
    GradScaler works with it (it only needs param_groups and step()), but reads its overflow flag on
    the host, a second sync per iteration: it has no _step_supports_amp_scaling, as torch's Muon
    cannot skip a step by a flag on the device, so train.py refuses float16 with Muon."""

    def __init__(self, muon, adamw, muon_lr_scale):
        self.muon, self.adamw = muon, adamw
        for group in muon.param_groups:
            group['lr_scale'] = muon_lr_scale
        for group in adamw.param_groups:
            group['lr_scale'] = 1.0

    @property
    def param_groups(self):  # a property: load_state_dict replaces the group dicts
        return self.muon.param_groups + self.adamw.param_groups

    def step(self, closure=None):
        assert closure is None, "closures are not used here"
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none=True):
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def state_dict(self):
        return {'muon': self.muon.state_dict(), 'adamw': self.adamw.state_dict()}

    def load_state_dict(self, state_dict):
        self.muon.load_state_dict(state_dict['muon'])
        self.adamw.load_state_dict(state_dict['adamw'])
