"""Benchmark of SPEC §6 token_advantages against a straightforward torch version that loops over
groups, completions and episodes (issue 5).

Shape: B = 512 completions in 64 groups of 8, T = 4096 tokens, 1..16 episodes per completion,
float32, mixed left/right padding, default options (eta = 1, gamma = 1, group scale, surprise
weighting, normalized returns) and eta = 0 (plain GRPO through the same code).

On the CPU this measures the torch backend (vectorized segmented reductions); the triton backend
runs only in the interpreter there, which is far too slow at this size, so it is reported as not
run (on a GPU both backends are timed). Recorded in extra_info: median times, our ratio against
the loop version, the peak RSS growth of both above their inputs (clean subprocess, VmHWM), and the
largest difference from the loop version (a sanity check that both compute the same thing).
"""

from __future__ import annotations

import os

import torch

from benchmarks._harness import median_time, peak_rss_growth, ratio_info
from gccpo_kernels import token_advantages

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
B, T = (int(x) for x in os.environ.get("GCCPO_BENCH_BT", "512,4096").split(","))
GROUP, K_MAX = 8, 16
HERE = "benchmarks.test_bench_advantages"


def make_inputs(b: int = B, t: int = T, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(t // 8, t + 1, (b,), generator=g)
    left = torch.rand(b, generator=g) < 0.5
    pos = torch.arange(t)[None, :]
    mask = torch.where(left[:, None], pos >= t - lengths[:, None], pos < lengths[:, None])
    counts = torch.randint(1, K_MAX + 1, (b,), generator=g)
    ids = torch.full((b, t), -1, dtype=torch.int64)
    for i in range(b):
        n = int(lengths[i])
        cuts = torch.randperm(n - 1, generator=g)[:int(counts[i]) - 1] + 1
        local = torch.zeros(n, dtype=torch.int64)
        local[cuts] = 1
        ids[i, mask[i]] = local.cumsum(0)
    groups = torch.arange(b)[torch.randperm(b, generator=g)] // GROUP
    return dict(outcome_rewards=(torch.rand(b, generator=g) < 0.5).float(), group_index=groups,
                episode_ids=ids, episode_rewards=torch.randn(b, K_MAX, generator=g),
                old_logp=-3 * torch.rand(b, t, generator=g), mask=mask)


def _standardize(x: torch.Tensor, eps: float) -> torch.Tensor:
    if x.numel() == 0 or bool((x == x[0]).all()):
        return torch.zeros_like(x)
    std = x.std() if x.numel() > 1 else torch.zeros(())
    return (x - x.mean()) / (std + eps)


def loop_advantages(outcome_rewards, group_index, episode_ids, episode_rewards, old_logp, mask, *,
                    eta: float = 1.0, gamma: float = 1.0, eps: float = 1e-4) -> torch.Tensor:
    """The straightforward version: Python loops over groups, completions and episodes, torch
    ops inside (what one writes first from the formulas of SPEC §6)."""
    out = torch.zeros(episode_ids.shape, dtype=torch.float32, device=episode_ids.device)
    for g in group_index.unique():
        rows = (group_index == g).nonzero().flatten().tolist()
        a_out = _standardize(outcome_rewards[rows].float(), eps)
        counts = [int(episode_ids[i][mask[i]].max()) + 1 if bool(mask[i].any()) else 0 for i in rows]
        r_tilde = _standardize(torch.cat([episode_rewards[i, :c].float() for i, c in zip(rows, counts)]), eps)
        returns, off = [], 0
        for c in counts:
            acc, row = torch.zeros(()), [torch.zeros(())] * c
            for k in reversed(range(c)):
                acc = r_tilde[off + k] + gamma * acc
                row[k] = acc
            returns += row
            off += c
        r_hat = _standardize(torch.stack(returns), eps) if returns else torch.zeros(0)
        off = 0
        for j, (i, c) in enumerate(zip(rows, counts)):
            out[i][mask[i]] = a_out[j]
            for k in range(c):
                sel = (episode_ids[i] == k) & mask[i]
                s = -old_logp[i][sel].float()
                total = s.sum()
                omega = torch.ones_like(s) if total == 0 else s.numel() * s / total
                out[i][sel] = a_out[j] + eta * omega * r_hat[off + k]
            off += c
    return out


def memory_workload(path: str, b: int, t: int):
    inputs = make_inputs(b, t)

    def run():
        if path == "loop":
            loop_advantages(**inputs)
        else:
            token_advantages(**inputs, backend="torch")

    return run


def peak_growth(path: str, b: int = B, t: int = T) -> int:
    """Bytes by which the workload grows peak RSS beyond its inputs (clean subprocess)."""
    return peak_rss_growth(f"{HERE}:memory_workload", path=path, b=b, t=t, warmup=dict(b=16, t=64))


def _run_case(benchmark, eta: float, *, memory: bool) -> dict:
    inputs = {k: v.to(DEVICE) for k, v in make_inputs().items()}
    backends = ["torch"] + (["triton"] if DEVICE.type == "cuda" else [])
    ours = {name: (lambda name=name: token_advantages(**inputs, eta=eta, backend=name)) for name in backends}
    loop_s = median_time(lambda: loop_advantages(**inputs, eta=eta), repeats=2, warmup=0)
    times = {name: median_time(fn, repeats=5) for name, fn in ours.items()}
    main = backends[-1]
    benchmark.pedantic(ours[main], rounds=5, iterations=1, warmup_rounds=1)
    diff = (ours[main]().float() - loop_advantages(**inputs, eta=eta)).abs().max().item()
    info = {"shape": [B, T], "groups_of": GROUP, "max_episodes": K_MAX, "eta": eta, "device": str(DEVICE),
            "dtype": "float32", "median_s": {"loop": loop_s, **times}, "max_abs_diff_vs_loop": diff,
            **ratio_info(benchmark.stats.stats.median, {"loop": loop_s})}
    for name, s in times.items():
        info[f"{name}_ratio_vs_loop"] = round(s / loop_s, 4)
    if DEVICE.type == "cpu":
        info["triton"] = "not run: on the CPU triton runs only in its interpreter (too slow at this size)"
        if memory:
            growth = {p: peak_growth(p) for p in ("ours", "loop")}
            info["peak_rss_growth_mib"] = {k: round(v / 2**20, 1) for k, v in growth.items()}
            info["inputs_mib"] = round(sum(v.numel() * v.element_size() for v in inputs.values()) / 2**20, 1)
    benchmark.extra_info.update(info)
    assert diff <= 1e-3, info
    return info


def test_token_advantages(benchmark):
    info = _run_case(benchmark, 1.0, memory=True)
    if (B, T) == (512, 4096):
        assert info["ratio_vs_loop"] <= 0.5, info


def test_token_advantages_grpo(benchmark):
    info = _run_case(benchmark, 0.0, memory=False)
    if (B, T) == (512, 4096):
        assert info["ratio_vs_loop"] <= 0.5, info
