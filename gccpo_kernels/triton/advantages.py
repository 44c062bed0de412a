"""SPEC §6 in one Triton launch: token-level advantages for the whole batch.

Layout: one program per *group*. The host only sorts the rows by group id (a stable
``torch.argsort``, no host synchronisation); the grid has one program per row, and the program
sitting at the first row of a group in that order does the whole group while the others return at
once. Inside the group's program, phases separated by block-wide barriers (results of one phase
live in small [B, K] scratch buffers that only this program touches):

1. per member row, one pass over its tokens: episode count (1 + largest id) and, for each episode,
   the surprise sum and the token count (a one-hot [BLOCK_T, BLOCK_K] reduction, deterministic,
   no atomics);
2. outcome statistics of the group (two passes: mean, then sample std, min and max); the batch std
   for ``scale="batch"`` (each group program reads the B outcome rewards);
3. process rewards normalized over the group's episodes (or copied as given) -> scratch; discounted reverse cumulative
   sum per row (a sequential loop over episodes, R_k = r~_k + gamma R_{k+1}); normalized again;
4. per member row, one pass over its tokens writing A_out + eta * omega_t * R^_{k(t)} (0 outside
   the completion).

Why one program per group: every quantity of phases 2-3 couples all rows of a group, so a
row-parallel layout would need a second launch (or a grid-wide barrier). The cost is that the
parallelism is the number of groups; work per program is O(G_size * T * ceil(K / BLOCK_K)).
All arithmetic is float32; old_logp may be fp16 / bf16 / fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import TL_DTYPE_NAMES, CompileCase, arch_key

# Pinned per architecture; nothing depends on B, T or K.
CONFIGS: dict[str, dict[str, int]] = {
    "interpreter": {"BLOCK_T": 128, "BLOCK_K": 32, "BLOCK_R": 16, "num_warps": 4, "num_stages": 1},
    "sm90": {"BLOCK_T": 256, "BLOCK_K": 32, "BLOCK_R": 16, "num_warps": 8, "num_stages": 2},
    "sm80": {"BLOCK_T": 256, "BLOCK_K": 32, "BLOCK_R": 16, "num_warps": 8, "num_stages": 2},
}

SCALE_CODES = {"group": 0, "batch": 1, "none": 2}


@triton.jit
def _group_mean_std(src_ptr, order_ptr, cnt_ptr, start, end, K, BLOCK_R: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    """Mean, sample std and whether all values are equal, over the valid (row, k) entries of the
    group's rows order[start:end] in the [B, K] buffer src (k < count of the row)."""
    total = 0.0
    n = 0.0
    for j0 in range(start, end, BLOCK_R):
        js = j0 + tl.arange(0, BLOCK_R)
        jm = js < end
        rows = tl.load(order_ptr + js, mask=jm, other=0)
        cnt = tl.load(cnt_ptr + rows, mask=jm, other=0)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            valid = jm[:, None] & (ks[None, :] < cnt[:, None])
            v = tl.load(src_ptr + rows[:, None] * K + ks[None, :], mask=valid, other=0.0)
            total += tl.sum(tl.sum(v, axis=1), axis=0)
            n += tl.sum(tl.sum(valid.to(tl.float32), axis=1), axis=0)
    mean = total / tl.maximum(n, 1.0)
    ss = 0.0
    vmin = float("inf")
    vmax = -float("inf")
    for j0 in range(start, end, BLOCK_R):
        js = j0 + tl.arange(0, BLOCK_R)
        jm = js < end
        rows = tl.load(order_ptr + js, mask=jm, other=0)
        cnt = tl.load(cnt_ptr + rows, mask=jm, other=0)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            valid = jm[:, None] & (ks[None, :] < cnt[:, None])
            v = tl.load(src_ptr + rows[:, None] * K + ks[None, :], mask=valid, other=0.0)
            d = tl.where(valid, v - mean, 0.0)
            ss += tl.sum(tl.sum(d * d, axis=1), axis=0)
            vmin = tl.minimum(vmin, tl.min(tl.min(tl.where(valid, v, float("inf")), axis=1), axis=0))
            vmax = tl.maximum(vmax, tl.max(tl.max(tl.where(valid, v, -float("inf")), axis=1), axis=0))
    std = tl.where(n > 1.5, tl.sqrt(ss / tl.maximum(n - 1.0, 1.0)), 0.0)
    return mean, std, vmin == vmax


