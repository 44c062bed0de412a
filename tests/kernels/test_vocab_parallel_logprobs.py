"""Vocabulary parallelism for SPEC §1 and §2 (``process_group=``): every rank holds all tokens'
hidden rows and a contiguous slice of the LM head; outputs and gradients must equal the
unsharded computation.

Each world size is one spawn of gloo CPU processes (imports cost ~10 s per spawn here), and the
worker loops over layouts, options and backends, asserting inside the ranks (a failing rank
fails the spawn with its traceback). The truth is the unsharded float64 reference with autograd.

Besides the values, the workers check: N = 0 and every row ignored; validate=False with
targets outside [0, V) (the same clamped behaviour as unsharded); that no collective carries more
than N x max(D, 3) values (+ 3P for the first one): nothing of size N x V_local; and that a rank
whose own arguments fail (a wrong bias shape), or ranks that resolve different backends, make
every rank raise instead of leaving the others in a collective. Every spawn has a deadline
(:func:`tests._gloo.run_gloo`), so a deadlock fails the test instead of hanging it.

Tolerances say what they are for:
- reference and torch backends in float64: rounding only (1e-10 absolute on O(1..10) values,
  1e-10 relative to the largest gradient entry).
- triton (float32, interpreter): the logits carry ~1e-7 relative error per product summed over
  D, as in tests/kernels/test_linear_logprobs.py: log-probs and entropy at 5e-5 absolute,
  gradients at 1e-4 relative to their largest entry.
"""

from __future__ import annotations

import pytest
import torch

from tests._gloo import CollectiveSizes, run_gloo
from tests.conftest import available_backends

V = 203  # not divisible by 2 or 4, and not a multiple of any block
N, D = 19, 24
BACKENDS = available_backends()  # triton (interpreter) first when importable

# slice sizes per rank (sum V): uneven, an empty slice, a slice that holds no target
LAYOUTS = {
    2: [dict(sizes=[120, 83], avoid=None)],
    4: [dict(sizes=[50, 51, 60, 42], avoid=1),  # rank 1's slice holds none of the targets
        dict(sizes=[70, 0, 90, 43], avoid=None)],  # rank 1 holds no vocabulary at all
}
OPTIONS = [
    dict(),
    dict(bias=True, temperature=0.7, logit_scale=1.3, softcap=5.0),
]


def _tol(backend: str) -> tuple[float, float, torch.dtype]:
    """(absolute forward tolerance, gradient tolerance relative to the max, dtype)."""
    if backend == "triton":
        return 5e-5, 1e-4, torch.float32
    return 1e-10, 1e-10, torch.float64


def _close(what: str, got: torch.Tensor, want: torch.Tensor, tol: float, *, rel: bool = False) -> None:
    got, want = got.detach().double(), want.detach().double()
    if got.shape != want.shape:
        raise AssertionError(f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}")
    if want.numel() == 0:
        return
    err = (got - want).abs().max().item()
    if rel:
        err /= max(want.abs().max().item(), 1e-30)
    if not err <= tol:
        raise AssertionError(f"{what}: error {err:.3g} > {tol:g}{' (relative)' if rel else ''}")


def _same_on_every_rank(what: str, t: torch.Tensor) -> None:
    """Bit-identical on every rank (the combine runs in rank order on exact gathered values)."""
    import torch.distributed as dist

    t = t.detach().contiguous()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    if not all(torch.equal(p, parts[0]) for p in parts):
        raise AssertionError(f"{what} differs between ranks")


def _inputs(seed: int, avoid: tuple[int, int] | None):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g, dtype=torch.float64)
    w = torch.randn(V, D, generator=g, dtype=torch.float64) * 2.0 / D ** 0.5
    b = 0.3 * torch.randn(V, generator=g, dtype=torch.float64)
    y = torch.randint(0, V, (N,), generator=g)
    if avoid is not None:  # move targets out of [lo, hi)
        lo, hi = avoid
        y = torch.where((y >= lo) & (y < hi), (y + (hi - lo)) % V, y)
        y = torch.where((y >= lo) & (y < hi), torch.zeros_like(y), y)
    y[[2, 11]] = -100  # ignored rows
    y[5] = V - 1  # the last global id
    gl = torch.randn(N, generator=g, dtype=torch.float64)
    ge = torch.randn(N, generator=g, dtype=torch.float64)
    return h, w, b, y, gl, ge


