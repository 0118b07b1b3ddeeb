"""Numerical guards of LOSSES.md that must never change a metric or kill a gradient.

- The guard on ``|log k|`` (finite range of the dtype) is not the clip: it never counts in
  ``adadpo/clip_frac``, so float32 and float64 give the same clip fraction.
- ORPO's clamp keeping ``u = pol/len`` below 0 acts only where ``u`` is exactly 0: every
  representable negative ``u`` keeps its odds gradient.
"""

from __future__ import annotations

import math

import pytest
import torch

from adadpo_megatron.losses import LossConfig, compute_preference_loss


def _sequence_pairs(n: int = 400, seed: int = 0):
    """Pairs whose summed log-probs differ by up to ~100 nats (sequence-level scores)."""
    g = torch.Generator().manual_seed(seed)
    lw = torch.randint(1, 200, (n,), generator=g).to(torch.float64)
    ll = torch.randint(1, 200, (n,), generator=g).to(torch.float64)
    pw = -lw * torch.rand(n, generator=g, dtype=torch.float64) * 0.6
    pl = -ll * torch.rand(n, generator=g, dtype=torch.float64) * 0.6
    rw = pw + 20 * torch.randn(n, generator=g, dtype=torch.float64)
    rl = pl + 20 * torch.randn(n, generator=g, dtype=torch.float64)
    return pw, pl, rw, rl, lw, ll


@pytest.mark.parametrize("mode", ["upper", "both"])
@pytest.mark.parametrize("clip", [2.0, math.inf, 1e30])
@pytest.mark.parametrize("space", ["policy", "ratio"])
def test_clip_frac_counts_the_clip_only_same_in_fp32_and_fp64(mode, clip, space) -> None:
    pw, pl, rw, rl, lw, ll = _sequence_pairs()
    cfg = LossConfig(
        name="adadpo", balance_granularity="sequence", balance_space=space,
        balance_clip=clip, balance_clip_mode=mode,
    )
    s = (pw - pl) if space == "policy" else (pw - rw) - (pl - rl)
    assert (s.abs() > 25).any()  # beyond the fp32 guard (22.2): the case that was miscounted
    log_c = math.log(clip)
    expected = (s > log_c) | ((s < -log_c) if mode == "both" else torch.zeros_like(s, dtype=torch.bool))
    fracs = {}
    for dtype in (torch.float32, torch.float64):
        args = [t.to(dtype) for t in (pw, pl, rw, rl, lw, ll)]
        _, m = compute_preference_loss(cfg, *args)
        assert torch.equal(m["adadpo/clip_frac"], expected.to(dtype)), dtype
        fracs[dtype] = int(m["adadpo/clip_frac"].sum().item())  # count: exact in both dtypes
        assert torch.isfinite(m["adadpo/coef_mean"]).all()
    assert fracs[torch.float32] == fracs[torch.float64]
    if clip == math.inf:
        assert fracs[torch.float32] == 0.0


@pytest.mark.parametrize("name", ["orpo", "adaorpo"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_orpo_odds_gradient_lives_for_every_negative_mean_logprob(name, dtype) -> None:
    """u = pol/len in (-1.2e-7, 0) is representable: the odds term must still have a gradient."""
    tiny = torch.finfo(dtype).tiny
    for u_w in (-1e-7, -3e-8, -1e-20, -1e3 * tiny):
        pol_w = torch.tensor([u_w * 4.0], dtype=dtype, requires_grad=True)
        pol_l = torch.tensor([-2.0], dtype=dtype, requires_grad=True)
        n = torch.tensor([4.0], dtype=dtype)
        cfg = LossConfig(name=name, lam=1.0)
        losses, _ = compute_preference_loss(cfg, pol_w, pol_l, None, None, n, n)
        losses.sum().backward()
        # The NLL term alone gives -1/len = -0.25; the odds term adds a strictly negative part.
        g = pol_w.grad.item()
        assert math.isfinite(g) and g < -0.25 - 1e-3, (u_w, g)
        assert torch.isfinite(losses).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_orpo_clamp_acts_where_mean_logprob_is_exactly_zero(dtype) -> None:
    pol_w = torch.tensor([0.0, -1.0], dtype=dtype, requires_grad=True)
    pol_l = torch.tensor([-3.0, 0.0], dtype=dtype, requires_grad=True)
    n = torch.tensor([3.0, 3.0], dtype=dtype)
    losses, m = compute_preference_loss(LossConfig(name="adaorpo", lam=1.0), pol_w, pol_l, None, None, n, n)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(pol_w.grad).all()
    assert torch.isfinite(pol_l.grad).all()
    assert torch.isfinite(m["adadpo/coef_mean"]).all()
    # Only the NLL term's gradient is left at u_w = 0 (the odds are saturated there).
    assert pol_w.grad[0].item() == pytest.approx(-1.0 / 3.0)
