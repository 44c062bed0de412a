"""SPEC §2 benchmark: forward + backward of the fused policy loss on CPU.

Same inputs for every contender: B*T = 2048 tokens (B = 8, T = 256), D = 512, V = 32000, float32,
TRL's ``dapo`` loss with beta = 0.04 (k3 KL to given reference log-probs, no bias correction, as
Liger computes it), eps 0.2 / 0.28, off-policy old log-probs, every token unmasked (masked tokens
would favour us: we skip their matmuls, the others do not).

- ours:  ``fused_linear_policy_loss`` (backend torch: the gradient computed in the forward, one
         pass over the logits, 6NVD GEMM FLOPs; ``gccpo_kernels.loss_in_forward``)
- composed: the same call forced onto the composed path (the chunked primitive, 8NVD, +
         policy_loss): what the in-forward gradient saves
- naive: materialized logits -> log_softmax -> gather (+ entropy for the metrics, without grad)
         -> the same ``policy_loss``; what a trainer without fused kernels does
- liger: ``LigerFusedLinearGRPOLoss(compiled=False)`` (gradient computed inside the forward)

Targets: ours <= 0.8x naive time and <= 0.6x Liger's (issue 18), <= 12% of naive's peak-memory
growth, faster than the composed path.
Timings on a shared machine are noisy: the ratios come from one run, the medians of 5 interleaved
rounds.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from benchmarks._harness import median_time, peak_rss_growth, ratio_info

B, T, D, V = 8, 256, 512, 32000
BETA, EPS_LOW, EPS_HIGH = 0.04, 0.2, 0.28
HAS_LIGER = importlib.util.find_spec("liger_kernel") is not None


SHAPE = (B, T, D, V)
TINY = (2, 4, 16, 64)  # the memory subprocess's warm-up shape (benchmarks._harness)


def _inputs(seed: int = 0, shape: tuple[int, int, int, int] = SHAPE) -> dict:
    b, t, d, v = shape
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, d, generator=g).requires_grad_()
    weight = torch.randn(v, d, generator=g).mul_(0.02).requires_grad_()  # in place: no 65 MB temporary
    targets = torch.randint(0, v, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    approx = torch.full((b, t), -10.4)  # about log(1/V): the scale of the real log-probs
    old = approx + 0.05 * torch.randn(b, t, generator=g)
    ref = approx + 0.05 * torch.randn(b, t, generator=g)
    adv = torch.randn(b, generator=g)
    return dict(hidden=hidden, weight=weight, targets=targets, mask=mask, old=old, ref=ref, adv=adv)


def _config():
    from gccpo_kernels.policy_loss import PolicyLossConfig

    return PolicyLossConfig.from_trl("dapo", epsilon=EPS_LOW, epsilon_high=EPS_HIGH, beta=BETA,
                                     use_bias_correction_kl=False)


def make_fused(seed: int = 0, shape: tuple[int, int, int, int] = SHAPE):
    """Workload factory (also used by the memory subprocess): ours, forward + backward."""
    from gccpo_kernels.policy_loss import fused_linear_policy_loss

    x, cfg = _inputs(seed, shape), _config()

    def run():
        x["hidden"].grad = x["weight"].grad = None
        out = fused_linear_policy_loss(x["hidden"], x["weight"], x["targets"], x["adv"], x["mask"],
                                       old_logp=x["old"], ref_logp=x["ref"], config=cfg, backend="torch")
        out.loss.backward()
        return out.loss

    return run


def make_composed(seed: int = 0, shape: tuple[int, int, int, int] = SHAPE):
    """Ours on the composed path (forward, then a backward that recomputes the logits)."""
    import gccpo_kernels.loss_in_forward as lif

    run = make_fused(seed, shape)

    def composed():
        real, lif.eligible = lif.eligible, (lambda *a: False)
        try:
            return run()
        finally:
            lif.eligible = real

    return composed


def make_naive(seed: int = 0, shape: tuple[int, int, int, int] = SHAPE):
    """Materialized [B*T, V] logits, then the same policy_loss (the loss math is shared)."""
    from gccpo_kernels.policy_loss import policy_loss

    x, cfg = _inputs(seed, shape), _config()

    def run():
        x["hidden"].grad = x["weight"].grad = None
        logits = x["hidden"].reshape(-1, x["hidden"].shape[-1]) @ x["weight"].T
        logprobs = torch.log_softmax(logits, dim=-1)
        logp = logprobs.gather(-1, x["targets"].reshape(-1, 1)).reshape(x["targets"].shape)
        with torch.no_grad():  # for the entropy metric, as TRL computes it
            entropy = -(logprobs.exp() * logprobs).sum(-1).reshape(x["targets"].shape)
        loss, _ = policy_loss(logp, x["old"], x["adv"], x["mask"], ref_logp=x["ref"], entropy=entropy, config=cfg)
        loss.backward()
        return loss

    return run


def make_liger(seed: int = 0, shape: tuple[int, int, int, int] = SHAPE):
    """Liger-Kernel's chunked GRPO loss (gradients computed in the forward), eager."""
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    x = _inputs(seed, shape)
    loss_fn = LigerFusedLinearGRPOLoss(beta=BETA, compiled=False, use_ref_model=True, epsilon_low=EPS_LOW,
                                       epsilon_high=EPS_HIGH, loss_type="dapo", use_bias_correction_kl=False)

    def run():
        x["hidden"].grad = x["weight"].grad = None
        loss, _ = loss_fn(x["hidden"], x["weight"], x["targets"], x["mask"], x["adv"],
                          ref_per_token_logps=x["ref"], old_per_token_logps=x["old"])
        loss.backward()
        return loss

    return run