def _check_logprobs(rank: int, sizes: list[int], avoid: int | None, seed: int) -> None:
    from gccpo_kernels import FusedLinearLogprobs, fused_linear_logprobs
    from gccpo_kernels import reference as ref

    offset = sum(sizes[:rank])
    sl = slice(offset, offset + sizes[rank])
    span = None if avoid is None else (sum(sizes[:avoid]), sum(sizes[: avoid + 1]))
    h, w, b, y, gl, ge = _inputs(seed, span)
    if span is not None and rank == avoid:
        assert not bool(((y >= sl.start) & (y < sl.stop)).any())
    for opts in OPTIONS:
        kw = {k: v for k, v in opts.items() if k != "bias"}
        use_bias = opts.get("bias", False)
        # the truth: unsharded float64 reference, autograd
        h0 = h.clone().requires_grad_()
        w0 = w.clone().requires_grad_()
        b0 = b.clone().requires_grad_() if use_bias else None
        lp0, en0 = ref.linear_logprobs(h0, w0, y, bias=b0, **kw)
        leaves0 = [t for t in (h0, w0, b0) if t is not None]
        full = torch.autograd.grad((lp0 * gl).sum() + (en0 * ge).sum(), leaves0, retain_graph=True)
        only_ent = torch.autograd.grad((en0 * ge).sum(), leaves0, retain_graph=True)
        only_logp = torch.autograd.grad((lp0 * gl).sum(), leaves0)
        for backend in BACKENDS:
            ftol, gtol, dt = _tol(backend)
            tag = f"rank {rank} sizes {sizes} {backend} {opts}"
            hs = h.to(dt).requires_grad_()
            ws = w[sl].to(dt).clone().requires_grad_()
            bs = b[sl].to(dt).clone().requires_grad_() if use_bias else None
            leaves = [t for t in (hs, ws, bs) if t is not None]
            lp, en = fused_linear_logprobs(hs, ws, y, bias=bs, return_entropy=True,
                                           backend=backend, process_group=True, **kw)
            _close(f"{tag} logp", lp, lp0, ftol)
            _close(f"{tag} entropy", en, en0, ftol)
            ignored = y == -100
            assert bool((lp[ignored] == 0).all() and (en[ignored] == 0).all()), tag
            _same_on_every_rank(f"{tag} logp", lp)
            _same_on_every_rank(f"{tag} entropy", en)
            for name, want, loss in (
                    ("grad", full, (lp.double() * gl).sum() + (en.double() * ge).sum()),
                    ("entropy-only grad", only_ent, (en.double() * ge).sum())):
                got = torch.autograd.grad(loss, leaves, retain_graph=True)
                _close(f"{tag} {name} dh (full, on every rank)", got[0], want[0], gtol, rel=True)
                _same_on_every_rank(f"{tag} {name} dh", got[0])
                _close(f"{tag} {name} dW slice", got[1], want[1][sl], gtol, rel=True)
                if use_bias:
                    _close(f"{tag} {name} db slice", got[2], want[2][sl], gtol, rel=True)
                assert bool((got[0][ignored] == 0).all()), f"{tag}: ignored rows got a gradient"
            # logp only (the entropy's backward work is skipped), through the module form
            module = FusedLinearLogprobs(backend=backend, process_group=True, **kw)
            lp2, en2 = module(hs, ws, y, bias=bs)
            assert en2 is None
            got = torch.autograd.grad((lp2.double() * gl).sum(), leaves)
            _close(f"{tag} logp-only dh", got[0], only_logp[0], gtol, rel=True)
            _close(f"{tag} logp-only dW slice", got[1], only_logp[1][sl], gtol, rel=True)
            if use_bias:
                _close(f"{tag} logp-only db slice", got[2], only_logp[2][sl], gtol, rel=True)


