"""The ops timed by benchmarks/gpu/run.py, one function per case.

A case returns ``(inputs, paths, info)``: ``inputs`` is a list of argument tuples (one per rotated
input set); each path maps one tuple to a tensor (or a tuple of tensors) whose sum is what the
backward differentiates; ``info`` says whether the case has a backward and its GEMM FLOP count.
Every case has a ``bare_gemm`` path: the plain GEMMs with the FLOPs of the op's matmuls, the floor
to compare against.
"""

from __future__ import annotations

import torch


def lm_inputs(n: int, d: int, v: int, dtype: torch.dtype, device: torch.device, seed: int,
              logit_std: float = 4.0):
    """hidden [n, d], LM head [v, d] scaled so logits have std ~4 (peaked softmaxes, like a trained
    head: near-uniform ones flatter peers that skip small gradients), targets [n]."""
    g = torch.Generator(device=device).manual_seed(seed)  # drawn on the card: no host randn
    h = torch.randn(n, d, generator=g, device=device)
    w = torch.randn(v, d, generator=g, device=device) * (logit_std / d ** 0.5)
    y = torch.randint(0, v, (n,), generator=g, device=device)
    return h.to(dtype).requires_grad_(), w.to(dtype).requires_grad_(), y


def liger_ok(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        import liger_kernel  # noqa: F401
    except Exception:
        return False
    return True


def _add_cce(paths: dict, device: torch.device) -> None:
    if device.type != "cuda":
        return
    try:
        from cut_cross_entropy import linear_cross_entropy
    except Exception:
        return

    def cce(h, w, y, filter_eps="auto"):
        return -linear_cross_entropy(h, w, y, reduction="none", filter_eps=filter_eps)

    paths["cce"] = cce
    paths["cce_nofilter"] = lambda h, w, y: cce(h, w, y, filter_eps=None)


def primitive(n, d, v, dtype, device, sets):
    """SPEC §1: logp + entropy, forward and forward+backward, vs naive, TRL, Liger, CCE."""
    from benchmarks.test_bench_linear_logprobs import PATHS, _available

    inputs = [lm_inputs(n, d, v, dtype, device, seed) for seed in range(sets)]
    paths = {name: fn for name, fn in PATHS.items() if _available(name) and name != "liger"}
    if liger_ok(device):
        paths["liger"] = PATHS["liger"]
    _add_cce(paths, device)
    from benchmarks.test_bench_linear_logprobs import _torch_lce_available, torch_chunked_nll

    if _torch_lce_available():  # PyTorch's own chunked linear_cross_entropy (NLL only, no entropy)
        paths["torch_linear_ce"] = torch_chunked_nll
    paths["bare_gemm"] = lambda h, w, y: h @ w.T
    return inputs, paths, {"backward": True, "gemm_flops_fwd_bwd": 6 * n * v * d}


def policy_loss(n, d, v, dtype, device, sets):
    """SPEC §2: fused policy loss (TRL dapo, beta 0.04) vs naive logits + the same loss, Liger."""
    from gccpo_kernels import PolicyLossConfig, fused_linear_policy_loss
    from gccpo_kernels import policy_loss as loss_math

    cfg = PolicyLossConfig.from_trl("dapo", epsilon=0.2, epsilon_high=0.28, beta=0.04,
                                    use_bias_correction_kl=False)
    t = min(n, 1024)
    b = max(1, n // t)

    def make(seed):
        h, w, y = lm_inputs(b * t, d, v, dtype, device, seed)
        g = torch.Generator().manual_seed(seed + 100)
        base = torch.full((b, t), -3.0)
        old = (base + 0.05 * torch.randn(b, t, generator=g)).to(device)
        ref = (base + 0.05 * torch.randn(b, t, generator=g)).to(device)
        adv = torch.randn(b, generator=g).to(device)
        mask = torch.ones(b, t, dtype=torch.long, device=device)
        h = h.detach().reshape(b, t, d).requires_grad_()
        return (h, w, y.reshape(b, t), adv, mask, old, ref)

    def ours(h, w, y, adv, mask, old, ref):
        """The default (triton on CUDA): gradient formed in the forward (6NVD), cuBLAS bf16 GEMMs
        with a float32 result at a fixed chunk shape, Triton row-statistics and logit-gradient
        epilogues (gccpo_kernels/triton/loss_epilogue.py; issue 18)."""
        return fused_linear_policy_loss(h, w, y, adv, mask, old_logp=old, ref_logp=ref,
                                        config=cfg).loss

    def ours_in_forward(h, w, y, adv, mask, old, ref):
        """The torch backend: gradient formed in the forward (6NVD), cuBLAS bf16 GEMMs with a
        float32 result (gccpo_kernels._gemm), torch elementwise passes (issue 18)."""
        return fused_linear_policy_loss(h, w, y, adv, mask, old_logp=old, ref_logp=ref,
                                        config=cfg, backend="torch").loss

    def ours_composed(h, w, y, adv, mask, old, ref):
        """The composed path (8NVD: primitive forward, loss, primitive backward with recompute),
        which the loss takes when another input needs a gradient: the advantages here, a leaf
        whose gradient costs O(N)."""
        return fused_linear_policy_loss(h, w, y, adv.detach().requires_grad_(), mask, old_logp=old,
                                        ref_logp=ref, config=cfg).loss

    def naive(h, w, y, adv, mask, old, ref):
        logprobs = torch.log_softmax((h @ w.T).float(), dim=-1)
        logp = logprobs.gather(-1, y[..., None]).squeeze(-1)
        return loss_math(logp, old, adv, mask, ref_logp=ref, config=cfg)[0]

    paths = {"ours": ours, "ours_in_forward": ours_in_forward, "ours_composed": ours_composed, "naive": naive,
             "bare_gemm": lambda h, w, y, *rest: h @ w.T}
    if liger_ok(device):
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        liger = LigerFusedLinearGRPOLoss(beta=0.04, compiled=True, use_ref_model=True,
                                         epsilon_low=0.2, epsilon_high=0.28, loss_type="dapo",
                                         use_bias_correction_kl=False)

        def liger_path(h, w, y, adv, mask, old, ref):
            return liger(h, w, y, mask, adv, ref_per_token_logps=ref, old_per_token_logps=old)[0]

        paths["liger"] = liger_path
    inputs = [make(s) for s in range(sets)]
    return inputs, paths, {"backward": True, "gemm_flops_fwd_bwd": 6 * b * t * v * d}


def divergence(n, d, v, dtype, device, sets, m=4):
    """SPEC §3: KL under M = 4 tangent perturbations for R = n // 2 rows (R = 4096 at the default
    N = 8192), forward only, vs naive, TRL's chunked divergence once per perturbation, and the bare
    GEMM with the FLOPs of the triton backend's one pass over W (2(M+1)RVD: issue 18's design;
    the 2026-11-26 run's baseline was two passes, the former kernels')."""
    from benchmarks.test_bench_divergence import (_trl_available, make_inputs, naive_divergence,
                                                  ours_divergence, trl_divergence)

    r = max(1, n // 2)
    inputs = []
    for seed in range(sets):
        h, w, deltas = make_inputs(r, m, d, v, seed=seed)
        inputs.append((h.to(device, dtype), w.to(device, dtype), deltas.to(device, dtype)))
    rows_all = lambda h, deltas: torch.cat([h, (h[:, None] + deltas).reshape(-1, h.shape[1])])  # noqa: E731

    def bare(h, w, deltas):
        x = rows_all(h, deltas)
        return x @ w.T  # one pass over W, as the triton backend makes

    paths = {"ours": ours_divergence, "naive": naive_divergence, "bare_gemm": bare}
    if _trl_available():
        paths["trl_loop"] = trl_divergence
    return inputs, paths, {"backward": False}


def group_stats(n, d, v, dtype, device, sets, groups=64):
    """SPEC §4: group statistics for R = n // 2 rows in 64 groups, vs the bare GEMM of the triton
    backend's one pass over W (2RVD: issue 18's design; the 2026-11-26 run's baseline was the
    former kernels' three passes)."""
    from gccpo_kernels import group_distribution_stats

    r = max(2, n // 2)
    inputs = []
    for seed in range(sets):
        h, w, _ = lm_inputs(r, d, v, dtype, device, seed)
        ids = torch.randint(0, groups, (r,), generator=torch.Generator().manual_seed(seed))
        inputs.append((h.detach(), w.detach(), ids.to(device)))

    def ours(h, w, ids):
        return group_distribution_stats(h, w, group_ids=ids).row_kl_to_mixture

    def naive(h, w, ids):
        q = torch.softmax((h @ w.T).float(), dim=-1)
        mix = torch.zeros(int(ids.max()) + 1, q.shape[1], device=q.device).index_add_(0, ids, q)
        mix = mix / torch.bincount(ids, minlength=mix.shape[0]).clamp(min=1)[:, None]
        return (q * (q.clamp_min(1e-30).log() - mix[ids].clamp_min(1e-30).log())).sum(-1)

    def bare(h, w, ids):
        return h @ w.T

    return inputs, {"ours": ours, "naive": naive, "bare_gemm": bare}, {"backward": False}


CASES = {"primitive": primitive, "policy_loss": policy_loss, "divergence": divergence,
         "group_stats": group_stats}
