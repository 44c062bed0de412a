"""The spec in code: plain, materializing, float64-capable PyTorch.

Every fast path in gccpo_kernels is tested against the functions here. They build full N x V
tensors on purpose (clarity over memory) and are never used by the trainer's hot path. Each section
follows one section of SPEC.md (docs/spec.md in this repository). Inputs are computed in float64
when they are float64 and in float32 otherwise, unless ``dtype`` says otherwise; tests pass
float64 copies to get the exact answer.
"""

from __future__ import annotations

import math

import torch

from ._logits import restrict_head
from ._vocab_parallel import local_answer_ids
from .divergences import divergence_entry

# ---------------------------------------------------------------------------------------------
# §1  Logits, log-probs and entropy
# ---------------------------------------------------------------------------------------------


def logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           temperature: float = 1.0, logit_scale: float = 1.0, softcap: float | None = None,
           dtype: torch.dtype | None = None) -> torch.Tensor:
    """z = c*tanh(u/c) (or u), u = s*(h W^T + b)/tau, as a full [..., V] tensor (differentiable)."""
    if dtype is None:
        dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    u = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        u = u + bias.to(dtype)
    u = u * (logit_scale / temperature)
    if softcap is not None:
        u = softcap * torch.tanh(u / softcap)
    return u


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                    bias: torch.Tensor | None = None, temperature: float = 1.0,
                    logit_scale: float = 1.0, softcap: float | None = None,
                    ignore_index: int = -100, dtype: torch.dtype | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """SPEC §1: (logp, entropy), each of targets' shape; ignored rows give 0 and no gradient."""
    z = logits(hidden, weight, bias, temperature=temperature, logit_scale=logit_scale,
               softcap=softcap, dtype=dtype)
    logprobs = torch.log_softmax(z, dim=-1)
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    logp = logprobs.gather(-1, safe_targets.unsqueeze(-1).long()).squeeze(-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    return torch.where(valid, logp, zero), torch.where(valid, entropy, zero)



def linear_logprobs_shard_stats(hidden: torch.Tensor, weight: torch.Tensor,
                                local_targets: torch.Tensor, *, bias: torch.Tensor | None = None,
                                temperature: float = 1.0, logit_scale: float = 1.0,
                                softcap: float | None = None, dtype: torch.dtype | None = None,
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SPEC §1 restricted to one vocabulary shard (``weight`` [V_local, D], rows of the full head):
    (target logit z_y, entropy of the softmax over the slice, lse over the slice), each [N],
    from the slice's materialized [N, V_local] logits. ``local_targets`` are relative to the
    slice; -1 (a token of another shard) gives z_y = 0. Not differentiable (values only): the
    gradient is :func:`linear_logprobs_shard_grads`."""
    with torch.no_grad():
        z = logits(hidden, weight, bias, temperature=temperature, logit_scale=logit_scale,
                   softcap=softcap, dtype=dtype)
        lse = torch.logsumexp(z, dim=-1)
        logprobs = z - lse[:, None]
        entropy = -(logprobs.exp() * logprobs).sum(-1)
        inside = (local_targets >= 0) & (local_targets < weight.shape[0])
        picked = z.gather(-1, torch.where(inside, local_targets, 0).long()[:, None]).squeeze(-1)
        z_target = torch.where(inside, picked, torch.zeros_like(picked))
    return z_target, entropy, lse


def linear_logprobs_shard_grads(hidden: torch.Tensor, weight: torch.Tensor,
                                local_targets: torch.Tensor, lse: torch.Tensor,
                                entropy: torch.Tensor, grad_logp: torch.Tensor | None,
                                grad_entropy: torch.Tensor | None, *,
                                bias: torch.Tensor | None = None, temperature: float = 1.0,
                                logit_scale: float = 1.0, softcap: float | None = None,
                                dtype: torch.dtype | None = None,
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """SPEC §1's backward on one vocabulary shard, from the rows' GLOBAL ``lse`` and ``entropy``
    (over the whole vocabulary): with p = exp(z - lse) and mu = lse - entropy = sum_v p_v z_v,
    g_z = g_logp (onehot - p) - g_ent p (z - mu) on the slice's columns (the one-hot only where
    the target is in the slice), chained through the logit transform by autograd. Returns (this
    shard's share of d hidden in the compute dtype, d weight slice, d bias slice or None); the
    full d hidden is the sum of every shard's share. The chain through the transform is a
    ``torch.func.vjp``, which also runs inside a custom op's body (where autograd does not record)."""
    if dtype is None:
        dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    inputs = [t.detach().to(dtype) for t in (hidden, weight, bias) if t is not None]

    def transform(h, w, b=None):
        return logits(h, w, b, temperature=temperature, logit_scale=logit_scale, softcap=softcap,
                      dtype=dtype)

    z, pullback = torch.func.vjp(transform, *inputs)
    zd = z.detach()
    p = torch.exp(zd - lse[:, None].to(zd.dtype))
    g = torch.zeros_like(zd)
    if grad_logp is not None:
        gl = grad_logp.to(zd.dtype)
        inside = (local_targets >= 0) & (local_targets < weight.shape[0])
        onehot = torch.zeros_like(zd)
        onehot.scatter_(1, torch.where(inside, local_targets, 0).long()[:, None],
                        inside.to(zd.dtype)[:, None])
        g = g + gl[:, None] * (onehot - p)
    if grad_entropy is not None:
        mu = (lse - entropy).to(zd.dtype)
        g = g - grad_entropy.to(zd.dtype)[:, None] * p * (zd - mu[:, None])
    grads = pullback(g)
    dh = grads[0]
    dw = grads[1].to(weight.dtype)
    db = None if bias is None else grads[2].to(bias.dtype)
    return dh, dw, db


# ---------------------------------------------------------------------------------------------
# §2  Token-level clipped policy loss
# ---------------------------------------------------------------------------------------------


#: surrogate name -> one row's policy term ``fn(r, lp, a, config) -> (loss, low, high, dual)``:
#: ``r`` the row's ratio, ``[n]`` (token level) or ``[1]`` (sequence level); ``lp`` ``[n]`` its
#: log-probs; ``a`` ``[n]`` or ``[1]`` (a per-sequence advantage); ``loss`` broadcastable to
#: ``[n]``; ``low`` / ``high`` / ``dual`` bool flags shaped like ``r * a`` (``dual`` None when the
#: surrogate has no dual bound). The float64 twins of gccpo_kernels.surrogates, written apart.
SURROGATES: dict = {}


def _surrogate(name: str):
    def register(fn):
        SURROGATES[name] = fn
        return fn

    return register


def _upper_eps(c) -> float:
    return c.eps_low if c.eps_high is None else c.eps_high


@_surrogate("clip")
def clip_row(r: torch.Tensor, lp: torch.Tensor, a: torch.Tensor, c):
    """PPO clip on one row: -min(min(r, delta) a, clip(r, 1 - eps_low, 1 + eps_high) a), then
    min(., c |a|) where a < 0 with a dual clip c."""
    eps_high = _upper_eps(c)
    r_cap = r if c.delta is None else torch.clamp(r, max=c.delta)
    r_clip = torch.clamp(r, 1 - c.eps_low, 1 + eps_high)
    loss = -torch.minimum(r_cap * a, r_clip * a)
    low = (r_cap < 1 - c.eps_low) & (a < 0)
    high = (r_cap > 1 + eps_high) & (a > 0)
    if c.dual_clip is None:
        return loss, low, high, None
    bound = c.dual_clip * a.abs()
    dual = (loss > bound) & (a < 0)
    return torch.where(a < 0, torch.minimum(loss, bound), loss), low, high, dual


@_surrogate("cispo")
def cispo_row(r: torch.Tensor, lp: torch.Tensor, a: torch.Tensor, c):
    """CISPO on one row (TRL): -stopgrad(min(r, eps_high)) * a * lp; clipped high where r > eps_high
    and a > 0."""
    cap = _upper_eps(c)
    weight = torch.clamp(r, max=cap).detach()
    high = (r > cap) & (a > 0)
    return -weight * a * lp, torch.zeros_like(high), high, None


def _row_ratio(diff: torch.Tensor, c) -> torch.Tensor:
    """One row's ratio from its log-ratios ``diff`` [n]: [n] per token, or [1] (the exp of the
    mean) per sequence; the log clamped to +-log_ratio_clamp when set."""
    if c.importance_sampling_level == "sequence":
        log_r = (diff.sum() / max(diff.numel(), 1)).reshape(1)
    else:
        log_r = diff
    if c.log_ratio_clamp is not None:
        log_r = torch.clamp(log_r, -c.log_ratio_clamp, c.log_ratio_clamp)
    return torch.exp(log_r)


def _row_kl(lp: torch.Tensor, ref: torch.Tensor, r: torch.Tensor, c) -> torch.Tensor:
    """One row's k3 KL to the reference, clamped as configured, times r with the bias correction."""
    x = ref - lp
    if c.kl_log_ratio_clamp is not None:
        x = torch.clamp(x, -c.kl_log_ratio_clamp, c.kl_log_ratio_clamp)
    kl = torch.exp(x) - x - 1
    if c.kl_value_clamp is not None:
        kl = torch.clamp(kl, -c.kl_value_clamp, c.kl_value_clamp)
    return kl * r if c.kl_bias_correction else kl


def _aggregate_rows(terms: list, sizes: list, mode: str, norm, c, horizon: int, dtype) -> torch.Tensor:
    """SPEC §2's aggregation of per-row term vectors (row b holds ``sizes[b]`` tokens)."""
    sums = [t.sum() if t.numel() else torch.zeros((), dtype=dtype) for t in terms]
    total = torch.stack(sums).sum() if sums else torch.zeros((), dtype=dtype)
    n_tokens = sum(sizes)
    rows = sum(1 for n in sizes if n > 0) if c.skip_empty_rows else len(sizes)
    # an empty batch (B = 0 or T = 0) sums to 0: loss 0, never 0 / 0
    rows = max(rows, 1)
    if mode == "token-sum":
        return total
    if mode == "token-mean":
        return total / (max(n_tokens, 1) if norm is None else norm)
    if mode == "seq-mean-token-mean":
        means = [s / max(n, 1) for s, n in zip(sums, sizes)]
        means = torch.stack(means).sum() if means else torch.zeros((), dtype=dtype)
        return means / (rows if norm is None else norm)
    if mode == "seq-mean-token-sum":
        return total / (rows if norm is None else norm)
    assert mode == "seq-mean-token-sum-norm", mode
    length = max(horizon, 1) if c.max_len is None else c.max_len
    return total / ((rows * length if c.sum_norm_rows else length) if norm is None else norm)


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor | None, advantages: torch.Tensor,
                mask: torch.Tensor, config, *, ref_logp: torch.Tensor | None = None,
                entropy: torch.Tensor | None = None, is_weights: torch.Tensor | None = None,
                normalizer: float | None = None, loss_scale: float = 1.0,
                ) -> tuple[torch.Tensor, dict[str, float]]:
    """SPEC §2, one row at a time (differentiable; float64 for float64 inputs).

    ``config`` is read by attribute (a gccpo_kernels.policy_loss.PolicyLossConfig or any object
    with the same fields; no ``surrogate`` field means ``"clip"``); the policy term is
    :data:`SURROGATES` ``[config.surrogate]``. Returns (loss, metrics) with metrics as plain
    floats (the global means and the ratio maximum). A flag or ratio of one value per row (a
    sequence-level ratio with a per-sequence advantage) counts once per row, every row included;
    a row without tokens has advantage 0 there.
    """
    c = config
    row_surrogate = SURROGATES[getattr(c, "surrogate", "clip")]
    dtype = torch.float64 if logp.dtype == torch.float64 else torch.float32
    n_rows, horizon = logp.shape
    keep = mask.bool() if mask.dtype == torch.bool else mask != 0
    adv_all = advantages.to(dtype)
    w_all = None if is_weights is None else is_weights.to(dtype)
    row_terms, ent_terms, row_sizes = [], [], []
    stats = {k: [0.0, 0.0] for k in ("low", "high", "region", "dual", "k1", "kl", "ent", "ratio")}
    ratio_max = -math.inf

    def add(key, values):
        stats[key][0] += float(values.to(dtype).sum())
        stats[key][1] += values.numel()

    for b in range(n_rows):
        idx = keep[b].nonzero().flatten()
        n = idx.numel()
        row_sizes.append(n)
        lp = logp[b, idx].to(dtype)
        old = lp.detach() if old_logp is None else old_logp[b, idx].to(dtype)
        a = adv_all[b].reshape(-1)
        a = (a if n else torch.zeros_like(a)) if a.numel() == 1 else a[idx]  # [1] per sequence, or [n]
        diff = lp - old
        r = _row_ratio(diff, c)
        loss, low, high, dual = row_surrogate(r, lp, a, c)
        term = loss.expand(n)
        if w_all is not None:
            w = w_all[b].reshape(-1)
            term = term * (w.expand(n) if w.numel() == 1 else w[idx])
        kl = None if ref_logp is None else _row_kl(lp, ref_logp[b, idx].to(dtype), r, c)
        if kl is not None and c.beta != 0:
            term = term + c.beta * kl
        ent = None if entropy is None else entropy[b, idx].to(dtype)
        if c.entropy_coef != 0 and c.entropy_agg is None:
            term = term - c.entropy_coef * ent
        row_terms.append(term)
        ent_terms.append(ent)
        with torch.no_grad():
            add("ratio", r)
            if r.numel():
                ratio_max = max(ratio_max, float(r.max()))
            add("low", low)
            add("high", high)
            add("region", low | high)
            if dual is not None:
                add("dual", dual)
            k1 = -diff
            if c.log_ratio_clamp is not None:
                k1 = torch.clamp(k1, -c.log_ratio_clamp, c.log_ratio_clamp)
            add("k1", k1)
            if kl is not None:
                add("kl", kl)
            if ent is not None:
                add("ent", ent)

    loss = _aggregate_rows(row_terms, row_sizes, c.loss_agg, normalizer, c, horizon, dtype)
    if c.entropy_coef != 0 and c.entropy_agg is not None:
        loss = loss - c.entropy_coef * _aggregate_rows(ent_terms, row_sizes, c.entropy_agg, None, c, horizon, dtype)
    loss = loss * loss_scale

    def mean(key):
        s, k = stats[key]
        return s / max(k, 1.0)

    metrics = {"clip_frac_low": mean("low"), "clip_frac_high": mean("high"),
               "clip_frac_region": mean("region"), "approx_kl": mean("k1"),
               "ratio_mean": mean("ratio"), "ratio_max": ratio_max if ratio_max > -math.inf else math.nan}
    if c.dual_clip is not None:
        metrics["clip_frac_dual"] = mean("dual")
    if ref_logp is not None:
        metrics["kl_ref"] = mean("kl")
    if entropy is not None:
        metrics["entropy"] = mean("ent")
    return loss, metrics


# ---------------------------------------------------------------------------------------------
# §3  Counterfactual divergence
# ---------------------------------------------------------------------------------------------


def counterfactual_divergence(hidden: torch.Tensor, weight: torch.Tensor, deltas: torch.Tensor, *,
                              bias: torch.Tensor | None = None, temperature: float = 1.0,
                              logit_scale: float = 1.0, softcap: float | None = None,
                              kind: str = "kl", answer_token_ids: torch.Tensor | None = None,
                              dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """SPEC §3: D(q(.|h) || q(.|h + delta_m)) for hidden [R, D], deltas [R, M, D] -> [R, M].

    Textbook forms on full [R, M, V] tensors, computed in ``dtype`` (float64 by default, where the
    textbook forms are accurate to ~1e-15 for logits of size ~10). The perturbed latent h + delta is
    formed in ``dtype`` (exact for 16-bit inputs), never rounded to the input dtype.
    ``answer_token_ids`` restricts the vocabulary to those ids and renormalizes over them.
    ``kind`` names an entry of :data:`gccpo_kernels.divergences.DIVERGENCES`: its ``reference``
    formula (KL: sum q (log q - log q~); JS: the mixture form; TV: sum |q - q~| / 2).
    """
    formula = divergence_entry(kind).reference
    if answer_token_ids is not None:
        weight = weight.index_select(0, answer_token_ids.long())
        bias = None if bias is None else bias.index_select(0, answer_token_ids.long())
    kw = dict(temperature=temperature, logit_scale=logit_scale, softcap=softcap, dtype=dtype)
    z = logits(hidden, weight, bias, **kw)                                   # [R, V]
    z_pert = logits(hidden.to(dtype).unsqueeze(1) + deltas.to(dtype), weight, bias, **kw)  # [R, M, V]
    lq = torch.log_softmax(z, dim=-1).unsqueeze(1)
    lq_pert = torch.log_softmax(z_pert, dim=-1)
    return formula(lq, lq_pert)


def counterfactual_divergence_sharded(hidden: torch.Tensor, weight: torch.Tensor,
                                      deltas: torch.Tensor, shard, *, bias: torch.Tensor | None = None,
                                      temperature: float = 1.0, logit_scale: float = 1.0,
                                      softcap: float | None = None, kind: str = "kl",
                                      answer_token_ids: torch.Tensor | None = None,
                                      dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """SPEC §3 with the vocabulary split over ranks: ``shard`` is this rank's
    ``_vocab_parallel.VocabShard``, ``weight`` / ``bias`` its slice, ``answer_token_ids`` global ids.

    The textbook forms of :func:`counterfactual_divergence` on this rank's [R, M, V_local] slice:
    log q and log q~ are normalized by the global log-sum-exps (``shard.logsumexp``), each rank
    sums the divergence's terms over its own tokens, and the shares are summed over ranks
    (``shard.all_reduce``; every registered divergence is a sum over tokens). Returns [R, M] in
    ``dtype``, the same on every rank.
    """
    formula = divergence_entry(kind).reference
    # this rank's rows of the answer ids (global ids; possibly none)
    weight, bias = restrict_head(weight, bias, local_answer_ids(shard, answer_token_ids))
    kw = dict(temperature=temperature, logit_scale=logit_scale, softcap=softcap, dtype=dtype)
    z = logits(hidden, weight, bias, **kw)                                   # [R, V_local]
    z_pert = logits(hidden.to(dtype).unsqueeze(1) + deltas.to(dtype), weight, bias, **kw)
    lq = (z - shard.logsumexp(torch.logsumexp(z, dim=-1)).unsqueeze(-1)).unsqueeze(1)
    lq_pert = z_pert - shard.logsumexp(torch.logsumexp(z_pert, dim=-1)).unsqueeze(-1)
    return shard.all_reduce(formula(lq, lq_pert))


# ---------------------------------------------------------------------------------------------
# §4  Group-wise answer-distribution statistics
# ---------------------------------------------------------------------------------------------


def group_distribution_stats(hidden: torch.Tensor, weight: torch.Tensor, group_ids: torch.Tensor,
                             num_groups: int, *, bias: torch.Tensor | None = None,
                             temperature: float = 1.0, logit_scale: float = 1.0,
                             softcap: float | None = None,
                             answer_token_ids: torch.Tensor | None = None,
                             dtype: torch.dtype = torch.float64,
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """SPEC §4 for hidden [R, D] and group ids [R] in [0, num_groups), any order.

    Returns (row_entropy [R], row_kl_to_mixture [R], group_mixture_entropy [G],
    group_mean_entropy [G], group_js [G]) in ``dtype``, with group_js = H(mixture) - mean H(q_i) as
    the spec writes it. A group of one member gets KL = JS = 0; an empty group gets zeros.
    """
    if answer_token_ids is not None:
        weight = weight.index_select(0, answer_token_ids.long())
        bias = None if bias is None else bias.index_select(0, answer_token_ids.long())
    z = logits(hidden, weight, bias, temperature=temperature, logit_scale=logit_scale,
               softcap=softcap, dtype=dtype)
    lq = torch.log_softmax(z, dim=-1)
    q = lq.exp()
    row_entropy = -(q * lq).sum(-1)
    row_kl = torch.zeros_like(row_entropy)
    mix_entropy = torch.zeros(num_groups, dtype=dtype, device=z.device)
    mean_entropy = torch.zeros_like(mix_entropy)
    js = torch.zeros_like(mix_entropy)
    for g in range(num_groups):
        members = (group_ids == g).nonzero().squeeze(1)
        if members.numel() == 0:
            continue
        qbar = q.index_select(0, members).mean(0)
        mix_entropy[g] = -torch.special.xlogy(qbar, qbar).sum()
        mean_entropy[g] = row_entropy.index_select(0, members).mean()
        if members.numel() > 1:
            lqbar = torch.log(qbar)
            row_kl[members] = (q[members] * (lq[members] - lqbar)).sum(-1)
            js[g] = mix_entropy[g] - mean_entropy[g]
    return row_entropy, row_kl, mix_entropy, mean_entropy, js


def group_distribution_stats_sharded(hidden: torch.Tensor, weight: torch.Tensor,
                                     group_ids: torch.Tensor, num_groups: int, shard, *,
                                     bias: torch.Tensor | None = None, temperature: float = 1.0,
                                     logit_scale: float = 1.0, softcap: float | None = None,
                                     answer_token_ids: torch.Tensor | None = None,
                                     dtype: torch.dtype = torch.float64,
                                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """SPEC §4 with the vocabulary split over ranks (``shard``: this rank's
    ``_vocab_parallel.VocabShard``; ``weight`` / ``bias`` its slice; ``answer_token_ids`` global).

    As :func:`group_distribution_stats` on this rank's [R, V_local] slice: q is normalized by the
    global log-sum-exp (``shard.logsumexp``); the mixture q_bar_g of a token is the mean of its
    members' q of that token, so each rank holds the mixture of its own tokens; every sum over
    the vocabulary (entropies, KL to the mixture) is this rank's share, summed over ranks
    (``shard.all_reduce``). Same outputs as the unsharded reference, the same on every rank.
    """
    # this rank's rows of the answer ids (global ids; possibly none)
    weight, bias = restrict_head(weight, bias, local_answer_ids(shard, answer_token_ids))
    z = logits(hidden, weight, bias, temperature=temperature, logit_scale=logit_scale,
               softcap=softcap, dtype=dtype)
    lq = z - shard.logsumexp(torch.logsumexp(z, dim=-1)).unsqueeze(-1)
    q = lq.exp()
    row_entropy = shard.all_reduce(-(q * lq).sum(-1))
    row_kl = torch.zeros_like(row_entropy)
    mix_entropy = torch.zeros(num_groups, dtype=dtype, device=z.device)
    mean_entropy = torch.zeros_like(mix_entropy)
    js = torch.zeros_like(mix_entropy)
    sizes = [int((group_ids == g).sum()) for g in range(num_groups)]
    for g in range(num_groups):
        members = (group_ids == g).nonzero().squeeze(1)
        if sizes[g] == 0:
            continue
        qbar = q.index_select(0, members).mean(0)
        mix_entropy[g] = -torch.special.xlogy(qbar, qbar).sum()
        if sizes[g] > 1:
            row_kl[members] = (q[members] * (lq[members] - torch.log(qbar))).sum(-1)
    row_kl = shard.all_reduce(row_kl)
    mix_entropy = shard.all_reduce(mix_entropy)
    for g in range(num_groups):
        if sizes[g] > 0:
            mean_entropy[g] = row_entropy[group_ids == g].mean()
        if sizes[g] > 1:
            js[g] = mix_entropy[g] - mean_entropy[g]
    return row_entropy, row_kl, mix_entropy, mean_entropy, js


# ---------------------------------------------------------------------------------------------
# §5-§6  Episode rewards and token advantages
# ---------------------------------------------------------------------------------------------


def episode_rewards(robustness: torch.Tensor, effectiveness: torch.Tensor, *, w_rob: float = 0.9,
                    w_eff: float = 0.8, dtype: torch.dtype | None = None) -> torch.Tensor:
    """SPEC §5: r = w_rob * R_rob + w_eff * R_eff, elementwise on [B, K]."""
    if dtype is None:
        wide = torch.float64 in (robustness.dtype, effectiveness.dtype)
        dtype = torch.float64 if wide else torch.float32
    return w_rob * robustness.to(dtype) + w_eff * effectiveness.to(dtype)


def _standardize_list(values: list[float], eps: float, std: float | None = None,
                      divide: bool = True) -> list[float]:
    """(v - mean) / (std + eps) with the sample std (n - 1; 0 for one value); all-equal -> zeros.
    ``std`` replaces the list's own std (the batch std of scale="batch"); divide=False: v - mean."""
    n = len(values)
    if n == 0 or all(v == values[0] for v in values):
        return [0.0] * n
    mean = sum(values) / n
    if not divide:
        return [v - mean for v in values]
    if std is None:
        std = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else 0.0
    return [(v - mean) / (std + eps) for v in values]


def token_advantages(outcome_rewards: torch.Tensor, group_index: torch.Tensor,
                     episode_ids: torch.Tensor, episode_rewards: torch.Tensor,
                     old_logp: torch.Tensor | None, mask: torch.Tensor, *, eta: float = 1.0,
                     gamma: float = 1.0, scale: str = "group", surprise_weighting: bool = True,
                     normalize_returns: bool = True, eps: float = 1e-4,
                     dtype: torch.dtype | None = None, normalize_rewards: bool = True) -> torch.Tensor:
    """SPEC §6 with plain Python loops over groups, completions, episodes and tokens (float64).

    Token t of row i is in the completion when mask[i, t] != 0, and in episode k when it is in the
    completion and episode_ids[i, t] == k >= 0. A row's episode count is 1 + its largest episode id
    (0 without one); episode_rewards[i, k] for k >= count is never read. Tokens outside the
    completion get 0; completion tokens without an episode get the outcome advantage alone.
    """
    if dtype is None:
        floats = [outcome_rewards.dtype, episode_rewards.dtype]
        if old_logp is not None:
            floats.append(old_logp.dtype)
        dtype = torch.float64 if torch.float64 in floats else torch.float32
    B, T = episode_ids.shape
    r_out = [float(x) for x in outcome_rewards.detach().double().cpu().tolist()]
    groups_of = [int(g) for g in group_index.cpu().tolist()]
    ids = episode_ids.cpu().tolist()
    inside = (mask.cpu() != 0).tolist()
    logp = old_logp.detach().double().cpu().tolist() if old_logp is not None else None

    # episodes: the token positions of each episode of each row
    episodes: list[list[list[int]]] = []
    for i in range(B):
        tokens = [t for t in range(T) if inside[i][t] and ids[i][t] >= 0]
        count = 1 + max(ids[i][t] for t in tokens) if tokens else 0
        episodes.append([[t for t in tokens if ids[i][t] == k] for k in range(count)])
    rewards = [[float(episode_rewards[i, k]) for k in range(len(episodes[i]))] for i in range(B)]

    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups_of):
        members.setdefault(g, []).append(i)

    # outcome advantage per row
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    batch_std = None
    if scale == "batch":
        mean_all = sum(r_out) / B if B else 0.0
        batch_std = (sum((v - mean_all) ** 2 for v in r_out) / (B - 1)) ** 0.5 if B > 1 else 0.0
    a_out = [0.0] * B
    for rows in members.values():
        advantages = _standardize_list([r_out[i] for i in rows], eps, batch_std, scale != "none")
        for i, a in zip(rows, advantages):
            a_out[i] = a

    # process advantage per (row, episode): normalize, discounted returns, normalize again
    returns: list[list[float]] = [[0.0] * len(episodes[i]) for i in range(B)]
    for rows in members.values():
        keys = [(i, k) for i in rows for k in range(len(episodes[i]))]
        values = [rewards[i][k] for i, k in keys]
        normed = dict(zip(keys, _standardize_list(values, eps) if normalize_rewards else values))
        ret = {}
        for i, k in keys:
            ret[(i, k)] = sum(gamma ** (k2 - k) * normed[(i, k2)] for k2 in range(k, len(episodes[i])))
        values = [ret[key] for key in keys]
        if normalize_returns:
            values = _standardize_list(values, eps)
        for (i, k), v in zip(keys, values):
            returns[i][k] = v

    out = [[0.0] * T for _ in range(B)]
    for i in range(B):
        for t in range(T):
            if inside[i][t]:
                out[i][t] = a_out[i]
        for k, positions in enumerate(episodes[i]):
            surprise = {t: -logp[i][t] for t in positions} if surprise_weighting else {}
            total = sum(surprise.values())
            for t in positions:
                if not surprise_weighting or total == 0:
                    omega = 1.0
                else:
                    omega = len(positions) * surprise[t] / total
                out[i][t] = a_out[i] + eta * omega * returns[i][k]
    return torch.tensor(out, dtype=torch.float64).reshape(B, T).to(dtype)
