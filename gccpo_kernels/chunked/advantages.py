"""SPEC §6 on the torch backend: token-level advantages with vectorized segmented reductions.

Groups, episodes and tokens are handled with index_add_ / scatter_reduce_ / gather over flat
index tensors: no Python loop over groups, episodes or tokens (rows are visited only in
workspace-sized chunks), and no host synchronisation (group ids are turned into dense segment
numbers by one stable sort). Any float dtype; float64
in, float64 out.

Cost: two passes over the tokens (O(B*T) time), run over row chunks so that their temporaries stay
within a quarter of the workspace budget (``GCCPO_WORKSPACE_MB``); O(B*K) per-episode state; O(B*K^2)
for the discounted returns (one [B, K] x [K, K] matmul); O(B log B) for the group sort. Extra
memory besides the [B, T] output: the chunk temporaries and O(B*K).
"""

from __future__ import annotations

import torch

from .._workspace import rows_per_chunk, workspace_bytes



def dense_segments(group_index: torch.Tensor) -> torch.Tensor:
    """Map arbitrary integer group ids [B] to dense segment numbers in [0, B), without a host sync.

    Rows with equal ids share a segment; segment numbers follow the sorted order of the ids.
    """
    b = group_index.shape[0]
    order = torch.argsort(group_index, stable=True)
    ids_sorted = group_index.index_select(0, order)
    new = torch.ones(b, dtype=torch.bool, device=group_index.device)
    if b > 1:
        new[1:] = ids_sorted[1:] != ids_sorted[:-1]
    seg_sorted = torch.cumsum(new.to(torch.int64), 0) - 1
    return torch.empty_like(seg_sorted).index_copy_(0, order, seg_sorted)


def segmented_standardize(values: torch.Tensor, segments: torch.Tensor, valid: torch.Tensor,
                          num_segments: int, eps: float, *, std: torch.Tensor | None = None,
                          divide: bool = True) -> torch.Tensor:
    """(v - mean_s) / (std_s + eps) per segment over the valid entries (flat [M] tensors).

    The std is the sample std (n - 1; 0 for a single value) unless ``std`` (a 0-d tensor, e.g. the
    batch std) replaces it; ``divide=False`` returns v - mean_s. Segments whose valid values are all
    equal (including segments of one) give exactly 0; invalid entries give 0 whatever they hold
    (NaN included).
    """
    dt = values.dtype
    v = torch.where(valid, values, torch.zeros((), dtype=dt, device=values.device))
    w = valid.to(dt)
    n = torch.zeros(num_segments, dtype=dt, device=v.device).index_add_(0, segments, w)
    total = torch.zeros_like(n).index_add_(0, segments, v)
    mean = total / n.clamp_min(1.0)
    dev = torch.where(valid, v - mean.index_select(0, segments), torch.zeros((), dtype=dt, device=v.device))
    inf = torch.full((), float("inf"), dtype=dt, device=v.device)
    vmin = torch.full_like(n, float("inf")).scatter_reduce_(0, segments, torch.where(valid, v, inf), "amin")
    vmax = torch.full_like(n, -float("inf")).scatter_reduce_(0, segments, torch.where(valid, v, -inf),
                                                              "amax")
    varies = (vmin != vmax).index_select(0, segments) & valid
    if not divide:
        return torch.where(varies, dev, torch.zeros((), dtype=dt, device=v.device))
    if std is None:
        ss = torch.zeros_like(n).index_add_(0, segments, dev * dev)
        seg_std = torch.where(n > 1, torch.sqrt(ss / (n - 1).clamp_min(1.0)), torch.zeros_like(n))
        denom = seg_std.index_select(0, segments) + eps
    else:
        denom = std + eps
    # where the segment does not vary the division is skipped (0/0 cannot appear)
    return torch.where(varies, dev / torch.where(varies, denom, torch.ones_like(denom)),
                       torch.zeros((), dtype=dt, device=v.device))


def sample_std(x: torch.Tensor) -> torch.Tensor:
    """Bessel-corrected std of a flat tensor as a 0-d tensor; 0 for fewer than two values."""
    if x.numel() < 2:
        return torch.zeros((), dtype=x.dtype, device=x.device)
    return torch.std(x, correction=1)


