"""The losses of LOSSES.md against a plain reference, and properties 1-5, in float64 with autograd.

The reference below is written straight from the tables of spec/LOSSES.md, with no
code shared with adadpo_megatron.losses: naive float64 arithmetic, fine for the
moderate inputs used here (the extremes test checks finiteness only).
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch
import torch.nn.functional as F

from adadpo_megatron.losses import (
    LossConfig,
    available_losses,
    compute_preference_loss,
    get_loss_spec,
)

F64 = torch.float64
SUM_MARGIN = ("dpo", "hinge", "robust", "rdpo", "cpo")
LENGTH_NORMALISED = ("ipo", "simpo", "orpo")
REFERENCE_FREE = ("simpo", "cpo", "orpo")
# Gradients below this (saturated logistic, e.g. sigma(-700)) lose relative precision in
# float64's subnormal range; ratios of gradients are only checked above it.
TINY = 1e-280
# Non-default hyper-parameters per base loss (beta is set separately).
HPARAMS = {
    "dpo": {"label_smoothing": 0.1},
    "robust": {"label_smoothing": 0.2},
    "rdpo": {"alpha": 0.01},
    "simpo": {"gamma": 0.3},
    "cpo": {"lam": 0.7},
    "orpo": {"lam": 0.4},
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: with 2+ threads on a busy CPU, F.logsigmoid's parallel kernel
    costs ~25 ms a call in thread wake-ups (measured, torch 2.13 CPU); one thread takes 10 us."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def base_of(name: str) -> str:
    return name[3:] if name.startswith("ada") else name


def ref_loss(cfg: LossConfig, pw, pl, rw, rl, lw, ll) -> torch.Tensor:
    """Per-pair loss straight from LOSSES.md (independent of the library)."""
    base, ada = base_of(cfg.name), cfg.name.startswith("ada")
    beta, eps = cfg.beta, cfg.label_smoothing
    lw, ll = lw.to(F64), ll.to(F64)
    if ada:
        with torch.no_grad():
            if base == "orpo":
                p_w, p_l = torch.exp(pw / lw), torch.exp(pl / ll)
                s = torch.log(p_w * (1 - p_w) / (p_l * (1 - p_l)))
            else:
                a_w, a_l = (pw - rw, pl - rl) if cfg.balance_space == "ratio" else (pw, pl)
                s = a_w / lw - a_l / ll if cfg.balance_granularity == "token" else a_w - a_l
            c = math.log(cfg.balance_clip)
            log_k = (
                torch.clamp(s, -c, c) if cfg.balance_clip_mode == "both" else torch.clamp(s, max=c)
            )
            k = torch.exp(log_k)
    else:
        k = torch.ones_like(pw)
    nll_w = -pw / lw
    if base in ("dpo", "hinge", "robust", "rdpo", "ipo"):
        rho_w, rho_l = pw - rw, pl - rl
        h = k * rho_w - rho_l
    if base == "dpo":
        loss = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif base == "ipo":
        loss = (k * rho_w / lw - rho_l / ll - 1 / (2 * beta)) ** 2
    elif base == "hinge":
        loss = torch.relu(1 - beta * h)
    elif base == "robust":
        loss = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif base == "rdpo":
        loss = -F.logsigmoid(beta * h - cfg.alpha * (lw - ll))
    elif base == "simpo":
        loss = -F.logsigmoid(beta * (k * pw / lw - pl / ll) - cfg.gamma)
    elif base == "cpo":
        loss = -F.logsigmoid(beta * (k * pw - pl)) + cfg.lam * nll_w
    elif base == "orpo":
        p_w, p_l = torch.exp(pw / lw), torch.exp(pl / ll)
        lo_w, lo_l = torch.log(p_w / (1 - p_w)), torch.log(p_l / (1 - p_l))
        loss = nll_w - cfg.lam * F.logsigmoid(k * lo_w - lo_l)
    return loss + cfg.sft_weight * nll_w


def largest(t: torch.Tensor) -> float:
    """max |t|, 0 for an empty tensor."""
    return t.abs().max().item() if t.numel() else 0.0


def nll_coef(cfg: LossConfig) -> float:
    """Weight of -pol_w/len_w in the loss (its gradient is not part of the balance)."""
    own = {"cpo": cfg.lam, "orpo": 1.0}.get(base_of(cfg.name), 0.0)
    return own + cfg.sft_weight


def make_pairs(seed: int, n: int = 64, max_len: int = 4000, spread: float = 3.0):
    """Random pairs: lengths log-uniform in [1, max_len], mean token log-probs in (-spread, 0),
    reference a perturbation of the policy (so rho is moderate and |s| stays far below the
    numeric cap on log k), one-token completions included."""
    g = torch.Generator().manual_seed(seed)
    lw = torch.exp(torch.rand(n, generator=g, dtype=F64) * math.log(max_len)).round().clamp(min=1)
    ll = torch.exp(torch.rand(n, generator=g, dtype=F64) * math.log(max_len)).round().clamp(min=1)
    lw[0], ll[1] = 1, 1
    pw = -lw * (0.02 + spread * torch.rand(n, generator=g, dtype=F64))
    pl = -ll * (0.02 + spread * torch.rand(n, generator=g, dtype=F64))
    rw = pw - torch.randn(n, generator=g, dtype=F64) * 5
    rl = pl - torch.randn(n, generator=g, dtype=F64) * 5
    return pw, pl, rw, rl, lw.long(), ll.long()


def grads(cfg: LossConfig, pw, pl, rw, rl, lw, ll, fn=None):
    """Per-pair loss and its per-pair gradients w.r.t. pol_w and pol_l (pairs are independent)."""
    pw, pl = pw.clone().requires_grad_(), pl.clone().requires_grad_()
    if fn is None:
        loss, metrics = compute_preference_loss(cfg, pw, pl, rw, rl, lw, ll)
    else:
        loss, metrics = fn(cfg, pw, pl, rw, rl, lw, ll), {}
    g_w, g_l = torch.autograd.grad(loss.sum(), (pw, pl))
    return loss.detach(), g_w, g_l, metrics


def configs(names, **extra):
    """Every valid (space, granularity) LossConfig for each name."""
    out = []
    for name in names:
        spec = get_loss_spec(name)
        for space in ("policy", "ratio") if spec.needs_reference else ("policy",):
            for gran in ("token",) if spec.length_normalised else ("token", "sequence"):
                out.append(
                    LossConfig(
                        name=name,
                        beta=0.3,
                        balance_space=space,
                        balance_granularity=gran,
                        **HPARAMS.get(base_of(name), {}),
                        **extra,
                    )
                )
    return out


def balanced_log_grads(cfg: LossConfig, g_w, g_l, pw, pl, rw, rl, lw, ll):
    """log|dL/dq| of each side for the preference term, q as LOSSES.md balances it."""
    g_w = g_w + nll_coef(cfg) / lw.to(F64)  # remove d/dpol_w of nll_coef*(-pol_w/len_w)
    a_w, a_l = (pw - rw, pl - rl) if cfg.balance_space == "ratio" else (pw, pl)
    lw, ll = lw.to(F64), ll.to(F64)
    if cfg.balance_granularity == "sequence":  # dL/dpi = g/pi
        return g_w.abs().log() - a_w, g_l.abs().log() - a_l
    if get_loss_spec(cfg.name).length_normalised:  # dL/dp = g*len/p
        return (g_w.abs() * lw).log() - a_w / lw, (g_l.abs() * ll).log() - a_l / ll
    return g_w.abs().log() - a_w / lw, g_l.abs().log() - a_l / ll  # per token: dL/dp = g/p


ALL_CONFIGS = configs(available_losses()) + configs(available_losses(), sft_weight=0.25)


@pytest.mark.parametrize(
    "cfg",
    ALL_CONFIGS,
    ids=lambda c: f"{c.name}-{c.balance_space}-{c.balance_granularity}-{c.sft_weight}",
)
def test_matches_plain_reference_values_and_gradients(cfg: LossConfig) -> None:
    inputs = make_pairs(seed=zlib.crc32(cfg.name.encode()))
    loss, g_w, g_l, _ = grads(cfg, *inputs)
    ref, r_w, r_l, _ = grads(cfg, *inputs, fn=ref_loss)
    assert loss.dtype == F64
    # float64 round-off of values up to ~1e3; the reference computes logs of ratios directly.
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(g_w, r_w, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g_l, r_l, rtol=1e-9, atol=1e-12)


BALANCED = [c for c in available_losses() if c.startswith("ada")]


def without_nll(cfg: LossConfig) -> LossConfig:
    """cpo's lam = 0: subtracting a large NLL gradient from a tiny preference one (a saturated
    margin, or k far from 1) would cost the digits being checked.  The NLL term itself is
    checked against the plain reference."""
    return LossConfig(**{**cfg.__dict__, "lam": 0.0}) if base_of(cfg.name) == "cpo" else cfg


def exact_configs() -> list[LossConfig]:
    return [without_nll(cfg) for cfg in configs(BALANCED, balance_clip=math.inf)]


@pytest.mark.parametrize(
    "cfg", exact_configs(), ids=lambda c: f"{c.name}-{c.balance_space}-{c.balance_granularity}"
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_balance_is_exact_without_clip(cfg: LossConfig, seed: int) -> None:
    """Properties 1 and 2 (C = inf): equal gradients w.r.t. the balanced probability.

    Sequence granularity uses short completions: |s| = |a_w - a_l| must stay below the
    numeric cap on |log k| (177 in float64) for C = inf to mean "no clip"."""
    short = cfg.balance_granularity == "sequence"
    inputs = make_pairs(seed, max_len=30 if short else 4000, spread=1.5 if short else 3.0)
    _, g_w, g_l, metrics = grads(cfg, *inputs)
    log_w, log_l = balanced_log_grads(cfg, g_w, g_l, *inputs)
    active = g_l.abs() > TINY  # hinge beyond its margin has no gradient on either side
    assert active.float().mean() > 0.5
    assert largest((g_w + nll_coef(cfg) / inputs[4])[~active]) <= TINY
    rel = torch.expm1(log_l[active] - log_w[active]).abs()
    assert rel.max() < 1e-9
    assert (metrics["balance/grad_ratio"] - 1).abs().max() < 1e-9
    assert torch.equal(metrics["adadpo/clip_frac"], torch.zeros_like(g_w))


@pytest.mark.parametrize("seed", [0, 1])
def test_adaorpo_balances_the_odds_probability(seed: int) -> None:
    """Property 2 for adaorpo, with P itself as the autograd leaf: |dL/dP_w| == |dL/dP_l|."""
    pw, pl, _, _, lw, ll = make_pairs(seed, spread=1.0)
    cfg = LossConfig(name="adaorpo", balance_clip=math.inf, lam=0.6, sft_weight=0.2)
    p_w = torch.exp(pw / lw).requires_grad_()
    p_l = torch.exp(pl / ll).requires_grad_()
    loss, _ = compute_preference_loss(
        cfg, lw * torch.log(p_w), ll * torch.log(p_l), None, None, lw, ll
    )
    d_w, d_l = torch.autograd.grad(loss.sum(), (p_w, p_l))
    d_w = d_w - (1.0 + cfg.sft_weight) * (-1.0 / p_w)  # d/dP_w of the NLL -log P_w
    assert (d_w.abs() / d_l.abs() - 1).abs().max() < 1e-9


@pytest.mark.parametrize("mode", ["upper", "both"])
@pytest.mark.parametrize("name", BALANCED)
def test_clip_bounds_k_and_keeps_the_rejected_side_larger(name: str, mode: str) -> None:
    """Property 3: k <= C (and >= 1/C for mode both); where the clip binds the imbalance
    stays on the clipped side; elsewhere the balance is exact; clip_frac marks the binding pairs."""
    for clip in (1.0, 1.5, 4.0):
        cfg = without_nll(configs([name], balance_clip=clip, balance_clip_mode=mode)[0])
        inputs = make_pairs(seed=7)
        _, g_w, g_l, m = grads(cfg, *inputs)
        k = m["adadpo/coef_mean"]
        assert k.max() <= clip * (1 + 1e-15)
        if mode == "both":
            assert k.min() >= (1 - 1e-15) / clip
        log_w, log_l = balanced_log_grads(cfg, g_w, g_l, *inputs)
        active = g_l.abs() > TINY
        pw, pl, _, _, lw, ll = inputs
        if base_of(name) == "orpo":
            p_w, p_l = torch.exp(pw / lw), torch.exp(pl / ll)
            s = torch.log(p_w * (1 - p_w) / (p_l * (1 - p_l)))
        else:  # configs()[0] is space policy, token granularity
            s = pw / lw - pl / ll
        binds_up, binds_down = s > math.log(clip), (s < -math.log(clip)) & (mode == "both")
        assert torch.equal(m["adadpo/clip_frac"], (binds_up | binds_down).to(F64))
        upper, lower = binds_up & active, binds_down & active
        free = ~(binds_up | binds_down) & active
        assert upper.any() and (mode == "upper" or lower.any())
        assert (log_l[upper] > log_w[upper]).all()  # rejected side's gradient stays larger
        assert (log_l[lower] < log_w[lower]).all()
        assert largest(torch.expm1(log_l[free] - log_w[free])) < 1e-9
        if mode == "upper":
            assert not lower.any()


@pytest.mark.parametrize("smoothing", [0.0, 0.15])
def test_policy_equal_to_reference_gives_base_loss_and_log2(smoothing: float) -> None:
    """Property 4 and DESIGN's step-0 invariant: ada* == base, adadpo == dpo == log 2, rewards 0."""
    pw, pl, _, _, lw, ll = make_pairs(seed=3)
    for name in [n for n in BALANCED if get_loss_spec(n).needs_reference]:
        extra = dict(HPARAMS.get(base_of(name), {}))
        if "label_smoothing" in extra:
            extra["label_smoothing"] = smoothing
        ada = LossConfig(name=name, balance_space="ratio", **extra)
        base = LossConfig(name=base_of(name), balance_space="ratio", **extra)
        a_loss, a_w, a_l, m = grads(ada, pw, pl, pw, pl, lw, ll)
        b_loss, b_w, b_l, _ = grads(base, pw, pl, pw, pl, lw, ll)
        assert torch.equal(a_loss, b_loss) and torch.equal(a_w, b_w) and torch.equal(a_l, b_l), name
        assert torch.equal(m["adadpo/coef_mean"], torch.ones_like(pw))
        assert torch.equal(m["rewards/chosen"], torch.zeros_like(pw))
        assert torch.equal(m["rewards/margins"], torch.zeros_like(pw))
        assert torch.equal(m["rewards/accuracies"], torch.zeros_like(pw))  # TRL: strict >
        assert torch.equal(m["balance/grad_ratio"], torch.ones_like(pw))
        if base_of(name) in ("dpo", "robust"):
            torch.testing.assert_close(a_loss, torch.full_like(pw, math.log(2)), rtol=1e-15, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_no_nan_or_inf_at_extremes(dtype: torch.dtype) -> None:
    """Property 5: log-probs in [-1e5, 0], lengths in [1, 1e6], beta in [1e-4, 10], any C."""
    vals = torch.tensor([-1e5, -50.0, -1.0, -1e-9, 0.0], dtype=dtype)
    lens = torch.tensor([1, 1000, 10**6])
    grid = torch.cartesian_prod(torch.arange(5), torch.arange(5), torch.arange(3), torch.arange(3))
    pw0, pl0, lw, ll = vals[grid[:, 0]], vals[grid[:, 1]], lens[grid[:, 2]], lens[grid[:, 3]]
    rw, rl = pw0.roll(1), pl0.roll(7)  # every (pol, ref) combination appears
    for beta in (1e-4, 10.0):
        for clip in (2.0, math.inf):
            for cfg in configs(available_losses()) + configs(BALANCED, balance_clip_mode="both"):
                extra = {"balance_clip": clip} if cfg.name.startswith("ada") else {}
                cfg = LossConfig(**{**cfg.__dict__, "beta": beta, **extra})
                pw, pl = pw0.clone().requires_grad_(), pl0.clone().requires_grad_()
                loss, metrics = compute_preference_loss(cfg, pw, pl, rw, rl, lw, ll)
                g_w, g_l = torch.autograd.grad(loss.sum(), (pw, pl))
                for what, t in [("loss", loss), ("g_w", g_w), ("g_l", g_l), *metrics.items()]:
                    assert torch.isfinite(t).all(), (cfg, what)


def test_grad_ratio_metric_matches_autograd_for_every_loss() -> None:
    """balance/grad_ratio == |dL/dq_l| / |dL/dq_w| of the preference term, from autograd;
    and it drifts above 1 for dpo when the chosen side is the more likely one."""
    inputs = make_pairs(seed=11)
    for cfg in map(without_nll, configs(available_losses())):
        _, g_w, g_l, m = grads(cfg, *inputs)
        log_w, log_l = balanced_log_grads(cfg, g_w, g_l, *inputs)
        active = g_l.abs() > TINY
        torch.testing.assert_close(
            m["balance/log_grad_ratio"][active], (log_l - log_w)[active], rtol=0, atol=1e-9
        )
        cap = 0.25 * math.log(torch.finfo(F64).max)  # saturation, so batch sums cannot overflow
        expected = m["balance/log_grad_ratio"].clamp(-cap, cap).exp()
        torch.testing.assert_close(m["balance/grad_ratio"], expected, rtol=1e-15, atol=0)
    pw, pl, rw, rl, lw, ll = inputs
    _, m = compute_preference_loss(LossConfig(name="dpo"), pw + lw, pl, rw, rl, lw, ll)
    assert ((m["balance/grad_ratio"] > 1) == (pw / lw + 1 > pl / ll)).all()


def test_metrics_values() -> None:
    pw, pl, rw, rl, lw, ll = make_pairs(seed=5)
    cfg = LossConfig(name="adadpo", beta=0.2, balance_clip=1.5)
    loss, m = compute_preference_loss(cfg, pw, pl, rw, rl, lw, ll)
    expected_metrics = {
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
        "balance/grad_ratio",
        "balance/log_grad_ratio",
        "adadpo/coef_mean",
        "adadpo/coef_max",
        "adadpo/clip_frac",
    }
    assert set(m) == expected_metrics
    assert all(t.shape == pw.shape and not t.requires_grad for t in m.values())
    torch.testing.assert_close(m["loss"], loss)
    torch.testing.assert_close(m["rewards/chosen"], 0.2 * (pw - rw))
    torch.testing.assert_close(m["rewards/rejected"], 0.2 * (pl - rl))
    torch.testing.assert_close(m["rewards/margins"], 0.2 * ((pw - rw) - (pl - rl)))
    assert torch.equal(m["rewards/accuracies"], ((pw - rw) > (pl - rl)).to(F64))
    assert torch.equal(m["logps/chosen"], pw) and torch.equal(m["logps/rejected"], pl)
    s = pw / lw - pl / ll
    torch.testing.assert_close(m["adadpo/coef_mean"], torch.exp(s.clamp(max=math.log(1.5))))
    assert torch.equal(m["adadpo/clip_frac"], (s > math.log(1.5)).to(F64))
    assert 0 < m["adadpo/clip_frac"].mean() < 1
    _, m_base = compute_preference_loss(LossConfig(name="dpo"), pw, pl, rw, rl, lw, ll)
    assert not any(key.startswith("adadpo/") for key in m_base)
    _, m_free = compute_preference_loss(LossConfig(name="simpo"), pw, pl, None, None, lw, ll)
    torch.testing.assert_close(m_free["rewards/chosen"], 0.1 * pw)  # TRL CPO convention: ref = 0


@pytest.mark.parametrize(
    "dtype,expected",
    [
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.float32, torch.float32),
        (F64, F64),
    ],
)
def test_compute_dtype_is_fp32_or_wider(dtype: torch.dtype, expected: torch.dtype) -> None:
    pw, pl, rw, rl, lw, ll = (
        t.to(dtype) if t.is_floating_point() else t for t in make_pairs(0, n=8, max_len=50)
    )
    pw.requires_grad_()
    loss, metrics = compute_preference_loss(LossConfig(name="adadpo"), pw, pl, rw, rl, lw, ll)
    assert loss.dtype == expected and all(t.dtype == expected for t in metrics.values())
    loss.sum().backward()
    assert pw.grad is not None and pw.grad.dtype == dtype