@triton.jit
def _group_standardize(src_ptr, dst_ptr, order_ptr, cnt_ptr, start, end, K, eps,
                       BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """dst[row, k] = (src - mean) / (std + eps) over the group's valid entries, 0 elsewhere (and 0
    everywhere when the valid values are all equal). src may be dst: each element is read and
    written by the same tile position."""
    mean, std, equal = _group_mean_std(src_ptr, order_ptr, cnt_ptr, start, end, K, BLOCK_R, BLOCK_K)
    inv = 1.0 / (std + eps)
    for j0 in range(start, end, BLOCK_R):
        js = j0 + tl.arange(0, BLOCK_R)
        jm = js < end
        rows = tl.load(order_ptr + js, mask=jm, other=0)
        cnt = tl.load(cnt_ptr + rows, mask=jm, other=0)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            inb = jm[:, None] & (ks[None, :] < K)
            valid = inb & (ks[None, :] < cnt[:, None])
            v = tl.load(src_ptr + rows[:, None] * K + ks[None, :], mask=valid, other=0.0)
            v = tl.where(valid, (v - mean) * inv, 0.0)
            tl.store(dst_ptr + rows[:, None] * K + ks[None, :], tl.where(equal, 0.0, v), mask=inb)


@triton.jit
def _token_advantages_kernel(order_ptr, group_ptr, outcome_ptr, reward_ptr, ids_ptr, logp_ptr,
                             mask_ptr, out_ptr, surp_ptr, size_ptr, ret_ptr, cnt_ptr,
                             B, T, K, eta, gamma, eps, scale_mode, surprise, normalize, norm_rewards,
                             BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """SPEC §6 for the whole batch in one launch: the program at the first row of each group (in
    the stable order ``order_ptr``) runs the module docstring's phases 1-4 for that group; every
    other program returns at once. Scratch [B, K] buffers (surprise sums, sizes, returns) and
    counts [B] are touched only by the group's program."""
    p = tl.program_id(0)
    g = tl.load(group_ptr + tl.load(order_ptr + p))
    g_prev = tl.load(group_ptr + tl.load(order_ptr + tl.maximum(p - 1, 0)))
    if (p == 0) | (g_prev != g):
        # this program leads its group: members are order[p:end]
        end = p + 1
        go = end < B
        while go:
            g_next = tl.load(group_ptr + tl.load(order_ptr + tl.minimum(end, B - 1)))
            go = (g_next == g) & (end < B)
            end += go.to(tl.int32)

        use_s = tl.full([BLOCK_T], surprise, tl.int32) != 0  # old_logp is read only when set
        # phase 1: per row, episode count and per-episode surprise sums and sizes
        for j in range(p, end):
            row = tl.load(order_ptr + j)
            base = row * T
            last = -1
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                acc_s = tl.zeros([BLOCK_K], dtype=tl.float32)
                acc_n = tl.zeros([BLOCK_K], dtype=tl.float32)
                for t0 in range(0, T, BLOCK_T):
                    ts = t0 + tl.arange(0, BLOCK_T)
                    inb = ts < T
                    m = tl.load(mask_ptr + base + ts, mask=inb, other=0) != 0
                    e = tl.load(ids_ptr + base + ts, mask=inb, other=-1).to(tl.int32)
                    e = tl.where(m & (e < K), e, -1)
                    last = tl.maximum(last, tl.max(e, axis=0))
                    s = -tl.load(logp_ptr + base + ts, mask=(e >= 0) & use_s,
                                 other=0.0).to(tl.float32)
                    hit = e[:, None] == ks[None, :]
                    acc_s += tl.sum(tl.where(hit, s[:, None], 0.0), axis=0)
                    acc_n += tl.sum(hit.to(tl.float32), axis=0)
                tl.store(surp_ptr + row * K + ks, acc_s, mask=ks < K)
                tl.store(size_ptr + row * K + ks, acc_n, mask=ks < K)
            tl.store(cnt_ptr + row, last + 1)
        tl.debug_barrier()

        # phase 2: outcome statistics of the group (and of the batch for scale="batch")
        n_out = (end - p).to(tl.float32)
        total = 0.0
        for j0 in range(p, end, BLOCK_R):
            js = j0 + tl.arange(0, BLOCK_R)
            rows = tl.load(order_ptr + js, mask=js < end, other=0)
            total += tl.sum(tl.load(outcome_ptr + rows, mask=js < end, other=0.0), axis=0)
        mean_out = total / n_out
        ss = 0.0
        vmin = float("inf")
        vmax = -float("inf")
        for j0 in range(p, end, BLOCK_R):
            js = j0 + tl.arange(0, BLOCK_R)
            jm = js < end
            rows = tl.load(order_ptr + js, mask=jm, other=0)
            r = tl.load(outcome_ptr + rows, mask=jm, other=0.0)
            d = tl.where(jm, r - mean_out, 0.0)
            ss += tl.sum(d * d, axis=0)
            vmin = tl.minimum(vmin, tl.min(tl.where(jm, r, float("inf")), axis=0))
            vmax = tl.maximum(vmax, tl.max(tl.where(jm, r, -float("inf")), axis=0))
        std_out = tl.where(n_out > 1.5, tl.sqrt(ss / tl.maximum(n_out - 1.0, 1.0)), 0.0)
        if scale_mode == 1:
            # counts are accumulated as tensors: B may arrive as the constexpr 1 (JIT specialization)
            bt = 0.0
            bn = 0.0
            for i0 in range(0, B, BLOCK_R):
                ii = i0 + tl.arange(0, BLOCK_R)
                bt += tl.sum(tl.load(outcome_ptr + ii, mask=ii < B, other=0.0), axis=0)
                bn += tl.sum((ii < B).to(tl.float32), axis=0)
            bmean = bt / bn
            bss = 0.0
            for i0 in range(0, B, BLOCK_R):
                ii = i0 + tl.arange(0, BLOCK_R)
                d = tl.where(ii < B, tl.load(outcome_ptr + ii, mask=ii < B, other=0.0) - bmean, 0.0)
                bss += tl.sum(d * d, axis=0)
            std_out = tl.where(bn > 1.5, tl.sqrt(bss / tl.maximum(bn - 1.0, 1.0)), 0.0)
        den_out = tl.where(scale_mode == 2, 1.0, std_out + eps)
        out_equal = vmin == vmax

        # phase 3: process rewards -> r~ (scratch), discounted returns in place, normalized again
        if norm_rewards != 0:
            _group_standardize(reward_ptr, ret_ptr, order_ptr, cnt_ptr, p, end, K, eps, BLOCK_R, BLOCK_K)
        else:  # as given: copy the group's rows, 0 past a row's count (those are never read)
            for j0 in range(p, end, BLOCK_R):
                js = j0 + tl.arange(0, BLOCK_R)
                jm = js < end
                rows = tl.load(order_ptr + js, mask=jm, other=0)
                cnt = tl.load(cnt_ptr + rows, mask=jm, other=0)
                for k0 in range(0, K, BLOCK_K):
                    ks = k0 + tl.arange(0, BLOCK_K)
                    inb = jm[:, None] & (ks[None, :] < K)
                    valid = jm[:, None] & (ks[None, :] < cnt[:, None])
                    v = tl.load(reward_ptr + rows[:, None] * K + ks[None, :], mask=valid, other=0.0)
                    tl.store(ret_ptr + rows[:, None] * K + ks[None, :], v, mask=inb)
        tl.debug_barrier()
        for j0 in range(p, end, BLOCK_R):
            js = j0 + tl.arange(0, BLOCK_R)
            jm = js < end
            rows = tl.load(order_ptr + js, mask=jm, other=0)
            acc = tl.zeros([BLOCK_R], dtype=tl.float32)
            for kk in range(0, K):
                k = K - 1 - kk
                acc = tl.load(ret_ptr + rows * K + k, mask=jm, other=0.0) + gamma * acc
                tl.store(ret_ptr + rows * K + k, acc, mask=jm)
        tl.debug_barrier()
        if normalize != 0:
            _group_standardize(ret_ptr, ret_ptr, order_ptr, cnt_ptr, p, end, K, eps, BLOCK_R, BLOCK_K)
        tl.debug_barrier()

        # phase 4: token advantages
        for j in range(p, end):
            row = tl.load(order_ptr + j)
            base = row * T
            r = tl.load(outcome_ptr + row)
            a_out = tl.where(out_equal, 0.0, (r - mean_out) / den_out)
            for t0 in range(0, T, BLOCK_T):
                ts = t0 + tl.arange(0, BLOCK_T)
                inb = ts < T
                m = tl.load(mask_ptr + base + ts, mask=inb, other=0) != 0
                e = tl.load(ids_ptr + base + ts, mask=inb, other=-1).to(tl.int32)
                in_ep = m & (e >= 0) & (e < K)
                ec = tl.where(in_ep, e, 0)
                ret = tl.load(ret_ptr + row * K + ec, mask=in_ep, other=0.0)
                ssum = tl.load(surp_ptr + row * K + ec, mask=in_ep, other=0.0)
                size = tl.load(size_ptr + row * K + ec, mask=in_ep, other=0.0)
                s = -tl.load(logp_ptr + base + ts, mask=in_ep & use_s, other=0.0).to(tl.float32)
                weighted = use_s & (ssum != 0.0)
                omega = tl.where(weighted, size * s / tl.where(weighted, ssum, 1.0), 1.0)
                a = a_out + eta * tl.where(in_ep, omega * ret, 0.0)
                tl.store(out_ptr + base + ts, tl.where(m, a, 0.0), mask=inb)


def token_advantages(outcome_rewards: torch.Tensor, group_index: torch.Tensor,
                     episode_ids: torch.Tensor, episode_rewards: torch.Tensor,
                     old_logp: torch.Tensor | None, mask: torch.Tensor, *, eta: float, gamma: float,
                     scale: str, surprise_weighting: bool, normalize_returns: bool, eps: float,
                     dtype: torch.dtype, normalize_rewards: bool = True) -> torch.Tensor:
    """Host side: one stable argsort of the group ids, scratch buffers, one kernel launch.

    Inputs are validated by the caller; episode_rewards has K >= 1 columns. Returns [B, T] float32.
    """
    B, T = episode_ids.shape
    K = episode_rewards.shape[1]
    dev = episode_ids.device
    cfg = CONFIGS[arch_key(dev)]
    groups = group_index.to(torch.int64).contiguous()
    order = torch.argsort(groups, stable=True)
    outcome = outcome_rewards.to(torch.float32).contiguous()
    rewards = episode_rewards.to(torch.float32).contiguous()
    ids = episode_ids if episode_ids.dtype in (torch.int32, torch.int64) else episode_ids.to(torch.int64)
    ids = ids.contiguous()
    inside = mask if mask.dtype == torch.bool else mask != 0
    inside = inside.contiguous().view(torch.uint8)
    if old_logp is None:  # surprise weighting is off: every load of it is masked off
        logp = torch.zeros((1,), dtype=torch.float32, device=dev)
        surprise_weighting = False
    else:
        logp = old_logp.contiguous()
    out = torch.empty((B, T), dtype=torch.float32, device=dev)
    surp = torch.empty((B, K), dtype=torch.float32, device=dev)
    size = torch.empty((B, K), dtype=torch.float32, device=dev)
    ret = torch.empty((B, K), dtype=torch.float32, device=dev)
    cnt = torch.empty((B,), dtype=torch.int32, device=dev)
    _token_advantages_kernel[(B,)](
        order, groups, outcome, rewards, ids, logp, inside, out, surp, size, ret, cnt,
        B, T, K, float(eta), float(gamma), float(eps), SCALE_CODES[scale], int(bool(surprise_weighting)),
        int(bool(normalize_returns)), int(bool(normalize_rewards)), BLOCK_T=cfg["BLOCK_T"], BLOCK_K=cfg["BLOCK_K"],
        BLOCK_R=cfg["BLOCK_R"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def compile_cases(arch: str) -> list[CompileCase]:
    """The kernel at the pinned configuration of ``arch`` for fp16 / bf16 / fp32 old_logp with
    int64 episode ids, fp32 with int32 ids, and B = T = K = 1 (every option is a run-time
    argument, so no flag multiplies the cases)."""
    cfg = CONFIGS[arch]
    cases = []
    for dtype, id_type in ((torch.float32, "i64"), (torch.bfloat16, "i64"), (torch.float16, "i64"),
                           (torch.float32, "i32")):
        t = TL_DTYPE_NAMES[dtype]
        sig = {"order_ptr": "*i64", "group_ptr": "*i64", "outcome_ptr": "*fp32", "reward_ptr": "*fp32",
               "ids_ptr": f"*{id_type}", "logp_ptr": f"*{t}", "mask_ptr": "*u8", "out_ptr": "*fp32",
               "surp_ptr": "*fp32", "size_ptr": "*fp32", "ret_ptr": "*fp32", "cnt_ptr": "*i32",
               "B": "i32", "T": "i32", "K": "i32", "eta": "fp32", "gamma": "fp32", "eps": "fp32",
               "scale_mode": "i32", "surprise": "i32", "normalize": "i32", "norm_rewards": "i32"}
        const = {"BLOCK_T": cfg["BLOCK_T"], "BLOCK_K": cfg["BLOCK_K"], "BLOCK_R": cfg["BLOCK_R"]}
        sig.update({k: "constexpr" for k in const})
        cases.append(CompileCase(f"token_advantages-{t}-{id_type}", _token_advantages_kernel, sig, const,
                                 cfg["num_warps"], cfg["num_stages"], uses_dot=False,
                                 divisible_ints=("T",)))
    # the JIT turns integer arguments equal to 1 into constants: B = T = K = 1 must compile too
    sig = dict(cases[0].signature, B="constexpr", T="constexpr", K="constexpr")
    const = dict(cases[0].constexprs, B=1, T=1, K=1)
    cases.append(CompileCase("token_advantages-fp32-i64-ones", _token_advantages_kernel, sig, const,
                             cfg["num_warps"], cfg["num_stages"], uses_dot=False))
    return cases