def discount_matrix(k: int, gamma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """D [K, K] with D[k, k'] = gamma**(k' - k) for k' >= k, else 0: returns are r @ D.T.

    Every power has a non-negative exponent, so nothing overflows for gamma < 1 (underflow to 0 is
    the exact limit), unlike the gamma**-k rescaling of a cumulative sum.
    """
    ar = torch.arange(k, device=device)
    exps = (ar[None, :] - ar[:, None]).to(dtype)
    powers = torch.pow(torch.full((), float(gamma), dtype=dtype, device=device), exps.clamp_min(0))
    return torch.where(exps >= 0, powers, torch.zeros((), dtype=dtype, device=device))


def token_advantages(outcome_rewards: torch.Tensor, group_index: torch.Tensor,
                     episode_ids: torch.Tensor, episode_rewards: torch.Tensor,
                     old_logp: torch.Tensor | None, mask: torch.Tensor, *, eta: float, gamma: float,
                     scale: str, surprise_weighting: bool, normalize_returns: bool, eps: float,
                     dtype: torch.dtype, normalize_rewards: bool = True) -> torch.Tensor:
    """SPEC §6, vectorized. Shapes as in :func:`gccpo_kernels.token_advantages`; returns [B, T]
    in ``dtype`` (the compute dtype). Inputs are already validated."""
    B, T = episode_ids.shape
    K = episode_rewards.shape[1]
    dev = episode_ids.device
    zero = torch.zeros((), dtype=dtype, device=dev)
    seg = dense_segments(group_index)

    # outcome advantage [B]
    r_out = outcome_rewards.to(dtype)
    all_rows = torch.ones(B, dtype=torch.bool, device=dev)
    a_out = segmented_standardize(r_out, seg, all_rows, B, eps,
                                  std=sample_std(r_out) if scale == "batch" else None,
                                  divide=scale != "none")

    width = K + 1
    n_slots = B * width + 1
    # token passes run over row chunks so that their temporaries (about five 8-byte [rows, T]
    # buffers) stay within a quarter of the workspace budget, whatever B
    step = rows_per_chunk(max(T, 1), 40, dev, budget=workspace_bytes(dev) // 4)

    def token_chunk(r0: int, r1: int):
        """Slot of each token of rows r0:r1 (flat), its surprise (0 outside episodes), episode ids."""
        inside = mask[r0:r1] if mask.dtype == torch.bool else mask[r0:r1] != 0
        ids = episode_ids[r0:r1].to(torch.int64)
        in_ep = inside & (ids >= 0)
        base = torch.arange(r0, r1, device=dev)[:, None] * width
        slot = torch.where(in_ep, base + ids, base + K)
        slot = torch.where(inside, slot, torch.full((), n_slots - 1, dtype=torch.int64, device=dev))
        s = torch.where(in_ep, -old_logp[r0:r1].to(dtype), zero) if surprise_weighting else None
        return slot.reshape(-1), (None if s is None else s.reshape(-1)), torch.where(in_ep, ids, -1)

    # pass 1: episode counts, and per (row, episode) the surprise sum and the token count
    counts = torch.zeros(B, dtype=torch.int64, device=dev)
    sums = torch.zeros(n_slots, dtype=dtype, device=dev)
    sizes = torch.zeros(n_slots, dtype=torch.int64, device=dev)
    if T > 0:
        for r0 in range(0, B, step):
            r1 = min(B, r0 + step)
            slot, s, ids = token_chunk(r0, r1)
            counts[r0:r1] = ids.amax(dim=1) + 1
            if surprise_weighting:
                sums.index_add_(0, slot, s)
                sizes.index_add_(0, slot, torch.ones_like(slot))  # (bincount would sync on CUDA)

    # process rewards -> normalized -> discounted returns -> normalized again, all [B, K]
    ks = torch.arange(K, device=dev)
    ep_valid = (ks[None, :] < counts[:, None]).reshape(-1)
    ep_seg = seg[:, None].expand(B, K).reshape(-1)
    r_tilde = episode_rewards.to(dtype).reshape(-1)
    if normalize_rewards:
        r_tilde = segmented_standardize(r_tilde, ep_seg, ep_valid, B, eps)
    else:  # as given; entries past a row's episode count are never read
        r_tilde = torch.where(ep_valid, r_tilde, zero)
    returns = r_tilde.reshape(B, K) @ discount_matrix(K, gamma, dtype, dev).T
    if normalize_returns:
        returns = segmented_standardize(returns.reshape(-1), ep_seg, ep_valid, B, eps).reshape(B, K)

    # Slots: one per (row, episode), one per row for completion tokens outside every episode, one
    # shared by all tokens outside the completion. Per slot, A_t = coef * s_t + const:
    #   episode with surprise sum S != 0: coef = eta R^ |e| / S, const = A_out
    #   surprise sum 0 (or no weighting): coef = 0, const = A_out + eta R^
    #   no episode: coef = 0, const = A_out;   outside the completion: coef = 0, const = 0
    # so the output pass is two gathers and one multiply-add per token.
    r_hat = torch.cat([returns, torch.zeros(B, 1, dtype=dtype, device=dev)], dim=1)
    base = a_out[:, None].expand(B, width)
    if surprise_weighting:
        total = sums[:-1].reshape(B, width)
        weighted = total != 0
        safe = torch.where(weighted, total, torch.ones_like(total))
        coef = torch.where(weighted, eta * r_hat * sizes[:-1].reshape(B, width).to(dtype) / safe, zero)
        const = torch.where(weighted, base, base + eta * r_hat)
        coef = torch.cat([coef.reshape(-1), zero.reshape(1)])
    else:
        const = base + eta * r_hat
    const = torch.cat([const.reshape(-1), zero.reshape(1)])

    # pass 2: the advantages
    out = torch.empty((B, T), dtype=dtype, device=dev)
    if T > 0:
        for r0 in range(0, B, step):
            r1 = min(B, r0 + step)
            slot, s, _ = token_chunk(r0, r1)
            value = const.index_select(0, slot)
            if surprise_weighting:
                value = value.addcmul_(coef.index_select(0, slot), s)
            out[r0:r1] = value.reshape(r1 - r0, T)
    return out
