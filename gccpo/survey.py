"""``gccpo-survey`` / ``python -m gccpo.survey``: how the untrained model does on candidate tasks.

Why. GC²PO's process reward scores the *steps* (episodes) of a completion, so a comparison with
GRPO can only show something on a task where the model writes several steps and where steps
matter. Issue 21 asks to choose, before any long run, an in-distribution task where answering step
by step helps and accuracy starts between 10 % and 40 % (room to move both ways, and enough
correct samples for a group-relative advantage), with an out-of-distribution split the model can
move on (not stuck at a 1–3 % floor, where no difference between arms can show). This tool
measures those numbers on the default model (the same ``load_model`` as ``gccpo-train``) for each
candidate task, before training.

What, for each candidate task and each part (prompt style × split):

- styles: ``step`` is the trainer's ``task.prompt`` (solve step by step, then ``Answer: ...``);
  ``direct`` is ``--direct_prompt`` (the final answer only). Both are measured on the held-out
  in-distribution eval set the :class:`gccpo.tasks.Task` builds (``eval_set``), and the ``step``
  style also on its out-of-distribution set (``ood_set``, the task's ``ood_params``);
- greedy accuracy: one greedy completion per problem, with a 95% Wilson interval over problems;
- sampled accuracy: S completions per problem (``--samples``, default 4) at the rollout's
  temperature / top-p. Its interval is the **problem-level** one: the mean over problems of the
  per-problem accuracy k_i / S, ± t975(n − 1) × its standard error (so the S samples of one problem,
  which are correlated, count as one observation; equivalent to clustering by problem), clipped
  to [0, 1];
- pass@S: the fraction of problems with at least one correct sample (Wilson interval);
- episodes per completion: the trainer's own splitter (:func:`gccpo.episodes.split_episodes`) with
  the episode config the trainer builds from the ``episodes.*`` options, so the count is what
  GC²PO's process reward sees; and the fraction of completions with ≥ 2 episodes;
- mean completion length in tokens (up to and including the EOS, as the trainer counts it) and the
  truncation rate (no EOS within ``--max_new_tokens``).

A completion is correct when the task's verifier gives it the full score (``outcome_rewards`` ≥ 1,
as in the trainer's evaluation); the mean verifier score and the answer-extraction faults are
recorded too. The episode, length and truncation columns of the table are over the sampled
completions (what training sees); the greedy ones are in ``survey.json``. A second table gives,
per task, the in-distribution difference step − direct paired by problem (normal 95% interval over
problems, :func:`gccpo.stats.paired_problems`). Last, how out of distribution the OOD set really is
(:func:`ood_overlap`): the share of its questions that are also ID eval questions or among the
first training questions, listed under the tables when not zero.

Usage::

    gccpo-survey                                    # the default candidates, 100 problems x 4 samples
    gccpo-survey --tasks 'chain_sum:{"min_terms":4,"max_terms":5}' basic_arithmetic --n 200
    gccpo-survey --tasks 'chain_sum:{"min_terms":4,"max_terms":5}:{"min_digits":2,"max_digits":2}'  # + OOD
    gccpo-survey --samples 8 --max_new_tokens 128 --out runs/survey128 --rollout.temperature 1.0

Options: ``--tasks ENTRY ...`` (several values, or comma-separated), each ``name``,
``name:PARAMS`` or ``name:PARAMS:OOD`` with PARAMS / OOD JSON objects: PARAMS override the task's
in-distribution defaults (:data:`gccpo.tasks.ID_DEFAULTS`), OOD replaces its OOD overrides
(default ``--task.ood_params``, else :data:`gccpo.tasks.OOD_DEFAULTS`; ``{}``: no OOD part);
``jsonl`` surveys the ``--task.train_file`` / ``eval_file`` / ``ood_file`` task. ``--n`` problems
per part (default 100), ``--samples`` S (4), ``--max_new_tokens`` (default ``rollout.max_new_tokens``;
greedy and sampled alike), ``--out DIR`` (``runs/survey``), ``--direct_prompt TEXT`` (with
``{question}``), and any ``gccpo-train`` option (``--section.key value``): the model, the rollout's
temperature / top-p / ``eval_batch_size`` (rows per generation call) / decoder, the episode
splitter, ``task.prompt`` (the step style), ``task.seed``, ``train.seed`` (sampling),
``train.threads``, ``train.progress``. ``task.name`` / ``params`` / ``eval_size`` /
``ood_eval_size`` come from ``--tasks`` and ``--n`` instead.

Outputs under ``--out``: ``parts/<task>-<style>-<split>-<key>.json`` (every number of one part, its
per-completion rows and a few example completions; ``<key>`` hashes every setting that changes the
numbers), reused when present, so an interrupted survey continues where it stopped and a changed
setting measures afresh; then ``survey.json`` (all parts and the paired differences) and
``survey.md`` (the tables, also printed). Generation always uses transformers (``rollout.decoder``
compact or generate) in the model's dtype, without the trainer's CUDA autocast; each part reseeds
torch with ``train.seed``, so a part's samples do not depend on which parts were reused.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

import torch

from .config import Config, ConfigError, TaskConfig, load_config
from .episodes import EpisodeConfig, split_episodes
from .rollout import Rollout, generate
from .stats import paired_problems, t_interval, wilson_interval
from .tasks import ID_DEFAULTS, OOD_DEFAULTS, Problem, Task, build_task, outcome_rewards

#: The candidates of issue 21 when ``--tasks`` is not given. chain_sum with 4-5 terms gets OOD overrides of
#: its own (6-7 terms): the default ones (1-2 digits) repeat about half of its ID eval problems (:func:`ood_overlap`).
DEFAULT_TASKS: tuple[str, ...] = ('chain_sum:{"min_terms":4,"max_terms":5}:{"min_terms":6,"max_terms":7}', "chain_sum",
                                  "basic_arithmetic", "simple_equations", "leg_counting")
DIRECT_PROMPT = '{question}\n\nGive only the final answer, on one line of the form "Answer: <answer>".'
#: (style, split) of every part, in table order.
PARTS: tuple[tuple[str, str], ...] = (("step", "id"), ("direct", "id"), ("step", "ood"))
#: The in-distribution accuracy band issue 21 asks of the chosen task.
TARGET_BAND = (0.10, 0.40)
#: Training-stream questions searched for OOD questions (a default run draws a few hundred).
TRAIN_CHECKED = 2000

_NAME = re.compile(r"[A-Za-z0-9_]+")


# --------------------------------------------------------------------------------------------
# candidates
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """One ``--tasks`` entry: a task name, its in-distribution parameters (the task's defaults
    overridden by the entry's, None for ``jsonl``) and its OOD overrides (None: the default)."""

    name: str
    params: dict | None
    ood_params: dict | None
    entry: str


def split_entries(text: str) -> list[str]:
    """Entries of a ``--tasks`` value separated by top-level commas (commas inside JSON objects,
    lists or strings do not separate)."""
    parts, depth, start, in_string, escaped = [], 0, 0, False, False
    for i, ch in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _json_object(text: str, entry: str, what: str) -> tuple[dict, str]:
    """The JSON object at the start of ``text`` and the text after it (ConfigError otherwise)."""
    try:
        value, end = json.JSONDecoder().raw_decode(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--tasks {entry!r}: {what} must be a JSON object ({exc.msg} at character "
                          f"{exc.pos + 1} of {text!r})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"--tasks {entry!r}: {what} must be a JSON object, got {type(value).__name__}")
    return value, text[end:]


def parse_candidate(entry: str) -> Candidate:
    """``name``, ``name:PARAMS`` or ``name:PARAMS:OOD`` (JSON objects) as a :class:`Candidate`;
    a malformed entry raises :class:`ConfigError` (an unknown task name or bad parameters only
    when the task is built, by :func:`gccpo.tasks.build_task`)."""
    name, sep, rest = entry.strip().partition(":")
    name = name.strip()
    if not _NAME.fullmatch(name):
        raise ConfigError(f"--tasks {entry!r}: expected name, name:PARAMS or name:PARAMS:OOD with a task name "
                          "of letters, digits and underscores")
    params = ood = None
    if sep:
        params, rest = _json_object(rest.strip(), entry, "PARAMS")
        rest = rest.strip()
        if rest.startswith(":"):
            ood, rest = _json_object(rest[1:].strip(), entry, "OOD")
        if rest.strip():
            raise ConfigError(f"--tasks {entry!r}: unexpected {rest.strip()!r} after the JSON parameters")
    if name == "jsonl":
        if params:
            raise ConfigError(f"--tasks {entry!r}: a jsonl task takes no parameters (its problems come from "
                              "--task.train_file / eval_file / ood_file)")
        return Candidate(name, None, None, entry)
    return Candidate(name, {**ID_DEFAULTS.get(name, {}), **(params or {})}, ood, entry)


def parse_tasks(values: Sequence[str]) -> list[Candidate]:
    """Every candidate of the ``--tasks`` values (each may hold several comma-separated entries)."""
    candidates = [parse_candidate(e) for v in values for e in split_entries(v)]
    if not candidates:
        raise ConfigError("--tasks needs at least one entry (name, name:PARAMS or name:PARAMS:OOD)")
    return candidates


def task_config(config: Config, candidate: Candidate, n: int) -> TaskConfig:
    """The ``task`` section for a candidate: the given ``task.*`` options with the candidate's
    name and parameters, and eval sets of ``n`` problems."""
    ood = candidate.ood_params
    if ood is None and candidate.name != "jsonl":
        ood = config.task.ood_params if config.task.ood_params is not None else OOD_DEFAULTS.get(candidate.name, {})
    return dataclasses.replace(config.task, name=candidate.name, params=candidate.params, ood_params=ood,
                               eval_size=n, ood_eval_size=n)


def styled(task: Task, prompt: str) -> Task:
    """The same task (same problems and verifier) asked with another ``task.prompt``."""
    other = copy.copy(task)
    other.config = dataclasses.replace(task.config, prompt=prompt)
    return other


# --------------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------------


def episode_config(config: Config) -> EpisodeConfig:
    """The episode splitter's config from the ``episodes.*`` options (the one the trainer uses)."""
    return EpisodeConfig(**dataclasses.asdict(config.episodes))


def truncated(model: Any, tokenizer: Any, rollout: Rollout) -> torch.Tensor:
    """``[B]`` bool: completions without an EOS within the length cap (the trainer's own test,
    ``Trainer._truncated``, which reads only the model's and tokenizer's EOS ids)."""
    from .trainer import Trainer

    return Trainer._truncated(SimpleNamespace(model=model, tokenizer=tokenizer), rollout)


def completion_rows(model: Any, tokenizer: Any, task: Task, problems: Sequence[Problem], rollout: Rollout,
                    episodes: EpisodeConfig) -> dict[str, Any]:
    """Per completion (rows of a problem contiguous): ``correct`` (full verifier score), ``score``,
    ``episodes``, ``length`` (tokens), ``truncated``, and the ``texts``; ``faults``: the
    verifier's fault counts (:func:`gccpo.tasks.outcome_rewards`)."""
    ids, mask = rollout.completion_ids, rollout.completion_mask
    texts = tokenizer.batch_decode([row[m] for row, m in zip(ids, mask)], skip_special_tokens=True)
    per_row = [problems[int(g)] for g in rollout.group_index.tolist()]
    faults: dict[str, int] = {}
    scores = outcome_rewards(task, per_row, texts, faults)
    counts = split_episodes(ids, mask, tokenizer, episodes).episode_counts
    return {"correct": (scores >= 1.0).int().tolist(), "score": scores.tolist(), "episodes": counts.tolist(),
            "length": mask.sum(1).tolist(), "truncated": truncated(model, tokenizer, rollout).int().tolist(),
            "texts": texts, "faults": faults}


def summarize_rows(rows: dict[str, Sequence[float]], group: int, *, sampled: bool) -> dict[str, Any]:
    """The numbers of one set of completions, ``group`` consecutive rows per problem.

    Greedy (``sampled=False``, one row per problem): accuracy with a Wilson interval over problems.
    Sampled: accuracy as the mean of per-problem accuracies with a t-interval over problems
    (clipped to [0, 1]), pass@group with a Wilson interval, and ``per_problem`` (correct counts).
    Both: mean verifier score, mean episodes, the ≥ 2-episode fraction, mean length, truncation.
    """
    correct = [int(c) for c in rows["correct"]]
    if not correct or len(correct) % group:
        raise ValueError(f"{len(correct)} rows is not a positive multiple of {group} per problem")
    n = len(correct) // group
    k = [sum(correct[i * group:(i + 1) * group]) for i in range(n)]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    out: dict[str, Any] = {"n_problems": n, "completions": len(correct), "score_mean": mean(rows["score"]),
                           "episodes_mean": mean(rows["episodes"]),
                           "multi_episode_frac": mean([float(e >= 2) for e in rows["episodes"]]),
                           "length_mean": mean(rows["length"]), "truncated_frac": mean(rows["truncated"])}
    if not sampled:
        if group != 1:
            raise ValueError(f"greedy decoding gives one completion per problem, got {group}")
        lo, hi = wilson_interval(sum(correct), n)
        out.update(accuracy=sum(correct) / n, ci_low=lo, ci_high=hi, interval="wilson over problems")
        return out
    acc = t_interval([c / group for c in k], 0.0, 1.0)
    passed = sum(c > 0 for c in k)
    p_lo, p_hi = wilson_interval(passed, n)
    out.update(accuracy=acc["mean"], ci_low=acc["ci_low"], ci_high=acc["ci_high"], se=acc["se"],
               interval="t over per-problem accuracies", pass_at=passed / n, pass_ci_low=p_lo, pass_ci_high=p_hi,
               per_problem=k)
    return out


def measure(model: Any, tokenizer: Any, task: Task, problems: Sequence[Problem], config: Config, *,
            samples: int, max_new_tokens: int, label: str = "") -> dict[str, Any]:
    """Greedy (1 per problem) and sampled (``samples`` per problem) completions of ``problems``
    with ``task``'s prompt, in batches of ``rollout.eval_batch_size`` rows; their numbers
    (:func:`summarize_rows`), rows, generation seconds and a few examples."""
    r = config.rollout
    prompts = [task.prompt_text(p, tokenizer) for p in problems]
    episodes = episode_config(config)
    torch.manual_seed(config.train.seed)
    out: dict[str, Any] = {}
    texts: dict[str, list[str]] = {}
    for kind, g in (("greedy", 1), ("sampled", samples)):
        t0 = time.perf_counter()
        rollout = generate(model, tokenizer, prompts, num_generations=g, temperature=r.temperature, top_p=r.top_p,
                           max_new_tokens=max_new_tokens, greedy=kind == "greedy", batch_size=r.eval_batch_size,
                           progress=f"{label} {kind}" if config.train.progress else None, decoder=r.decoder)
        seconds = time.perf_counter() - t0
        rows = completion_rows(model, tokenizer, task, problems, rollout, episodes)
        texts[kind] = rows.pop("texts")
        out[kind] = {**summarize_rows(rows, g, sampled=kind == "sampled"), "faults": rows.pop("faults"), "rows": rows,
                     "seconds": seconds, "generated_tokens": int(rollout.completion_mask.sum())}
    out["examples"] = [{"question": p.question, "answer": p.answer, "greedy": texts["greedy"][i],
                        "sampled": texts["sampled"][i * samples]} for i, p in enumerate(problems[:3])]
    return out


# --------------------------------------------------------------------------------------------
# the survey
# --------------------------------------------------------------------------------------------


def _log(msg: str) -> None:
    print(f"[gccpo-survey {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def part_settings(config: Config, task: Task, split: str, *, n: int, samples: int,
                  max_new_tokens: int) -> dict[str, Any]:
    """Every setting that changes a part's numbers (its file name hashes them)."""
    t, r = task.config, config.rollout
    return {"model": [config.model.name, config.model.gguf_file, config.model.dtype], "task": t.name,
            "params": t.params, "ood_params": t.ood_params if split == "ood" else None,
            "files": [t.train_file, t.eval_file, t.ood_file if split == "ood" else None], "task_seed": t.seed,
            "prompt": t.prompt, "system_prompt": t.system_prompt, "answer_fallback": t.answer_fallback,
            "split": split, "n": n, "samples": samples, "max_new_tokens": max_new_tokens,
            "temperature": r.temperature, "top_p": r.top_p, "seed": config.train.seed,
            "episodes": dataclasses.asdict(config.episodes)}


def part_path(out: Path, task: Task, style: str, split: str, settings: dict[str, Any]) -> Path:
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return out / "parts" / f"{task.name}-{style}-{split}-{key}.json"


def _write_json(path: Path, data: Any) -> None:
    """Write through a temporary file and rename, so an interrupted write leaves no part behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def ood_overlap(task: Task, train_problems: int = TRAIN_CHECKED) -> dict[str, Any]:
    """How out-of-distribution the OOD set is: the share of its questions that are also ID eval
    questions (``ood_in_id``) or among the first ``train_problems`` questions of the training
    stream (``ood_in_train``). reasoning-gym items are a function of seed + index, so the OOD set
    (seed + 2) can repeat ID (seed + 1) and training (seed) problems when its parameters only widen
    the ID ones (e.g. ``max_digits`` 1 -> 2 draws many 1-digit problems)."""
    ood = [p.question for p in task.ood_set]
    if not ood:
        return {"ood_in_id": None, "ood_in_train": None, "train_checked": 0}
    checked = train_problems if task.train_size is None else min(train_problems, task.train_size)
    train = {p.question for p in copy.copy(task).next_problems(checked)}
    ids = {p.question for p in task.eval_set}
    return {"ood_in_id": sum(q in ids for q in ood) / len(ood), "ood_in_train": sum(q in train for q in ood) / len(ood),
            "train_checked": checked}


def run(candidates: Sequence[Candidate], out: Path, config: Config, *, n: int = 100, samples: int = 4,
        max_new_tokens: int | None = None, direct_prompt: str = DIRECT_PROMPT, model: Any = None,
        tokenizer: Any = None) -> dict[str, Any]:
    """Measure every part of every candidate (reusing the part files under ``out``), write
    ``survey.json`` / ``survey.md``, print the table and return the report. Every task is built
    (and a bad entry reported) before the model loads; ``model`` / ``tokenizer`` (tests) replace
    loading ``--model.name``."""
    max_new = int(max_new_tokens or config.rollout.max_new_tokens)
    tasks = [(c, build_task(task_config(config, c, n))) for c in candidates]
    plan = []
    for cand, task in tasks:
        for style, split in PARTS:
            problems = task.eval_set if split == "id" else task.ood_set
            if not problems:
                _log(f"{cand.entry}: no {split} problems; skipping its {style}/{split} part")
                continue
            if len(problems) < n:
                _log(f"{cand.entry}: only {len(problems)} {split} problems (asked for {n})")
            asked = styled(task, direct_prompt) if style == "direct" else task
            settings = part_settings(config, asked, split, n=n, samples=samples, max_new_tokens=max_new)
            plan.append((cand, asked, style, split, problems, settings, part_path(out, task, style, split, settings)))
    if model is None and any(not item[-1].exists() for item in plan):
        from .models import load_model

        if config.train.threads:
            torch.set_num_threads(config.train.threads)
        device = torch.device(config.model.device if config.model.device != "auto" else
                              ("cuda" if torch.cuda.is_available() else "cpu"))
        _log(f"loading {config.model.name} on {device}")
        model, tokenizer = load_model(config.model, device)
    parts = []
    for i, (cand, task, style, split, problems, settings, path) in enumerate(plan, 1):
        if path.exists():
            parts.append(json.loads(path.read_text()))
            continue
        _log(f"part {i}/{len(plan)}: {cand.entry} {style}/{split}, {len(problems)} problems x (1 greedy + "
             f"{samples} sampled) -> {path}")
        numbers = measure(model, tokenizer, task, problems, config, samples=samples, max_new_tokens=max_new,
                          label=f"{task.name} {style}/{split}")
        part = {"entry": cand.entry, "task": task.name, "params": task.config.params,
                "ood_params": task.config.ood_params, "style": style, "split": split, "prompt": task.config.prompt,
                "settings": settings, **numbers}
        _write_json(path, part)
        parts.append(part)
    report = summarize(parts, samples=samples, n=n, max_new_tokens=max_new, config=config)
    report["ood_overlap"] = {cand.entry: ood_overlap(task) for cand, task in tasks}
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "survey.json", report)
    table = format_table(report)
    (out / "survey.md").write_text(table)
    print(table, flush=True)
    return report


def summarize(parts: Sequence[dict[str, Any]], *, samples: int, n: int, max_new_tokens: int,
              config: Config) -> dict[str, Any]:
    """The report: the settings, every part, and per task the in-distribution step − direct
    differences paired by problem (greedy correctness, per-problem sampled accuracy)."""
    r = config.rollout
    report: dict[str, Any] = {
        "settings": {"model": config.model.name, "n": n, "samples": samples, "max_new_tokens": max_new_tokens,
                     "temperature": r.temperature, "top_p": r.top_p, "seed": config.train.seed,
                     "episodes": dataclasses.asdict(config.episodes), "target_band": list(TARGET_BAND)},
        "parts": list(parts), "step_vs_direct": []}
    by_key = {(p["entry"], p["style"], p["split"]): p for p in parts}
    for entry in dict.fromkeys(p["entry"] for p in parts):
        step, direct = by_key.get((entry, "step", "id")), by_key.get((entry, "direct", "id"))
        if step is None or direct is None:
            continue
        ood = by_key.get((entry, "step", "ood"))
        s_acc = [k / step["settings"]["samples"] for k in step["sampled"]["per_problem"]]
        d_acc = [k / direct["settings"]["samples"] for k in direct["sampled"]["per_problem"]]
        report["step_vs_direct"].append({
            "entry": entry, "task": step["task"], "params": step["params"],
            "greedy": paired_problems([step["greedy"]["rows"]["correct"]], [direct["greedy"]["rows"]["correct"]]),
            "sampled": paired_problems([s_acc], [d_acc]),
            "step_sampled_accuracy": step["sampled"]["accuracy"],
            "in_target_band": TARGET_BAND[0] <= step["sampled"]["accuracy"] <= TARGET_BAND[1],
            "ood_step_sampled_accuracy": ood["sampled"]["accuracy"] if ood else None})
    return report


def _pct(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _ci(d: dict[str, Any]) -> str:
    return f"{_pct(d['accuracy'])} [{_pct(d['ci_low'])}, {_pct(d['ci_high'])}]"


def _diff(d: dict[str, Any]) -> str:
    return f"{100 * d['mean']:+.1f} [{100 * d['ci_low']:+.1f}, {100 * d['ci_high']:+.1f}]"


def _json_cell(params: dict | None) -> str:
    """Parameters as compact JSON for a markdown cell ("-" for none)."""
    return "-" if params is None else json.dumps(params, separators=(",", ":")).replace("|", "\\|")


def _params(part: dict[str, Any]) -> str:
    if part["split"] == "ood":
        return "ood " + _json_cell(part["ood_params"])
    return _json_cell(part["params"])


def format_table(report: dict[str, Any]) -> str:
    """``survey.md``: one row per part (accuracies in %), then the paired step − direct table."""
    s = report["settings"]
    S = s["samples"]
    lines = [f"Model `{s['model']}`; {s['n']} problems per part; {S} samples per problem at temperature "
             f"{s['temperature']:g}, top-p {s['top_p']:g}; at most {s['max_new_tokens']} new tokens; episodes "
             f"`{s['episodes']['delimiter']}` (at most {s['episodes']['max_episodes']}).", "",
             "Greedy: 95% Wilson interval over problems. Sampled: mean of per-problem accuracies, 95% t-interval "
             "over problems. Episodes, length and truncation: over the sampled completions. "
             "OOD params: overrides of the ID params.", "",
             f"| task | params | style | split | n | greedy acc [95% CI] | sampled acc [95% CI] | pass@{S} | "
             "episodes / completion | ≥ 2 episodes | length (tokens) | truncated |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in report["parts"]:
        g, sm = p["greedy"], p["sampled"]
        lines.append(f"| {p['task']} | {_params(p)} | {p['style']} | {p['split']} | {g['n_problems']} | {_ci(g)} | "
                     f"{_ci(sm)} | {_pct(sm['pass_at'])} | {sm['episodes_mean']:.2f} | "
                     f"{_pct(sm['multi_episode_frac'])} | {sm['length_mean']:.1f} | {_pct(sm['truncated_frac'])} |")
    if report["step_vs_direct"]:
        lo, hi = report["settings"]["target_band"]
        lines += ["", "In distribution, step − direct, paired by problem (points; normal 95% interval over "
                  "problems):",
                  "", f"| task | params | greedy step − direct | sampled step − direct | step sampled acc | "
                  f"in {_pct(lo)}–{_pct(hi)} % | OOD step sampled acc |", "|---|---|---|---|---|---|---|"]
        for c in report["step_vs_direct"]:
            lines.append(f"| {c['task']} | {_json_cell(c['params'])} | {_diff(c['greedy'])} | "
                         f"{_diff(c['sampled'])} | {_pct(c['step_sampled_accuracy'])} | "
                         f"{'yes' if c['in_target_band'] else 'no'} | {_pct(c['ood_step_sampled_accuracy'])} |")
    overlaps = [(entry, o) for entry, o in report.get("ood_overlap", {}).items() if o["ood_in_id"] or o["ood_in_train"]]
    if overlaps:
        lines += ["", "OOD questions that are not out of distribution (the OOD set repeats these problems):", ""]
        lines += [f"- `{entry}`: {_pct(o['ood_in_id'])} % are ID eval questions, {_pct(o['ood_in_train'])} % are "
                  f"among the first {o['train_checked']} training questions" for entry, o in overlaps]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def _positive(option: str, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise ConfigError(f"{option} must be an integer >= 1, got {value!r}")
    return number


def parse_args(args: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """The survey's own options (``--tasks`` takes every value up to the next ``--`` option) and
    the remaining ``gccpo-train`` options; a missing or bad value raises :class:`ConfigError`."""
    opts: dict[str, Any] = {"--tasks": [], "--n": "100", "--samples": "4", "--max_new_tokens": None,
                            "--out": "runs/survey", "--direct_prompt": DIRECT_PROMPT}
    shared: list[str] = []
    i = 0
    while i < len(args):
        key, eq, inline = args[i].partition("=")
        key = "--" + key[2:].replace("-", "_") if key.startswith("--") else key
        if key not in opts:
            shared.append(args[i])
            i += 1
            continue
        values = [inline] if eq else []
        i += 1
        while not eq and i < len(args) and not args[i].startswith("--"):
            values.append(args[i])
            i += 1
            if key != "--tasks":
                break
        if not values:
            raise ConfigError(f"{key} needs a value")
        if key == "--tasks":
            opts[key] += values
        else:
            opts[key] = values[0]
    opts["--n"] = _positive("--n", opts["--n"])
    opts["--samples"] = _positive("--samples", opts["--samples"])
    opts["--max_new_tokens"] = _positive("--max_new_tokens", opts["--max_new_tokens"])
    if "{question}" not in opts["--direct_prompt"]:
        raise ConfigError("--direct_prompt must contain {question}")
    return opts, shared


def main(argv: Sequence[str] | None = None) -> int:
    """``gccpo-survey [--tasks ENTRY ...] [--n N] [--samples S] [--max_new_tokens T] [--out DIR]
    [--direct_prompt TEXT] [gccpo-train options]``. Returns 0, or 2 for a user error (one line on
    stderr)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(__doc__.strip())
        return 0
    try:
        opts, shared = parse_args(args)
        candidates = parse_tasks(opts["--tasks"] or DEFAULT_TASKS)
        config = load_config(shared)
    except ValueError as exc:  # ConfigError, or a value a kernel config refused
        return _fail(exc, " (see gccpo-survey --help)")
    try:
        run(candidates, Path(opts["--out"]), config, n=opts["--n"], samples=opts["--samples"],
            max_new_tokens=opts["--max_new_tokens"], direct_prompt=opts["--direct_prompt"])
    except (ConfigError, ImportError) as exc:  # a task's parameters, a data file, a missing package
        return _fail(exc)
    return 0


def _fail(exc: BaseException, hint: str = "") -> int:
    """Print ``gccpo-survey: error: <message>`` as one line on stderr; returns exit code 2."""
    from .cli import one_line

    print(f"gccpo-survey: error: {one_line(exc)}{hint}", file=sys.stderr, flush=True)
    return 2


if __name__ == "__main__":
    sys.exit(main())
