"""``gccpo-compare`` / ``python -m gccpo.compare``: GRPO vs GCCPO (and ablations), several seeds,
paired, in-distribution and out-of-distribution.

Every arm trains from the same initial weights with the same question stream, sampling budget,
optimizer and evaluation sets; an arm differs from ``grpo`` only in its reward options (the
``ARMS`` table below). For each seed s the runs of all arms share s (``train.seed`` = s,
``reward.seed`` = 1234 + s), so arm − grpo differences are paired by seed and, on the fixed
evaluation sets, by problem. The initial model is evaluated once (greedy decoding is
deterministic) and every run evaluates after its last step.

Usage::

    gccpo-compare                                         # grpo vs gccpo, seeds 0,1,2, the embedded default
    gccpo-compare --arms grpo,gccpo,rob_only,eff_only,js,sibling --seeds 0,1 --out runs/ablation
    gccpo-compare --arms grpo,spec,paper,info_gain,mi_floor --seeds 0     # the reward formulations
    gccpo-compare --train.steps 20 --task.eval_size 400  # any gccpo-train option applies to every arm

Writes to ``--out`` (default ``runs/compare``): one run directory per arm and seed (with its
``metrics.jsonl``), ``before.json``, ``compare.json`` (every number), ``compare.md`` (the table)
and ``compare.png`` (learning curves and final accuracies). A finished run's ``result.json`` is
reused, so an interrupted comparison continues where it stopped.

Statistics. For each arm and split: mean ± standard error over seeds of the after-training greedy
accuracy. For each arm other than the baseline: the paired difference arm − baseline, its mean over
seeds and a 95% interval from Student's t over seeds (seed-to-seed variation and evaluation noise;
needs ≥ 2 seeds), and a problem-level 95% interval (per problem, the seed-averaged difference of
correctness; evaluation-set noise only, narrower). The target half-width (``--target``, default
0.05) is judged on the seed-level interval.
"""

from __future__ import annotations

import copy
import gc
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from .config import FORMULATIONS, load_config
from .stats import mean_se, paired, paired_problems, t975  # noqa: F401 (re-exported)

#: Arm name -> the ``gccpo-train`` options that make it (applied after the shared options).
ARMS: dict[str, list[str]] = {
    "grpo": ["--algo", "grpo"],
    "gccpo": ["--algo", "gccpo"],
    "rob_only": ["--algo", "gccpo", "--reward.w_eff", "0"],       # robustness only
    "eff_only": ["--algo", "gccpo", "--reward.w_rob", "0"],       # effectiveness only
    "js": ["--algo", "gccpo", "--reward.divergence", "js"],       # JS instead of KL (both terms)
    "sibling": ["--algo", "gccpo", "--reward.perturbation", "sibling"],  # sibling, not gaussian, perturbations
    # the episode-reward formulations (gccpo/formulations.py, docs/formulations.md)
    **{name: ["--algo", "gccpo", "--reward.formulation", name] for name in FORMULATIONS},
    # SPEC §5 with each term standardized over its question's episodes (spec's terms are raw)
    "spec_group": ["--algo", "gccpo", "--reward.formulation", "spec", "--reward.term_norm", "group"],
}
BASELINE = "grpo"
SPLITS = ("id", "ood")

def _run_config(shared: list[str], arm: str, seed: int, run_dir: Path):
    cfg = load_config(list(shared) + ARMS[arm] + [
        "--train.seed", str(seed), "--reward.seed", str(1234 + seed), "--train.output_dir", str(run_dir),
        "--train.eval_before", "false", "--train.eval_every", "0", "--train.save_final", "false"])
    return cfg


