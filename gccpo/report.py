"""What a run reports: ``metrics.jsonl`` and the optional TensorBoard / W&B loggers
(:class:`RunLog`), ``plots.png`` (:func:`plot_run`), the final table (:func:`format_summary`), and
the console helpers the trainer prints and shows progress with."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: The panels of ``plots.png``: (title, metric keys); a key no step logged is left out.
PANELS: list[tuple[str, list[str]]] = [
    ("reward", ["reward/outcome", "reward/pass_at_g"]),
    ("accuracy", ["reward/accuracy"]),
    ("causal reward parts", ["causal/robustness", "causal/effectiveness", "causal/episode_reward",
                             "causal/answer_mass", "causal/answer_logq", "causal/norm_ratio",
                             "causal/mutual_information"]),
    ("episodes per completion", ["episodes/mean", "episodes/frac_multi"]),
    ("KL", ["policy/approx_kl", "policy/kl_ref"]),
    ("clip fraction", ["policy/clip_frac_region", "policy/clip_frac_low", "policy/clip_frac_high"]),
    ("entropy", ["policy/entropy"]),
    ("tokens / s", ["perf/tokens_per_s"]),
]


class RunLog:
    """``<run_dir>/metrics.jsonl`` (one JSON row per step or evaluation) and the loggers of
    ``train.report_to`` (``"tensorboard"``, ``"wandb"`` or ``"none"``)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.loggers: list[Any] = []

    def open(self, report_to: str, project: str, config: dict[str, Any]) -> None:
        """Open the configured logger (an ImportError names what to install)."""
        if report_to == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ImportError("train.report_to=tensorboard needs: pip install tensorboard") from None
            self.loggers.append(SummaryWriter(str(self.run_dir / "tensorboard")))
        elif report_to == "wandb":
            try:
                import wandb
            except ImportError:
                raise ImportError("train.report_to=wandb needs: pip install wandb") from None
            self.loggers.append(wandb.init(project=project, dir=str(self.run_dir), config=config, resume="allow"))

    def write(self, row: dict[str, Any]) -> None:
        """Append ``row`` (it has a ``step``) to ``metrics.jsonl`` and send its numbers to the loggers."""
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        for logger in self.loggers:
            if hasattr(logger, "add_scalar"):
                for k, v in row.items():
                    if k != "step" and isinstance(v, (int, float)):
                        logger.add_scalar(k, v, row["step"])
            else:
                logger.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def close(self) -> None:
        for logger in self.loggers:
            getattr(logger, "close", getattr(logger, "finish", lambda: None))()
        self.loggers = []


def plot_run(history: list[dict[str, Any]], evals: list[dict[str, Any]], path: Path) -> Path | None:
    """``path`` (a PNG): one panel per :data:`PANELS` entry over the training steps, the greedy
    evaluations on the accuracy panel. None without history or without matplotlib."""
    if not history:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _print("matplotlib is not installed: no plots (pip install matplotlib)")
        return None
    fig, axes = plt.subplots(3, 3, figsize=(15, 11))
    steps = [h["step"] for h in history]
    for ax, (title, keys) in zip(axes.flat, PANELS):
        for k in keys:
            if any(k in h for h in history):
                ax.plot(steps, [h.get(k, float("nan")) for h in history], label=k.split("/")[-1])
        if title == "accuracy":
            for split, style in (("id", "o-"), ("ood", "s--")):
                pts = [(e["step"], e[f"eval/{split}_accuracy"]) for e in evals if f"eval/{split}_accuracy" in e]
                if pts:
                    ax.plot(*zip(*pts), style, label=f"eval {split} (greedy)")
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:  # e.g. no causal-reward curves under --algo grpo
            ax.legend(fontsize=7)
    axes.flat[-1].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _print(text: str) -> None:
    """Print a line without breaking a tqdm progress bar."""
    try:
        from tqdm import tqdm

        tqdm.write(text)
    except ImportError:
        print(text, flush=True)


def _progress(iterable: Any, enabled: bool, **kw) -> Any:
    """``iterable`` under a tqdm bar when ``enabled`` and tqdm is installed."""
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc="train", dynamic_ncols=True, **kw)


def format_summary(summary: dict[str, Any]) -> str:
    """The final table: greedy accuracy before / after on ID and OOD with 95% intervals."""
    before, after = summary.get("before", {}), summary.get("after", {})
    lines = [f"== {summary['algo']} on {summary['task']}: {summary['steps']} steps, run dir {summary['run_dir']}",
             f"{'split':<6}{'n':>5}  {'before (95% CI)':<26}{'after (95% CI)':<26}{'change (paired 95% CI)':<26}"]
    for split in ("id", "ood"):
        key = f"eval/{split}_accuracy"
        if key not in after:
            continue
        cell = (lambda e: f"{e[key]:.3f} [{e[f'eval/{split}_ci_low']:.3f}, {e[f'eval/{split}_ci_high']:.3f}]"
                if key in e else "-")
        change = f"{after[key] - before[key]:+.3f}" if key in before and before is not after else ""
        paired = summary.get("change", {}).get(split)
        if change and paired:  # per problem, before and after: problem difficulty cancels
            change += f" [{paired['ci_low']:+.3f}, {paired['ci_high']:+.3f}]"
        lines.append(f"{split:<6}{after.get(f'eval/{split}_n', 0):>5}  {cell(before):<26}{cell(after):<26}{change:<26}")
    lines.append(f"train reward (mean of first 5 -> last 5 steps): {summary['train_reward_first5']:.3f} -> "
                 f"{summary['train_reward_last5']:.3f}; episodes/completion {summary['episodes_mean']:.2f} "
                 f"({100 * summary['episodes_frac_multi']:.0f}% with >= 2); {summary['step_seconds']:.1f} s/step")
    return "\n".join(lines)
