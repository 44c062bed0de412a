"""Problems, prompts and verifiers: reasoning-gym tasks and user JSONL files.

A :class:`Task` gives a training stream (resumable through an integer cursor), a held-out
in-distribution eval set, a harder out-of-distribution eval set, chat prompts, and a verifier
``score(completion_text, problem) -> float in [0, 1]``.

- reasoning-gym tasks (``pip install reasoning-gym``) use the dataset's own ``score_answer`` on the
  answer extracted from the completion. The ID eval set is drawn with seed + 1 and de-duplicated;
  the training stream (seed) skips every question of it, so "held out" holds even for tasks with
  small problem spaces. The OOD set (seed + 2) uses the ID parameters overridden by
  ``ood_params`` (more terms, more digits by default).
- ``jsonl``: one ``{"question": ..., "answer": ...}`` object per line; the verifier is exact match
  of the extracted answer after stripping whitespace and a trailing period (case-insensitive).
  A missing, unreadable or malformed file raises :class:`gccpo.config.ConfigError` with its path
  and line (``gccpo-train`` builds the task before it loads the model).

The completion's answer is the text after the last ``Answer:`` (``final answer:`` / ``answer is``
also match); for numeric tasks it is reduced to its last number. Without an answer line
``answer_fallback="last_number"`` scores the completion's last number instead.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .config import ConfigError, TaskConfig, read_user_file

#: In-distribution dataset parameters of the reasoning-gym tasks the trainer knows well.
ID_DEFAULTS: dict[str, dict[str, Any]] = {
    "chain_sum": {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 1},
    "basic_arithmetic": {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2,
                         "operators": ["+", "-", "*"], "allow_parentheses": False},
    "countdown": {"min_numbers": 3, "max_numbers": 4, "min_target": 10, "max_target": 100},
    "gsm_symbolic": {},
    "simple_equations": {"min_terms": 2, "max_terms": 2, "max_value": 20},
    "leg_counting": {"min_animals": 2, "max_animals": 3, "max_instances": 5},
}

#: Overrides of the ID parameters for the harder out-of-distribution eval.
OOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "chain_sum": {"min_terms": 4, "max_terms": 5, "min_digits": 1, "max_digits": 2},
    "basic_arithmetic": {"min_terms": 4, "max_terms": 5, "max_digits": 3},
    "countdown": {"min_numbers": 5, "max_numbers": 6, "min_target": 100, "max_target": 999},
    "gsm_symbolic": {"difficulty": 2.0},
    "simple_equations": {"min_terms": 3, "max_terms": 4, "max_value": 100},
    "leg_counting": {"min_animals": 4, "max_animals": 6, "max_instances": 15},
}

_NUMBER = re.compile(r"-?\d+(?:[.,]\d+)*")
_NUMERIC = re.compile(r"^-?\d+(?:\.\d+)?$")
_ANSWER = re.compile(r"(?:final\s+answer|answer\s+is|answer)\s*(?:is)?\s*[:=：]?\s*([^\n]*)", re.IGNORECASE)


@dataclass
class Problem:
    """One question: its text, its reference answer and the source entry (for the verifier)."""

    question: str
    answer: str
    entry: dict = field(default_factory=dict)


def _clean(text: str) -> str:
    text = text.strip().strip("*$` ").strip()
    text = re.sub(r"^\\boxed\{(.*)\}$", r"\1", text)
    return text.rstrip(".").strip()


def extract_answer(text: str, *, numeric: bool, fallback: str = "last_number") -> str | None:
    """The answer a completion gives: after its last ``Answer:``, else (fallback) its last number.

    For numeric tasks the extracted text is reduced to its last number ("4 + 5 = 9" -> "9",
    "1,234" -> "1234").
    """
    found = [m.group(1) for m in _ANSWER.finditer(text) if m.group(1).strip()]
    answer = _clean(found[-1]) if found else None
    if answer is None and fallback == "last_number":
        numbers = _NUMBER.findall(text)
        answer = numbers[-1] if numbers else None
    if answer is not None and numeric:
        numbers = _NUMBER.findall(answer)
        answer = numbers[-1].replace(",", "") if numbers else answer
    return answer


def is_numeric(answers: Sequence[str]) -> bool:
    """True when every reference answer is a plain (signed, decimal) number."""
    return bool(answers) and all(_NUMERIC.match(str(a).strip()) for a in answers)


class Task:
    """A source of problems with a verifier; build one with :func:`build_task`.

    Attributes:
        name: the task name; ``numeric``: whether all answers are numbers (the causal reward's
            answer tokens are then digits and minus); ``eval_set`` / ``ood_set``: held-out lists.
    """

    def __init__(self, name: str, config: TaskConfig, sample: Callable[[int], Problem],
                 score_fn: Callable[[str | None, Problem], float], eval_set: list[Problem],
                 ood_set: list[Problem], numeric: bool, train_size: int | None = None) -> None:
        self.name = name
        self.config = config
        self._sample = sample
        self._score_fn = score_fn
        self.eval_set = eval_set
        self.ood_set = ood_set
        self.numeric = numeric
        self.train_size = train_size
        # neither eval set is trained on (an OOD range that contains the ID range can repeat
        # training questions: reasoning-gym items are a pure function of seed + index)
        self._held_out = {p.question for p in eval_set} | {p.question for p in ood_set}
        self.cursor = 0

    # -- training stream --------------------------------------------------------------------------

    def next_problems(self, n: int) -> list[Problem]:
        """The next ``n`` training problems (never one of the ID or OOD eval sets); advances ``cursor``."""
        out: list[Problem] = []
        misses = 0
        while len(out) < n:
            problem = self._sample(self.cursor)
            self.cursor += 1
            if problem.question in self._held_out:
                misses += 1
                if misses > 100 * n + 1000:
                    raise RuntimeError(f"task {self.name!r}: the training stream only yields eval "
                                       "questions; make the eval set smaller or the task larger")
                continue
            out.append(problem)
        return out

    # -- prompts and scoring ----------------------------------------------------------------------

    def messages(self, problem: Problem) -> list[dict[str, str]]:
        """Chat messages for a problem (system prompt only when configured)."""
        msgs = []
        if self.config.system_prompt is not None:
            msgs.append({"role": "system", "content": self.config.system_prompt})
        msgs.append({"role": "user", "content": self.config.prompt.replace("{question}", problem.question)})
        return msgs

    def prompt_text(self, problem: Problem, tokenizer: Any) -> str:
        """The prompt string with the tokenizer's chat template (plain text when it has none)."""
        msgs = self.messages(problem)
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return "\n\n".join(m["content"] for m in msgs) + "\n\n"

    def extract(self, text: str) -> str | None:
        return extract_answer(text, numeric=self.numeric, fallback=self.config.answer_fallback)

    def verify(self, answer: str | None, problem: Problem) -> float:
        """The verifier's raw value for an extracted answer (not yet checked or clamped)."""
        return float(self._score_fn(answer, problem))

    def score(self, text: str, problem: Problem) -> float:
        """Outcome reward in [0, 1] of a completion's text."""
        return sanitize_reward(self.verify(self.extract(text), problem))[0]