def _log(msg: str) -> None:
    print(f"[gccpo-compare {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(arms: Sequence[str], seeds: Sequence[int], out: Path, shared: list[str], *,
        model: Any = None, tokenizer: Any = None) -> dict[str, Any]:
    """Train every (arm, seed), evaluate, and write ``compare.json`` / ``compare.md`` / ``compare.png``
    under ``out``. ``model`` / ``tokenizer`` (tests) replace loading ``--model.name``; every run
    starts from a deep copy of the same initial model."""
    from .models import load_model
    from .trainer import Trainer

    out.mkdir(parents=True, exist_ok=True)
    base_cfg = _run_config(shared, arms[0], seeds[0], out / "before")
    if model is None:
        import torch

        device = torch.device(base_cfg.model.device if base_cfg.model.device != "auto" else
                              ("cuda" if torch.cuda.is_available() else "cpu"))
        model, tokenizer = load_model(base_cfg.model, device)

    before_path = out / "before.json"
    if before_path.exists():
        before = json.loads(before_path.read_text())
    else:
        _log("evaluating the initial model")
        t0 = time.perf_counter()
        trainer = Trainer(base_cfg, model=copy.deepcopy(model), tokenizer=tokenizer)
        metrics = trainer.evaluate()
        before = {"metrics": metrics, "correct": trainer.eval_correct[0], "seconds": time.perf_counter() - t0}
        before_path.write_text(json.dumps(before))
        del trainer
    results: dict[str, dict[int, dict[str, Any]]] = {a: {} for a in arms}
    total, done = len(arms) * len(seeds), 0
    for seed in seeds:
        for arm in arms:
            run_dir = out / f"{arm}-seed{seed}"
            result_path = run_dir / "result.json"
            if result_path.exists():
                results[arm][seed] = json.loads(result_path.read_text())
                done += 1
                continue
            _log(f"run {done + 1}/{total}: {arm}, seed {seed} -> {run_dir}")
            t0 = time.perf_counter()
            trainer = Trainer(_run_config(shared, arm, seed, run_dir), model=copy.deepcopy(model), tokenizer=tokenizer)
            trainer.train()
            after = trainer.evals[-1]
            result = {"arm": arm, "seed": seed, "after": after, "correct": trainer.eval_correct[trainer.step],
                      "history": trainer.history, "seconds": time.perf_counter() - t0}
            result_path.write_text(json.dumps(result))
            results[arm][seed] = result
            done += 1
            del trainer
            gc.collect()
    report = summarize(arms, seeds, before, results, shared)
    (out / "compare.json").write_text(json.dumps(report, indent=2))
    (out / "compare.md").write_text(format_table(report))
    plot(report, results, out / "compare.png")
    print(format_table(report))
    return report


def summarize(arms: Sequence[str], seeds: Sequence[int], before: dict[str, Any],
              results: dict[str, dict[int, dict[str, Any]]], shared: list[str], target: float = 0.05) -> dict[str, Any]:
    """Every number of the comparison (see the module docstring for the statistics)."""
    report: dict[str, Any] = {"arms": list(arms), "seeds": list(seeds), "options": shared, "baseline": BASELINE,
                              "target_half_width": target, "before": {}, "after": {}, "paired": {}, "cost": {},
                              "runs": {a: {str(s): {k: results[a][s][k] for k in ("after", "seconds")}
                                           for s in seeds} for a in arms}}
    for split in SPLITS:
        key = f"eval/{split}_accuracy"
        if key not in before["metrics"]:
            continue
        report["before"][split] = {"accuracy": before["metrics"][key], "n": before["metrics"][f"eval/{split}_n"]}
        for arm in arms:
            accs = [results[arm][s]["after"][key] for s in seeds]
            m, se = mean_se(accs)
            report["after"].setdefault(arm, {})[split] = {"mean": m, "se": se, "per_seed": accs}
        if BASELINE in arms:
            base = [results[BASELINE][s]["after"][key] for s in seeds]
            for arm in arms:
                if arm == BASELINE:
                    continue
                seed_level = paired([results[arm][s]["after"][key] for s in seeds], base)
                problem_level = paired_problems([results[arm][s]["correct"][split] for s in seeds],
                                                [results[BASELINE][s]["correct"][split] for s in seeds])
                report["paired"].setdefault(arm, {})[split] = {
                    "seed_level": seed_level, "problem_level": problem_level,
                    "target_reached": bool(seed_level["half_width"] <= target)}
    for arm in arms:
        steps = [h for s in seeds for h in results[arm][s]["history"]]
        step_s = sum(h.get("perf/step_s", 0.0) for h in steps)
        entry = {"step_s": step_s / max(len(steps), 1),
                 "reward_s": sum(h.get("perf/reward_s", 0.0) for h in steps) / max(len(steps), 1),
                 "causal_kernels_share": sum(h.get("perf/causal_s", 0.0) for h in steps) / step_s if step_s else 0.0,
                 "run_minutes": mean_se([results[arm][s]["seconds"] / 60 for s in seeds])[0]}
        report["cost"][arm] = entry
    clip_at = load_config(list(shared)).optim.max_grad_norm
    report["diagnostics"] = diagnostics(arms, seeds, before, results, clip_at=clip_at)
    if BASELINE in arms:
        base_reward = report["cost"][BASELINE]["reward_s"]
        for arm in arms:
            c = report["cost"][arm]
            # the causal reward's whole extra cost: probe tokens in the no-grad forward + the kernels
            c["causal_total_share"] = max(c["reward_s"] - base_reward, 0.0) / c["step_s"] if c["step_s"] else 0.0
    return report


