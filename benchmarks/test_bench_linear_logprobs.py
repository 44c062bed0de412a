"""Benchmark of SPEC §1 (fused log-probs + entropy) against the naive eager path and the peers.

CPU target (issue 2), N=2048, D=512, V=32000 fp32, forward + backward of logp and entropy:
at most 0.9x the naive time (issue 18; 0.95x in issue 2) and at most 12% of its peak memory growth. Each benchmark records in
extra_info the median times of every path that runs here, our ratio against each, and (for
forward + backward) the peak RSS growth of each path measured in a clean subprocess.

Peers: TRL's ``ChunkedLogProbFunction`` (runs on CPU with torch ops); Liger-Kernel's fused linear
cross-entropy runs Triton kernels and needs CUDA, so on the CPU it is reported as not run.
"""

from __future__ import annotations

import os

import torch

from benchmarks._harness import median_time, peak_rss_growth, ratio_info
from gccpo_kernels import fused_linear_logprobs

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
N, D, V = (int(x) for x in os.environ.get("GCCPO_BENCH_NDV", "2048,512,32000").split(","))
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
HERE = "benchmarks.test_bench_linear_logprobs"


def _inputs(n: int = N, d: int = D, v: int = V, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g).to(DEVICE, DTYPE).requires_grad_()
    w = (torch.randn(v, d, generator=g) * 2 / d ** 0.5).to(DEVICE, DTYPE).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g).to(DEVICE)
    return h, w, y