def test_call_errors() -> None:
    pw, pl, rw, rl, lw, ll = make_pairs(0, n=4)
    with pytest.raises(ValueError, match="needs reference log-probs.*--ref-logprobs"):
        compute_preference_loss(LossConfig(name="adadpo"), pw, pl, None, None, lw, ll)
    with pytest.raises(ValueError, match="both ref_w and ref_l"):
        compute_preference_loss(LossConfig(name="simpo"), pw, pl, rw, None, lw, ll)
    with pytest.raises(ValueError, match="len_l has shape"):
        compute_preference_loss(LossConfig(name="dpo"), pw, pl, rw, rl, lw, ll[:3])
    with pytest.raises(ValueError, match="1-D tensor"):
        compute_preference_loss(LossConfig(name="dpo"), pw[None], pl, rw, rl, lw, ll)
    loss, _ = compute_preference_loss(LossConfig(name="cpo"), pw, pl, rw, rl, lw, ll)  # ref ignored
    torch.testing.assert_close(
        loss, compute_preference_loss(LossConfig(name="cpo"), pw, pl, None, None, lw, ll)[0]
    )


def test_reference_and_lengths_are_stop_gradient() -> None:
    pw, pl, rw, rl, lw, ll = make_pairs(0, n=6)
    pw, rw, rl = pw.requires_grad_(), rw.requires_grad_(), rl.requires_grad_()
    len_w = lw.to(F64).requires_grad_()
    loss, _ = compute_preference_loss(
        LossConfig(name="adaipo", balance_space="ratio"), pw, pl, rw, rl, len_w, ll
    )
    loss.sum().backward()
    assert pw.grad is not None and rw.grad is None and rl.grad is None and len_w.grad is None


def test_metric_reductions() -> None:
    from adadpo_megatron.losses import METRICS, metric_reduction

    assert {m for m in METRICS if metric_reduction(m) == "max"} == {"adadpo/coef_max"}