def _median(values: list[float]) -> float:
    v = sorted(x for x in values if x is not None and not math.isnan(x))
    if not v:
        return math.nan
    return v[len(v) // 2] if len(v) % 2 else 0.5 * (v[len(v) // 2 - 1] + v[len(v) // 2])


def diagnostics(arms: Sequence[str], seeds: Sequence[int], before: dict[str, Any],
                results: dict[str, dict[int, dict[str, Any]]], *, clip_at: float | None) -> dict[str, Any]:
    """Per arm, what a run did besides its accuracy (over all steps of all seeds unless said):
    the median gradient norm and its ratio to the baseline's, the share of steps whose norm the
    clip (``clip_at``) cut, truncation over the last 10 steps, episodes per completion and the
    share with >= 2, the answer mass at steps 1 / 15 / 30 (mean over seeds), and effectiveness and
    train accuracy over the first and last 5 steps. ``collapse`` lists issue 21's kill signs:
    effectiveness up while ID accuracy fell below the initial model's, a gradient-norm ratio over
    1.5, truncation over 10 %."""
    out: dict[str, Any] = {}
    for arm in arms:
        runs = [results[arm][s]["history"] for s in seeds]
        steps = [h for run in runs for h in run]
        first = [h for run in runs for h in run[:5]]
        last = [h for run in runs for h in run[-5:]]
        def mean(rows: list[dict[str, Any]], k: str) -> float:
            n = sum(k in r for r in rows)
            return sum(r[k] for r in rows if k in r) / n if n else math.nan
        norms = [h["optim/grad_norm"] for h in steps if "optim/grad_norm" in h]
        at = {}
        for step in (1, 15, 30):
            vals = [run[step - 1]["causal/answer_mass"] for run in runs
                    if len(run) >= step and "causal/answer_mass" in run[step - 1]]
            at[str(step)] = sum(vals) / len(vals) if vals else math.nan
        out[arm] = {
            "grad_norm_median": _median(norms),
            "clipped_share": (sum(n > clip_at for n in norms) / len(norms)) if norms and clip_at else math.nan,
            "truncated_last10": mean([h for run in runs for h in run[-10:]], "completion/truncated"),
            "episodes_mean": mean(steps, "episodes/mean"), "episodes_multi": mean(steps, "episodes/frac_multi"),
            "answer_mass": at,
            "effectiveness": [mean(first, "causal/effectiveness"), mean(last, "causal/effectiveness")],
            "train_accuracy": [mean(first, "reward/accuracy"), mean(last, "reward/accuracy")]}
    base = out.get(BASELINE, {}).get("grad_norm_median", math.nan)
    id_before = before.get("metrics", {}).get("eval/id_accuracy")
    for arm, d in out.items():
        d["grad_norm_ratio"] = d["grad_norm_median"] / base if base and not math.isnan(base) else math.nan
        signs = []
        id_after = [results[arm][s]["after"].get("eval/id_accuracy") for s in seeds]
        eff = d["effectiveness"]
        if not any(math.isnan(x) for x in eff) and eff[1] > eff[0] and id_before is not None and \
                all(a is not None for a in id_after) and sum(id_after) / len(id_after) < id_before:
            signs.append("effectiveness up while ID accuracy fell")
        if d["grad_norm_ratio"] > 1.5:
            signs.append(f"gradient norm {d['grad_norm_ratio']:.2f}x the baseline's")
        if d["truncated_last10"] > 0.10:
            signs.append(f"truncation {100 * d['truncated_last10']:.0f}%")
        d["collapse"] = signs
    return out


def _pct(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _share(x: float) -> str:
    """A time share in percent with two significant digits (the kernels' share can be ~0.01%)."""
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2g}"


def format_table(report: dict[str, Any]) -> str:
    """The markdown table: accuracy (%) before, after (mean ± SE over seeds), paired differences."""
    lines = [f"Seeds: {report['seeds']}; options: `{' '.join(report['options']) or '(defaults)'}`", "",
             "| arm | split | before | after (mean ± SE) | per seed |", "|---|---|---|---|---|"]
    for arm in report["arms"]:
        for split, a in report["after"].get(arm, {}).items():
            lines.append(f"| {arm} | {split} | {_pct(report['before'][split]['accuracy'])} | "
                         f"{_pct(a['mean'])} ± {_pct(a['se'])} | {', '.join(_pct(x) for x in a['per_seed'])} |")
    if report["paired"]:
        lines += ["", f"Paired difference vs {report['baseline']} (points; 95% intervals):", "",
                  "| arm | split | mean diff | seed-level CI (t) | problem-level CI | ±5 reached |",
                  "|---|---|---|---|---|---|"]
        for arm, splits in report["paired"].items():
            for split, p in splits.items():
                s, q = p["seed_level"], p["problem_level"]
                lines.append(f"| {arm} | {split} | {_pct(s['mean'])} | [{_pct(s['ci_low'])}, {_pct(s['ci_high'])}] | "
                             f"[{_pct(q['ci_low'])}, {_pct(q['ci_high'])}] | {'yes' if p['target_reached'] else 'no'} |")
    lines += ["", "| arm | s / step | causal kernels share | causal reward share (probes + kernels) | min / run |",
              "|---|---|---|---|---|"]
    for arm, c in report["cost"].items():
        lines.append(f"| {arm} | {c['step_s']:.1f} | {_share(c['causal_kernels_share'])}% | "
                     f"{_share(c.get('causal_total_share', math.nan))}% | {c['run_minutes']:.1f} |")
    if report.get("diagnostics"):
        lines += ["", "| arm | grad-norm median (× baseline) | clipped steps | truncated (last 10) "
                  "| episodes / completion (≥ 2) | answer mass (1 / 15 / 30) "
                  "| effectiveness (first 5 → last 5) | train acc (first 5 → last 5) | collapse signs |",
                  "|---|---|---|---|---|---|---|---|---|"]
        num = (lambda x, f="{:.2f}": "–" if x is None or math.isnan(x) else f.format(x))  # noqa: E731
        for arm, d in report["diagnostics"].items():
            mass = " / ".join(num(d["answer_mass"][k]) for k in ("1", "15", "30"))
            lines.append(f"| {arm} | {num(d['grad_norm_median'])} ({num(d['grad_norm_ratio'])}) | "
                         f"{_pct(d['clipped_share'])}% | {_pct(d['truncated_last10'])}% | {num(d['episodes_mean'])} "
                         f"({_pct(d['episodes_multi'])}%) | {mass} | {num(d['effectiveness'][0], '{:.3g}')} → "
                         f"{num(d['effectiveness'][1], '{:.3g}')} | {_pct(d['train_accuracy'][0])} → "
                         f"{_pct(d['train_accuracy'][1])} | {'; '.join(d['collapse']) or 'none'} |")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], results: dict[str, dict[int, dict[str, Any]]], path: Path) -> Path | None:
    """``compare.png``: train reward and accuracy per step (mean over seeds, ± SE band) per arm, and
    the after-training greedy accuracy per split (mean ± SE, the initial model dashed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _log("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, key, title in ((axes[0], "reward/outcome", "train reward (sampled)"),
                           (axes[1], "reward/accuracy", "train accuracy (sampled)")):
        for arm in report["arms"]:
            runs = [results[arm][s]["history"] for s in report["seeds"]]
            steps = min(len(h) for h in runs)
            stats = [mean_se([h[i].get(key, math.nan) for h in runs]) for i in range(steps)]
            xs = list(range(1, steps + 1))
            ms = [m for m, _ in stats]
            ax.plot(xs, ms, label=arm)
            if len(runs) > 1:
                ax.fill_between(xs, [m - se for m, se in stats], [m + se for m, se in stats], alpha=0.2)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    ax = axes[2]
    width = 0.8 / max(len(report["arms"]), 1)
    for j, arm in enumerate(report["arms"]):
        splits = list(report["after"].get(arm, {}))
        xs = [i + j * width for i in range(len(splits))]
        ax.bar(xs, [report["after"][arm][s]["mean"] for s in splits], width,
               yerr=[0 if math.isnan(report["after"][arm][s]["se"]) else report["after"][arm][s]["se"] for s in splits],
               label=arm, capsize=3)
    for i, split in enumerate(report["before"]):
        ax.hlines(report["before"][split]["accuracy"], i - 0.1, i + 0.9, colors="k", linestyles="dashed")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(report["before"]))], list(report["before"]))
    ax.set_title("greedy accuracy after training (dashed: before)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """``gccpo-compare [--arms a,b] [--seeds 0,1,2] [--out DIR] [gccpo-train options]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(__doc__.strip() + "\n\narms: " + ", ".join(f"{k} ({' '.join(v)})" for k, v in ARMS.items()))
        return 0
    opts = {"--arms": "grpo,gccpo", "--seeds": "0,1,2", "--out": "runs/compare"}
    shared: list[str] = []
    i = 0
    while i < len(args):
        key, _, inline = args[i].partition("=")
        if key in opts:
            if not inline and i + 1 >= len(args):
                print(f"gccpo-compare: {key} needs a value", file=sys.stderr)
                return 2
            opts[key] = inline or args[i + 1]
            i += 1 if inline else 2
        else:
            shared.append(args[i])
            i += 1
    arms = [a.strip() for a in opts["--arms"].split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    try:
        seeds = [int(s) for s in opts["--seeds"].split(",") if s.strip()]
        if unknown or not arms or not seeds:
            raise ValueError(f"unknown arms {unknown} (choose from {list(ARMS)})" if unknown else "no arms or seeds")
        load_config(shared)  # fail on a bad option before any model loads
    except ValueError as exc:
        print(f"gccpo-compare: {exc}", file=sys.stderr)
        return 2
    if BASELINE not in arms:
        _log(f"no {BASELINE} arm: no paired differences")
    run(arms, seeds, Path(opts["--out"]), shared)
    return 0


if __name__ == "__main__":
    sys.exit(main())