def naive_logprobs(h, w, y):
    """The eager path every trainer writes: full logits, log_softmax, gather, entropy."""
    logits = (h @ w.T).float()
    logprobs = torch.log_softmax(logits, dim=-1)
    logp = logprobs.gather(-1, y[:, None]).squeeze(-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return logp, entropy


def ours_logprobs(h, w, y):
    return fused_linear_logprobs(h, w, y, return_entropy=True)


def trl_logprobs(h, w, y):
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    logp, entropy, *_ = ChunkedLogProbFunction.apply(h, w, None, y, 1.0, 4096, None, 1.0,
                                                     ("entropy",))
    return logp, entropy


def _trl_available() -> bool:
    try:
        import trl.kernels.chunked_logprob  # noqa: F401
    except Exception:
        return False
    return True


def _liger_available() -> bool:
    if DEVICE.type != "cuda":
        return False
    try:
        import liger_kernel.ops.fused_linear_cross_entropy  # noqa: F401
    except Exception:
        return False
    return True


def liger_logprobs(h, w, y):
    """Liger's fused linear cross-entropy, per token (reduction='none'), with its entropy where
    this version offers one; -CE is the target log-prob."""
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

    out = LigerFusedLinearCrossEntropyFunction.apply(h, w, y, None, None, -100, 0.0, 0.0, "none")
    loss = out[0] if isinstance(out, tuple) else out
    return -loss, None


PATHS = {"naive": naive_logprobs, "ours": ours_logprobs, "trl": trl_logprobs,
         "liger": liger_logprobs}


def _available(name: str) -> bool:
    return {"trl": _trl_available, "liger": _liger_available}.get(name, lambda: True)()


def _fwd_bwd(fn, h, w, y):
    def run():
        h.grad = None
        w.grad = None
        logp, entropy = fn(h, w, y)
        loss = logp.sum() if entropy is None else logp.sum() + entropy.sum()
        loss.backward()

    return run


def _fwd(fn, h, w, y):
    def run():
        with torch.no_grad():
            fn(h, w, y)

    return run


def memory_workload(path: str, n: int, d: int, v: int):
    """Factory for peak_rss_growth: the inputs and their gradient buffers are allocated before
    the baseline is read, so only the workload's own memory counts."""
    h, w, y = _inputs(n, d, v)
    h.grad, w.grad = torch.zeros_like(h), torch.zeros_like(w)

    def run():
        logp, entropy = PATHS[path](h, w, y)
        loss = logp.sum() if entropy is None else logp.sum() + entropy.sum()
        loss.backward()

    return run


def _times(make_run, repeats: int) -> dict[str, float | None]:
    """Median seconds of every available path, measured in interleaved rounds (one run of each
    path per round), so that a busy neighbour slows every path alike and the ratios hold."""
    h, w, y = _inputs()
    runs = {name: make_run(fn, h, w, y) for name, fn in PATHS.items() if _available(name)}
    rounds: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(repeats):
        for name, run in runs.items():
            rounds[name].append(median_time(run, repeats=1, warmup=1 if i == 0 else 0))
    return {name: (sorted(rounds[name])[len(rounds[name]) // 2] if name in rounds else None)
            for name in PATHS}


def test_forward(benchmark):
    h, w, y = _inputs()
    times = _times(_fwd, repeats=3)
    benchmark.pedantic(_fwd(ours_logprobs, h, w, y), rounds=3, iterations=1, warmup_rounds=1)
    ours = times["ours"]  # from the interleaved rounds (pytest-benchmark's table has its own)
    # what validate=True costs: the value checks alone (target range, finite hidden), per call
    from gccpo_kernels._validation import check_finite, check_targets

    def checks():
        check_targets(y, y.shape, V, -100, True, h.device)
        check_finite("hidden", h, True)

    benchmark.extra_info.update({"shape": [N, D, V], "dtype": str(DTYPE), "device": str(DEVICE),
                                 "median_s": {k: v for k, v in times.items()},
                                 "validate_checks_s": median_time(checks, repeats=20),
                                 **ratio_info(ours, {k: v for k, v in times.items() if k != "ours"})})


def test_forward_backward(benchmark):
    h, w, y = _inputs()
    times = _times(_fwd_bwd, repeats=3)
    benchmark.pedantic(_fwd_bwd(ours_logprobs, h, w, y), rounds=1, iterations=1)
    ours = times["ours"]  # from the interleaved rounds (pytest-benchmark's table has its own)
    info = {"shape": [N, D, V], "dtype": str(DTYPE), "device": str(DEVICE),
            "median_s": dict(times),
            **ratio_info(ours, {k: v for k, v in times.items() if k != "ours"})}
    if DEVICE.type == "cpu":
        growth = {name: peak_rss_growth(f"{HERE}:memory_workload", path=name, n=N, d=D, v=V,
                                         warmup=dict(n=8, d=16, v=64))
                  for name in PATHS if _available(name)}
        info["peak_rss_growth_mib"] = {k: round(v / 2**20, 1) for k, v in growth.items()}
        info["memory_ratio_vs_naive"] = round(growth["ours"] / growth["naive"], 4)
    if not _liger_available():
        info["liger"] = "not run: Liger's fused linear cross-entropy is a Triton kernel (needs CUDA)"
    benchmark.extra_info.update(info)
    if DEVICE.type == "cpu" and (N, D, V) == (2048, 512, 32000):
        assert ours <= 0.90 * times["naive"], info
        assert info["memory_ratio_vs_naive"] <= 0.12, info


# ------------------------------------------------------------------------------------------------
# per-token NLL (no entropy): PyTorch's own chunked linear_cross_entropy as a peer (issue 18)
# ------------------------------------------------------------------------------------------------

def naive_nll(h, w, y):
    return torch.nn.functional.cross_entropy((h @ w.T).float(), y, reduction="none")


def torch_chunked_nll(h, w, y):
    """torch.nn.functional.linear_cross_entropy with LinearCrossEntropyOptions() (torch >= 2.13:
    the batch processed in chunks, logits never materialized whole)."""
    from torch.nn import LinearCrossEntropyOptions

    return torch.nn.functional.linear_cross_entropy(h, w, y, reduction="none",
                                                    options=LinearCrossEntropyOptions())


def ours_nll(h, w, y):
    return -fused_linear_logprobs(h, w, y)[0]


NLL_PATHS = {"naive_ce": naive_nll, "torch_linear_ce": torch_chunked_nll, "ours": ours_nll}


def _torch_lce_available() -> bool:
    return hasattr(torch.nn, "LinearCrossEntropyOptions") and hasattr(torch.nn.functional,
                                                                     "linear_cross_entropy")


def nll_workload(path: str, n: int, d: int, v: int):
    """Factory for peak_rss_growth: per-token NLL forward + backward of one path."""
    h, w, y = _inputs(n, d, v)
    h.grad, w.grad = torch.zeros_like(h), torch.zeros_like(w)

    def run():
        NLL_PATHS[path](h, w, y).sum().backward()

    return run


def test_nll_forward_backward(benchmark):
    """Per-token NLL forward + backward, against naive cross-entropy and PyTorch's chunked
    linear_cross_entropy. Issue 18 asks to beat PyTorch's on time and on memory (both asserted on
    the CPU at the issue's shape: our CPU tiles are 512 x 512, see gccpo_kernels._workspace)."""
    h, w, y = _inputs()
    paths = [p for p in NLL_PATHS if p != "torch_linear_ce" or _torch_lce_available()]

    def make(fn):
        def run():
            h.grad = w.grad = None
            fn(h, w, y).sum().backward()
        return run

    runs = {p: make(NLL_PATHS[p]) for p in paths}
    times: dict[str, list[float]] = {p: [] for p in paths}
    for i in range(3):  # interleaved rounds
        for p in paths:
            times[p].append(median_time(runs[p], repeats=1, warmup=1 if i == 0 else 0))
    med = {p: sorted(t)[1] for p, t in times.items()}
    benchmark.pedantic(runs["ours"], rounds=1, iterations=1)
    info = {"shape": [N, D, V], "dtype": str(DTYPE), "device": str(DEVICE), "median_s": med,
            **ratio_info(med["ours"], {p: med[p] for p in paths if p != "ours"})}
    if not _torch_lce_available():
        info["torch_linear_ce"] = "not run: torch.nn.LinearCrossEntropyOptions needs torch >= 2.13"
    if DEVICE.type == "cpu":
        growth = {p: peak_rss_growth(f"{HERE}:nll_workload", path=p, n=N, d=D, v=V,
                                     warmup=dict(n=8, d=16, v=64)) for p in paths}
        info["peak_rss_growth_mib"] = {p: round(g / 2**20, 1) for p, g in growth.items()}
    benchmark.extra_info.update(info)
    print(info)
    if DEVICE.type == "cpu" and (N, D, V) == (2048, 512, 32000) and _torch_lce_available():
        assert info["ratio_vs_torch_linear_ce"] < 1.0, info
        # one fresh-process sample each: these peaks repeat to ~0.2 MiB (68.1-68.3 against
        # 71.5-71.6 MiB in every run so far), a margin of ~3 MiB
        growth = info["peak_rss_growth_mib"]
        assert growth["ours"] < growth["torch_linear_ce"], info