def sanitize_reward(value: float) -> tuple[float, str | None]:
    """A verifier value as an outcome reward in [0, 1], and what was wrong with it: non-finite
    values score 0 (``"nonfinite"``), values outside [0, 1] are clamped (``"out_of_range"``)."""
    if not math.isfinite(value):
        return 0.0, "nonfinite"
    if not 0.0 <= value <= 1.0:
        return min(max(value, 0.0), 1.0), "out_of_range"
    return value, None


# --------------------------------------------------------------------------------------------
# builders
# --------------------------------------------------------------------------------------------


def _distinct(sample: Callable[[int], Problem], size: int, exclude: set[str] = frozenset()) -> list[Problem]:
    out, seen, i = [], set(exclude), 0
    while len(out) < size and i < 50 * size + 100:
        problem = sample(i)
        i += 1
        if problem.question not in seen:
            seen.add(problem.question)
            out.append(problem)
    return out


def _gym_sampler(name: str, params: dict[str, Any], seed: int, chunk: int = 100_000) -> Callable[[int], Problem]:
    import reasoning_gym

    datasets: dict[int, Any] = {}

    def sample(index: int) -> Problem:
        c = index // chunk
        if c not in datasets:  # reasoning-gym items are a pure function of (seed + index)
            datasets[c] = reasoning_gym.create_dataset(name, seed=seed + 7919 * c, size=chunk, **params)
        entry = datasets[c][index % chunk]
        return Problem(entry["question"], str(entry["answer"]), entry)

    return sample


def _gym_dataset(name: str, params: dict[str, Any], seed: int, option: str) -> Any:
    """A one-problem reasoning-gym dataset; an unknown task or bad parameters raise :class:`ConfigError`."""
    import reasoning_gym

    try:
        return reasoning_gym.create_dataset(name, seed=seed, size=1, **params)
    except (KeyError, TypeError, ValueError, AssertionError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"task.name {name!r} with {option} {params}: {detail}") from None