def _check_policy_loss(rank: int, sizes: list[int]) -> None:
    from gccpo_kernels import FusedLinearPolicyLoss, PolicyLossConfig, fused_linear_policy_loss

    offset = sum(sizes[:rank])
    sl = slice(offset, offset + sizes[rank])
    g = torch.Generator().manual_seed(7)
    bsz, t = 3, 7
    h = torch.randn(bsz, t, D, generator=g, dtype=torch.float64)
    w = torch.randn(V, D, generator=g, dtype=torch.float64) * 2.0 / D ** 0.5
    b = 0.3 * torch.randn(V, generator=g, dtype=torch.float64)
    y = torch.randint(0, V, (bsz, t), generator=g)
    mask = torch.rand(bsz, t, generator=g) > 0.25
    mask[0, 0] = True
    adv = torch.randn(bsz, generator=g, dtype=torch.float64)
    cfg = PolicyLossConfig(beta=0.05, entropy_coef=0.01, loss_agg="seq-mean-token-mean")
    kw = dict(temperature=0.9, logit_scale=1.1, softcap=8.0)
    # old and reference log-probs near the current ones, as in training (ratios near 1, some clipped)
    with torch.no_grad():
        lp = fused_linear_policy_loss(h, w, y, adv, mask, bias=b, backend="reference", **kw).logp
    old = lp + 0.2 * torch.randn(bsz, t, generator=g, dtype=torch.float64)
    refl = lp + 0.2 * torch.randn(bsz, t, generator=g, dtype=torch.float64)

    h0, w0, b0 = (x.clone().requires_grad_() for x in (h, w, b))
    out0 = fused_linear_policy_loss(h0, w0, y, adv, mask, old_logp=old, ref_logp=refl, bias=b0,
                                    config=cfg, backend="reference", **kw)
    want = torch.autograd.grad(out0.loss, (h0, w0, b0))
    for backend in BACKENDS:
        ftol, gtol, dt = _tol(backend)
        tag = f"policy loss rank {rank} sizes {sizes} {backend}"
        hs = h.to(dt).requires_grad_()
        ws = w[sl].to(dt).clone().requires_grad_()
        bs = b[sl].to(dt).clone().requires_grad_()
        loss_fn = FusedLinearPolicyLoss(cfg, backend=backend, process_group=True, **kw)
        out = loss_fn(hs, ws, y, adv.to(dt), mask, old_logp=old.to(dt), ref_logp=refl.to(dt), bias=bs)
        _close(f"{tag} loss", out.loss, out0.loss, ftol)
        _close(f"{tag} logp", out.logp, out0.logp, ftol)
        _close(f"{tag} entropy", out.entropy, out0.entropy, ftol)
        for k in out0.metrics:  # (sum, count) pairs: sums over <= 21 tokens of values within ftol
            _close(f"{tag} metric {k}", out.metrics[k], out0.metrics[k], 21 * ftol if backend == "triton" else 1e-9)
        got = torch.autograd.grad(out.loss, (hs, ws, bs))
        _close(f"{tag} dh", got[0], want[0], gtol, rel=True)
        _close(f"{tag} dW slice", got[1], want[1][sl], gtol, rel=True)
        _close(f"{tag} db slice", got[2], want[2][sl], gtol, rel=True)
        _same_on_every_rank(f"{tag} loss", out.loss)
        _same_on_every_rank(f"{tag} dh", got[0])
    # the function form, once
    out = fused_linear_policy_loss(h, w[sl].clone(), y, adv, mask, old_logp=old, ref_logp=refl,
                                   bias=b[sl].clone(), config=cfg, backend="torch",
                                   process_group=True, **kw)
    _close(f"policy loss rank {rank} function form", out.loss, out0.loss, 1e-10)