_MEMORY: dict[str, int] = {}


def _measure_memory() -> dict[str, int]:
    if not _MEMORY:
        for name in ("fused", "naive") + (("liger",) if HAS_LIGER else ()):
            _MEMORY[name] = peak_rss_growth(f"benchmarks.test_bench_policy_loss:make_{name}",
                                            warmup=dict(shape=TINY))
    return _MEMORY


def test_memory():
    """Peak-RSS growth of each contender (clean subprocess per contender, see benchmarks._harness)."""
    mem = _measure_memory()
    assert mem["fused"] < mem["naive"]


def test_same_loss_as_peers():
    """The three contenders compute the same loss (else the timings compare different work)."""
    values = [make_fused()(), make_naive()()]
    if HAS_LIGER:
        values.append(make_liger()())
    for v in values[1:]:
        torch.testing.assert_close(v, values[0], rtol=1e-4, atol=1e-6)


def test_bench_policy_loss(benchmark):
    mem = _measure_memory()
    fused, naive, composed = make_fused(), make_naive(), make_composed()
    liger = make_liger() if HAS_LIGER else None
    # 5 interleaved rounds (3 before issue 18's 0.6x was asserted): the ratios sit ~4 % inside
    # their targets, about the spread of a 3-round median on this shared 2-core machine
    rounds = int(os.environ.get("GCCPO_BENCH_REPEATS", "5"))
    # interleave the contenders so a noisy neighbour slows all of them alike
    runs = {"fused": fused, "naive": naive, "composed": composed, "liger": liger}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            if run is not None:
                times[name].append(median_time(run, repeats=1, warmup=1 if not times[name] else 0))
    med = {k: sorted(v)[len(v) // 2] if v else None for k, v in times.items()}
    benchmark.pedantic(fused, rounds=1, iterations=1)

    info = {"shape": f"B*T={B * T} D={D} V={V} float32 cpu", "seconds": med, "rounds": rounds,
            "peak_rss_growth_mb": {k: round(v / 2**20, 1) for k, v in mem.items()},
            "mem_fraction_of_naive": round(mem["fused"] / mem["naive"], 4)}
    info.update(ratio_info(med["fused"], {"naive": med["naive"], "liger": med["liger"],
                                          "composed": med["composed"]}))
    if HAS_LIGER:
        info["mem_fraction_of_liger"] = round(mem["fused"] / mem["liger"], 4)
    benchmark.extra_info.update(info)
    print(info)
    assert mem["fused"] <= 0.12 * mem["naive"], info
    if HAS_LIGER:
        # issue 18's target (issue 3's was 0.8x): 0.56-0.58x measured with the compiled row
        # statistics (csrc/row_stats.c), 0.58-0.62x with the torch passes; see RESULTS.md
        assert med["fused"] <= 0.6 * med["liger"], info
    assert med["fused"] <= 0.8 * med["naive"], info
    assert med["fused"] < med["composed"], info  # the in-forward gradient is a measured speed-up


if __name__ == "__main__":  # quick manual timing: python -m benchmarks.test_bench_policy_loss
    for name in ("fused", "naive", "liger"):
        if name == "liger" and not HAS_LIGER:
            continue
        fn = globals()[f"make_{name}"]()
        print(name, round(median_time(fn, repeats=3), 3), "s")