def _build_gym(config: TaskConfig) -> Task:
    try:
        import reasoning_gym  # noqa: F401 (installed?)
    except ImportError:
        raise ImportError(f"task {config.name!r} comes from reasoning-gym: pip install reasoning-gym "
                          "(or use --task.name jsonl --task.train_file FILE)") from None
    name = config.name
    params = dict(ID_DEFAULTS.get(name, {}) if config.params is None else config.params)
    ood = dict(OOD_DEFAULTS.get(name, {}) if config.ood_params is None else config.ood_params)
    dataset = _gym_dataset(name, params, config.seed, "task.params")  # its verifier; fails early on bad options
    if config.ood_eval_size > 0 and ood:
        _gym_dataset(name, {**params, **ood}, config.seed + 2, "task.ood_params")
    train = _gym_sampler(name, params, config.seed)
    eval_set = _distinct(_gym_sampler(name, params, config.seed + 1), config.eval_size)
    ood_set: list[Problem] = []
    if config.ood_eval_size > 0 and ood:
        # no OOD question repeats an ID eval question (seeds one apart give shifted copies of the
        # same item stream, so overlapping parameter ranges repeat questions)
        ood_set = _distinct(_gym_sampler(name, {**params, **ood}, config.seed + 2), config.ood_eval_size,
                            exclude={p.question for p in eval_set})

    def score(answer: str | None, problem: Problem) -> float:
        return dataset.score_answer(answer, problem.entry)

    numeric = is_numeric([p.answer for p in eval_set[:50]] + [train(i).answer for i in range(20)])
    return Task(name, config, train, score, eval_set, ood_set, numeric)


def load_jsonl(path: str | Path, option: str = "task.train_file") -> list[Problem]:
    """Problems from a JSONL file with ``question`` and ``answer`` fields on every line; a bad
    file or line raises :class:`ConfigError` naming ``path:line`` (``option``: the option that
    named the file, for the message)."""
    problems = []
    for n, line in enumerate(read_user_file(path, option, "a JSONL file").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{n}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(row, dict) or "question" not in row or "answer" not in row:
            raise ConfigError(f"{path}:{n}: each line must be an object with 'question' and 'answer'")
        problems.append(Problem(str(row["question"]), str(row["answer"]), row))
    if not problems:
        raise ConfigError(f"{option} {path}: no problems")
    return problems


def exact_match(answer: str | None, problem: Problem) -> float:
    """1.0 when the extracted answer equals the reference (case-insensitive, trimmed), else 0."""
    if answer is None:
        return 0.0
    return float(_clean(answer).casefold() == _clean(problem.answer).casefold())


def _build_jsonl(config: TaskConfig) -> Task:
    if not config.train_file:
        raise ConfigError("task.name=jsonl needs --task.train_file FILE (and optionally eval_file, ood_file)")
    train = load_jsonl(config.train_file, "task.train_file")
    if config.eval_file:
        eval_set = load_jsonl(config.eval_file, "task.eval_file")[:config.eval_size]
    else:  # hold out the tail of the training file
        k = min(config.eval_size, len(train) // 5)
        train, eval_set = train[:len(train) - k], train[len(train) - k:]
        if not train:
            raise ConfigError(f"task.train_file {config.train_file}: too few problems to hold out an eval set; "
                              "pass task.eval_file")
    ood_set = load_jsonl(config.ood_file, "task.ood_file")[:config.ood_eval_size] if config.ood_file else []
    held = {p.question for p in eval_set}
    train = [p for p in train if p.question not in held] or train
    numeric = is_numeric([p.answer for p in train + eval_set])

    def sample(index: int) -> Problem:
        return train[index % len(train)]

    return Task("jsonl", config, sample, exact_match, eval_set, ood_set, numeric, train_size=len(train))


def build_task(config: TaskConfig) -> Task:
    """The task named by ``config.name`` (a reasoning-gym dataset or ``"jsonl"``)."""
    if config.name == "jsonl":
        return _build_jsonl(config)
    return _build_gym(config)


def outcome_rewards(task: Any, problems: Sequence[Any], texts: Sequence[str],
                    counts: dict[str, int] | None = None) -> torch.Tensor:
    """``[B]`` float32 verifier scores of the completions (``problems[i]`` is row i's problem).

    Never lets one completion stop the run: a verifier that raises scores 0; a non-finite or
    out-of-[0, 1] value scores 0 or is clamped (:func:`gccpo.tasks.sanitize_reward`). When
    ``counts`` is given it gets, over these completions: ``empty`` (no text), ``unparsable`` (no
    answer could be extracted), ``verifier_errors``, ``nonfinite``, ``out_of_range``. A task with
    ``extract`` and ``verify`` (:class:`gccpo.tasks.Task`) has each answer extracted once;
    otherwise its ``score(text, problem)`` is the verifier.
    """
    tally = dict.fromkeys(("empty", "unparsable", "verifier_errors", "nonfinite", "out_of_range"), 0)
    staged = hasattr(task, "extract") and hasattr(task, "verify")
    scores = []
    for text, problem in zip(texts, problems):
        tally["empty"] += not text.strip()
        try:
            if staged:
                answer = task.extract(text)
                tally["unparsable"] += answer is None
                raw = float(task.verify(answer, problem))
            else:
                raw = float(task.score(text, problem))
        except Exception:
            tally["verifier_errors"] += 1
            raw = 0.0
        value, fault = sanitize_reward(raw)
        if fault is not None:
            tally[fault] += 1
        scores.append(value)
    if counts is not None:
        for k, v in tally.items():
            counts[k] = counts.get(k, 0) + v
    return torch.tensor(scores, dtype=torch.float32)