def _check_validation(rank: int, sizes: list[int]) -> None:
    from gccpo_kernels import fused_linear_logprobs

    offset = sum(sizes[:rank])
    h = torch.randn(4, D, dtype=torch.float64)
    ws = torch.randn(V, D, dtype=torch.float64)[offset: offset + sizes[rank]].clone()
    for bad in (V, -3):  # out of the GLOBAL range (V would be a valid id of no slice)
        y = torch.tensor([0, bad, 1, 2])
        with pytest.raises(ValueError, match=rf"outside \[0, {V}\)"):
            fused_linear_logprobs(h, ws, y, backend="torch", process_group=True)
    # a global id beyond this rank's slice but inside [0, V) is fine
    y = torch.tensor([V - 1, 0, -100, V // 2])
    fused_linear_logprobs(h, ws, y, backend="torch", process_group=True)


def _check_edge_rows(rank: int, sizes: list[int]) -> None:
    """N = 0, every row ignored, and (validate=False) targets outside [0, V): the same outputs
    and gradients as the unsharded op of the same backend (the reference backend's unsharded
    op cannot index an out-of-range target: the torch backend in float64 stands in)."""
    from gccpo_kernels import fused_linear_logprobs

    offset = sum(sizes[:rank])
    sl = slice(offset, offset + sizes[rank])
    g = torch.Generator().manual_seed(5)
    h = torch.randn(6, D, generator=g, dtype=torch.float64)
    w = torch.randn(V, D, generator=g, dtype=torch.float64) * 2.0 / D ** 0.5
    wild = torch.tensor([V, -3, 2 ** 32 + 5, 1, -100, V - 1])  # -100 is ignore_index
    for backend in BACKENDS:
        ftol, gtol, dt = _tol(backend)
        tag = f"rank {rank} sizes {sizes} {backend}"
        for rows, y in ((0, torch.zeros(0, dtype=torch.long)), (4, torch.full((4,), -100))):
            hs = h[:rows].to(dt).requires_grad_()
            ws = w[sl].to(dt).clone().requires_grad_()
            lp, en = fused_linear_logprobs(hs, ws, y, return_entropy=True, backend=backend,
                                           process_group=True)
            assert lp.shape == en.shape == (rows,) and not bool(lp.any() or en.any()), tag
            dh, dw = torch.autograd.grad(lp.sum() + en.sum(), (hs, ws))
            assert dh.shape == (rows, D) and not bool(dh.any() or dw.any()), f"{tag} N={rows}"
        unsharded = "torch" if backend == "reference" else backend
        outs = []
        for weight in (w.to(dt), w[sl].to(dt)):
            hs = h.to(dt).requires_grad_()
            ws = weight.clone().requires_grad_()
            lp, en = fused_linear_logprobs(
                hs, ws, wild, return_entropy=True, validate=False,
                backend=unsharded if weight.shape[0] == V else backend,
                process_group=None if weight.shape[0] == V else True)
            outs.append((lp, en, *torch.autograd.grad((lp * 0.7).sum() + (en * 0.3).sum(), (hs, ws))))
        (lp0, en0, dh0, dw0), (lp1, en1, dh1, dw1) = outs
        _close(f"{tag} out-of-range logp", lp1, lp0, ftol)
        _close(f"{tag} out-of-range entropy", en1, en0, ftol)
        _close(f"{tag} out-of-range dh", dh1, dh0, gtol, rel=True)
        _close(f"{tag} out-of-range dW slice", dw1, dw0[sl], gtol, rel=True)


def _check_failures(rank: int, world: int, sizes: list[int]) -> None:
    """A rank whose own arguments fail makes every rank raise (its own error there, "rank k
    failed its input checks" elsewhere), and ranks that resolve different backends all raise;
    afterwards the group still works (no rank was left inside a collective)."""
    from gccpo_kernels import fused_linear_logprobs

    offset = sum(sizes[:rank])
    h = torch.randn(5, D, dtype=torch.float64)
    w = torch.randn(V, D, dtype=torch.float64)[offset: offset + sizes[rank]].clone()
    y = torch.tensor([0, V - 1, 3, -100, 7])
    bad = world - 1
    bias = torch.zeros(sizes[rank] + (rank == bad), dtype=torch.float64)
    match = (r"bias must be \[V\]" if rank == bad
             else rf"rank {bad} of the process group failed its input checks")
    with pytest.raises(ValueError, match=match):
        fused_linear_logprobs(h, w, y, bias=bias, backend="torch", process_group=True)
    with pytest.raises(ValueError, match="different kernel backends"):
        fused_linear_logprobs(h, w, y, backend="reference" if rank == 0 else "torch",
                              process_group=True)
    lp, _ = fused_linear_logprobs(h, w, y, backend="torch", process_group=True)
    _same_on_every_rank(f"rank {rank} logp after the failures", lp)


def _worker(rank: int, world: int) -> None:
    # every collective of the ops (and of this test's own gathers of N x D gradients) is at most
    # N x max(D, 3) values (the d hidden all-reduce; the 3N forward gather), + 3P for the first
    rows = max(N, 3 * 7)  # the policy loss's B x T
    with CollectiveSizes() as sizes_seen:
        for i, layout in enumerate(LAYOUTS[world]):
            _check_logprobs(rank, layout["sizes"], layout["avoid"], seed=world * 10 + i)
        _check_policy_loss(rank, LAYOUTS[world][0]["sizes"])
    sizes_seen.check(rows * max(D, 3) + 3 * world, f"P={world} rank {rank}")
    _check_validation(rank, LAYOUTS[world][-1]["sizes"])
    _check_edge_rows(rank, LAYOUTS[world][-1]["sizes"])
    _check_failures(rank, world, LAYOUTS[world][0]["sizes"])


@pytest.mark.parametrize("world", [2, 4])
def test_vocab_parallel_matches_unsharded(world):
    """logp, entropy, d hidden (full, on every rank), the d weight / d bias slices and the fused
    policy loss equal the unsharded float64 computation on every backend; see the module
    docstring for what each world size covers."""
    run_gloo(_worker, world)


def test_process_group_without_distributed_raises():
    import torch.distributed as dist

    from gccpo_kernels import fused_linear_logprobs, fused_linear_policy_loss

    assert not (dist.is_available() and dist.is_initialized())
    h, w = torch.randn(3, D), torch.randn(V, D)
    y = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        fused_linear_logprobs(h, w, y, process_group=True)
    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        fused_linear_policy_loss(h[None], w, y[None], torch.ones(1), torch.ones(1, 3, dtype=torch.bool),
                                 process_group=True)
