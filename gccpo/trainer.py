"""The GCCPO training loop (GRPO with ``--algo grpo``), readable top to bottom.

One step (SPEC §7), in :meth:`Trainer.train_step`:

1. sample G completions for each of Q questions (:mod:`gccpo.rollout`);
2. score them with the task's verifier; split them into episodes (:mod:`gccpo.episodes`);
3. one no-grad forward of the policy's backbone to the final hidden states: old_logp with
   :func:`gccpo_kernels.fused_linear_logprobs` (the LM head is never called on the batch), then
   the causal reward of every episode (:mod:`gccpo.rewards`; probe forward + SPEC §3-§4 kernels);
4. token advantages (:func:`gccpo_kernels.token_advantages`; eta = 0 is GRPO);
5. :func:`gccpo_kernels.fused_linear_policy_loss` from the backbone's hidden states and the LM
   head weight, over ``grad_accum`` micro-batches with the whole step's denominators, backward,
   clip, AdamW (``epochs_per_batch`` times on the same batch);
6. log everything (``metrics.jsonl``, tqdm, optional TensorBoard / W&B), evaluate greedily on the
   held-out ID and OOD problems, checkpoint in Hugging Face format.

Checkpoints are trusted only after checking: every file written with one is listed with its
SHA-256 in ``checkpoint.sha256``, ``trainer_state.pt`` holds only tensors and plain data and is
read with ``torch.load(weights_only=True)``, and a resume verifies both before anything is
loaded, falling back from a bad latest checkpoint to the previous complete one (see
:func:`find_checkpoint`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch

import gccpo_kernels as gk

from .checkpoint import (CheckpointError, _first_line, _non_finite, find_checkpoint, plain_state,
                         recover_interrupted_saves, run_folder, write_manifest)
from .config import Config, ConfigError, format_config, resume_config
from .distributed import DataParallel
from .episodes import EpisodeConfig, split_episodes
from .formulations import FORMULATION_NEEDS, FORMULATION_REGISTRY, Readouts, answer_continuations, needs_prior
from .models import load_model, logit_params
from .prefix import shared_prompt_hidden
from .report import RunLog, _print, _progress, format_summary, plot_run
from .probes import (PACKED_ATTENTION, EpisodeIndex, answer_logliks, backbone_of, packed_probe_forward, probe_latents,
                     probe_token_ids)
from .rewards import answer_token_ids
from .rollout import Rollout, VLLMSampler, eos_ids, generate
from .shaping import ShapedAdvantages, advantage_options, gate_episodes, shape_advantages
from .sharding import (Zero3, all_agree, check_lock_step, clip_grad_norm, full_state_dict, gathered_head, head_call,
                       load_optimizer_state_dict, optimizer_state_dict, plan_of, shard_model)
from .stats import normal_interval, wilson_interval
from .tasks import Task, build_task, outcome_rewards
from .tensors import position_ids, unique_prompts

# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------


def _normalizer(loss_agg: str, mask: torch.Tensor) -> float | None:
    """The whole step's loss denominator (so that micro-batch losses add up to the step's loss)."""
    if loss_agg == "token-mean":
        return float(mask.sum().clamp_min(1))
    if loss_agg in ("seq-mean-token-mean", "seq-mean-token-sum"):
        return float(mask.shape[0])
    if loss_agg == "seq-mean-token-sum-norm":
        return float(mask.shape[0] * mask.shape[1])
    return None  # token-sum


def _repeats_prompt(rollout: Rollout) -> bool:
    """Some prompt occurs in several rows (the shared-prompt forward applies)."""
    first, _ = unique_prompts(rollout.prompt_ids, rollout.prompt_mask)
    return first.numel() < rollout.prompt_ids.shape[0] and rollout.completion_ids.shape[1] > 0


def _micro_batches(rollout: Rollout, parts: int, *, share_prompt: bool = True) -> list[tuple[torch.Tensor, int]]:
    """Split a step's rows into ``parts`` micro-batches: ``[(rows [b] int64, width)]``, ``width``
    the longest completion among ``rows`` (the micro-batch's forward runs on ``[b, P + width]``).

    Two candidate splits, the cheaper one in estimated forward tokens (distinct prompts × P, when
    prompts are shared, + rows × width) is taken: contiguous rows (whole groups together, so each
    prompt is encoded once per step) or rows sorted by completion length (short completions no
    longer padded to the longest one of the step). Deterministic: the same rollout, the same plan.
    """
    n = rollout.completion_ids.shape[0]
    parts = max(1, min(parts, n))
    lengths = rollout.completion_mask.sum(1)
    bounds = [round(i * n / parts) for i in range(parts + 1)]

    def split(order: torch.Tensor) -> list[torch.Tensor]:
        return [order[bounds[i]:bounds[i + 1]] for i in range(parts) if bounds[i + 1] > bounds[i]]

    def cost(plan: list[torch.Tensor]) -> int:
        P = rollout.prompt_ids.shape[1]
        total = 0
        for rows in plan:
            prompts = unique_prompts(rollout.prompt_ids[rows], rollout.prompt_mask[rows])[0].numel() \
                if share_prompt else rows.numel()
            total += prompts * P + rows.numel() * int(lengths[rows].max())
        return total

    contiguous = split(torch.arange(n, device=lengths.device))
    by_length = split(torch.sort(lengths, stable=True).indices)
    plan = by_length if n and cost(by_length) < cost(contiguous) else contiguous
    return [(rows, int(lengths[rows].max())) for rows in plan]


def _add_metrics(total: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> None:
    for k, v in new.items():
        v = v.detach().reshape(2)
        if k not in total:
            total[k] = v.clone()
        elif k.endswith("_max"):
            total[k] = torch.stack([torch.maximum(total[k][0], v[0]), total[k][1] + v[1]])
        else:
            total[k] = total[k] + v


# --------------------------------------------------------------------------------------------
# the trainer
# --------------------------------------------------------------------------------------------


class Trainer:
    """GCCPO / GRPO trainer. ``Trainer(config).train()`` runs the whole job.

    ``model``, ``tokenizer`` and ``task`` may be passed in (tests, notebooks); otherwise they are
    built from ``config``. With ``config.train.resume`` the model, optimizer, RNG states, data
    cursor and step are restored from a checkpoint, after it is verified (:func:`find_checkpoint`);
    the optimizer options given on resume are applied (:func:`gccpo.config.resume_config`).
    User errors (options, data files, checkpoints) raise :class:`ConfigError` before the model loads.
    """

    def __init__(self, config: Config, *, model: Any = None, tokenizer: Any = None, task: Task | None = None) -> None:
        self.config = config.validate()
        cfg = self.config
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.dp = DataParallel.from_env(cpu=cfg.model.device == "cpu")  # accelerate launch: a process per device
        self.device = torch.device(cfg.model.device if cfg.model.device != "auto" else
                                   (self.dp.device or ("cuda" if torch.cuda.is_available() else "cpu")))
        resume, state = self._open_checkpoint(cfg.train.resume) if cfg.train.resume else (None, None)
        random.seed(cfg.train.seed + self.dp.rank)  # each process samples its own completions
        torch.manual_seed(cfg.train.seed + self.dp.rank)
        self.run_dir = Path(cfg.train.output_dir or (Path(resume).parent if resume else
                                                     Path("runs") / time.strftime("%Y%m%d-%H%M%S")))
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise ConfigError(f"train.output_dir {str(self.run_dir)!r} is a file, not a directory")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._recover(self.run_dir)
        self.task = task or build_task(cfg.task)  # data errors surface here, before the model loads

        if model is None or resume:
            model, tokenizer = self._load_policy(resume)
        self.model, self.tokenizer = model.to(self.device), tokenizer
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.ref_model = None
        if cfg.loss.beta > 0:  # frozen copy of the initial policy (restored from the checkpoint on resume)
            ref_path = Path(resume) / "reference" if resume else None
            self.ref_model = (load_model(cfg.model, self.device, path=str(ref_path), tokenizer=False)[0] if ref_path
                              else copy.deepcopy(self.model))
            self.ref_model.requires_grad_(False).eval()
            if ref_path:
                _non_finite(self.ref_model, ref_path)
        self.logit_scale, self.softcap = logit_params(self.model.config)
        self._set_up_readout()
        self.episode_config = EpisodeConfig(**dataclasses.asdict(cfg.episodes))
        self.loss_config = gk.PolicyLossConfig(**dataclasses.asdict(cfg.loss))
        # several processes with model.sharding: FSDP / ZeRO-3 (gccpo/sharding.py); the LM head is
        # gathered only for the fused calls (head_call, gathered_head); the reference stays replicated
        self.model = shard_model(self.model, cfg.model.sharding if self.dp.enabled else "none", self.device)
        try:
            check_lock_step(cfg, self.model, [len(self.task.eval_set), len(self.task.ood_set)], self.dp.world_size)
        except ValueError as exc:  # options that would hang a sharded run: a user error
            raise ConfigError(str(exc)) from None
        self._set_up_optimizer()
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.reward.seed + self.dp.rank)
        self.sampler = None
        if cfg.rollout.backend == "vllm":
            self.sampler = VLLMSampler(resume or cfg.model.name, self.tokenizer,
                                       gpu_memory_utilization=cfg.rollout.vllm_gpu_memory_utilization,
                                       seed=cfg.train.seed)
        self.step = 0
        self.skipped_in_row = self.skipped_total = 0
        self.history: list[dict[str, Any]] = []
        self.evals: list[dict[str, Any]] = []
        #: per-problem greedy correctness of each evaluation: {step: {"id": [0/1, ...], "ood": [...]}}
        #: (this process's problems, in eval-set order; paired comparisons use it)
        self.eval_correct: dict[int, dict[str, list[int]]] = {}
        self.run_log = RunLog(self.run_dir)
        if resume:
            self._load_state(state)

    # ---- start-up --------------------------------------------------------------------------------

    def _set_up_readout(self) -> None:
        """The causal reward's answer vocabulary and probe tokens; a formulation that reads the
        answer vocabulary without one (a non-numeric task with ``answer_tokens auto``) is refused
        here, before the first step."""
        cfg = self.config
        self.answer_ids = None
        if not cfg.causal:
            return
        mode = cfg.reward.answer_tokens
        mode = ("digits" if self.task.numeric else "full") if mode == "auto" else mode
        self.answer_ids = answer_token_ids(self.tokenizer, mode)
        if self.answer_ids is not None:
            self.answer_ids = self.answer_ids.to(self.device)
        needs_vocabulary = cfg.reward.formulation == "paper" or (
            cfg.reward.formulation == "info_gain" and cfg.reward.answer_readout == "first_token")
        if needs_vocabulary and self.answer_ids is None:
            raise ConfigError(f"reward.formulation {cfg.reward.formulation} reads the answer vocabulary, and task "
                              f"{self.task.name!r} with reward.answer_tokens {cfg.reward.answer_tokens!r} has none: "
                              "use --reward.answer_tokens digits" + (
                                  " or --reward.answer_readout sequence" if cfg.reward.formulation == "info_gain" else ""))
        self.probe_ids = probe_token_ids(self.tokenizer, cfg.reward)

    def _set_up_optimizer(self) -> None:
        """AdamW over the trainable parameters, the warm-up schedule, and ZeRO-3's step when sharded so."""
        cfg = self.config
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad],
                                           lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                           weight_decay=cfg.optim.weight_decay)
        warm = max(cfg.optim.warmup_steps, 0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
        plan = plan_of(self.model)
        self.zero3 = Zero3(self.model, self.optimizer, cfg.optim.max_grad_norm) \
            if plan is not None and plan.mode == "zero3" else None

    def _recover(self, run: Path) -> None:
        """Clean up after interrupted saves in ``run`` (the main process; the others wait)."""
        if self.dp.is_main:
            for note in recover_interrupted_saves(run):
                _print(f"gccpo: {run}: {note}")
        self.dp.barrier()

    def _open_checkpoint(self, path: str) -> tuple[str, dict[str, Any]]:
        """The verified checkpoint to resume from and its trainer state; reconciles the config
        with the checkpoint's (:func:`gccpo.config.resume_config`) and says what it skipped and
        what it applies."""
        self._recover(run_folder(path))
        folder, state, notes = find_checkpoint(path)
        changes = resume_config(self.config, state.get("config") or {}, str(folder))
        if self.dp.is_main:
            for note in notes:
                _print(f"gccpo: --resume {path}: {note}")
            if notes:
                _print(f"gccpo: resuming from {folder} instead (step {state['step']})")
            if changes:
                _print(f"gccpo: resuming from {folder} with new optimizer options: {'; '.join(changes)}")
        return str(folder), state

    def _load_policy(self, resume: str | None) -> tuple[Any, Any]:
        """The policy and tokenizer from ``model.name`` or the checkpoint ``resume`` (whose weights
        must all be finite)."""
        try:
            model, tokenizer = load_model(self.config.model, self.device, path=resume)
        except OSError as exc:
            if resume:
                raise CheckpointError(f"{resume}: the model cannot be loaded ({_first_line(exc)})") from None
            raise ConfigError(f"model.name {self.config.model.name!r}: cannot load it ({_first_line(exc)})") from None
        if resume:
            _non_finite(model, resume)
        return model, tokenizer

    # ---- the step ---------------------------------------------------------------------------------

    def train_step(self) -> dict[str, float]:
        """One optimizer step (``epochs_per_batch`` of them) on a freshly sampled batch."""
        cfg = self.config
        G, tok = cfg.rollout.num_generations, self.tokenizer
        t0 = time.perf_counter()

        # 1. sample G completions for each of Q questions
        # every process draws the same Q * world questions (one shared cursor) and takes its slice
        problems = self.dp.shard(self.task.next_problems(cfg.rollout.questions_per_step * self.dp.world_size))
        prompts = [self.task.prompt_text(p, tok) for p in problems]
        rollout = self.sample(prompts, G)
        return self.train_on(problems, rollout, started=t0)

    def train_on(self, problems: list[Any], rollout: Rollout, *, started: float | None = None) -> dict[str, float]:
        """Steps 2-6 on a given batch (``rollout.group_index`` indexes ``problems``)."""
        cfg = self.config
        tok = self.tokenizer
        t0 = started if started is not None else time.perf_counter()
        t_sample = time.perf_counter()

        # 2. outcome rewards and episodes
        texts = tok.batch_decode([ids[m] for ids, m in zip(rollout.completion_ids, rollout.completion_mask)],
                                 skip_special_tokens=True)
        rows_problem = [problems[i] for i in rollout.group_index.tolist()]
        faults: dict[str, int] = {}
        rewards = outcome_rewards(self.task, rows_problem, texts, faults).to(self.device)
        episodes = split_episodes(rollout.completion_ids, rollout.completion_mask, tok, self.episode_config)

        # 3. one no-grad forward (probes included): hidden states -> old_logp, episode latents
        old_logp, latents = self.rollout_forward(rollout, episodes)
        t_causal = time.perf_counter()
        causal = self.causal_reward(rollout, episodes, latents, [p.answer for p in rows_problem], rewards) \
            if cfg.causal else None
        t_causal = time.perf_counter() - t_causal if causal is not None else 0.0
        ref_logp = self.policy_logprobs(self.ref_model, rollout) if self.ref_model is not None else None
        t_reward = time.perf_counter()

        # 4. token advantages (eta = 0: GRPO)
        shaped = self.token_advantages(rollout, episodes, rewards, old_logp, causal)

        # 5. fused policy loss, backward, clip, AdamW
        opt_metrics = {}
        for _ in range(cfg.optim.epochs_per_batch):
            opt_metrics = self.optimize(rollout, shaped.total, old_logp, ref_logp)
        t_end = time.perf_counter()

        # 6. metrics
        self.step += 1
        n_tokens = int(rollout.completion_mask.sum())
        metrics: dict[str, float] = {
            "step": self.step, **self.batch_metrics(rollout, episodes, rewards, shaped, old_logp),
            **{f"faults/{k}": v / max(len(texts), 1) for k, v in faults.items()},
            **opt_metrics,
            "perf/sample_s": t_sample - t0,
            "perf/reward_s": t_reward - t_sample,
            "perf/causal_s": t_causal,  # SPEC §3-§5 kernels only (the probe forward is in reward_s)
            "perf/train_s": t_end - t_reward,
            "perf/step_s": t_end - t0,
            "perf/tokens_per_s": n_tokens / max(t_end - t0, 1e-9),
        }
        if causal is not None:
            metrics.update(causal.metrics())
        return metrics

    def token_advantages(self, rollout: Rollout, episodes: Any, rewards: torch.Tensor, old_logp: torch.Tensor,
                         causal: Any) -> ShapedAdvantages:
        """SPEC §6's token advantages ``[B, T]`` through the one shaping path (:mod:`gccpo.shaping`):
        the formulation's episode rewards after the gate, with its advantage options; GRPO's
        outcome advantage alone when ``causal`` is None."""
        cfg = self.config
        K = episodes.num_episodes
        ep_rewards = causal.reward if causal is not None else torch.zeros(
            rollout.completion_ids.shape[0], max(K, 1), device=self.device)
        if causal is not None:
            ep_rewards = gate_episodes(ep_rewards, rewards, rollout.group_index.to(self.device), cfg.reward)
        options = advantage_options(cfg.reward, causal)

        def advantages_with(eta: float) -> torch.Tensor:
            return gk.token_advantages(
                rewards, rollout.group_index, episodes.episode_ids, ep_rewards, old_logp, rollout.completion_mask,
                eta=eta, backend=cfg.train.backend, **options)

        return shape_advantages(advantages_with, cfg.reward.eta if causal is not None else 0.0, cfg.reward)

    def batch_metrics(self, rollout: Rollout, episodes: Any, rewards: torch.Tensor, shaped: ShapedAdvantages,
                      old_logp: torch.Tensor) -> dict[str, float]:
        """What the batch was: rewards and accuracy, episodes, lengths and truncation, the size of the
        advantages and of their process part, and the old-vs-sampling log-prob gap."""
        G = self.config.rollout.num_generations
        advantages, outcome_adv = shaped.total, shaped.outcome
        m = rollout.completion_mask
        n_tokens = int(m.sum())
        process = (advantages - outcome_adv).abs() * m  # [B, T] size of the process part per token
        signed = m & (outcome_adv != 0)  # tokens where the outcome gave a direction
        flips = signed & (advantages * outcome_adv < 0)
        correct = (rewards >= 1.0).float()
        by_group = correct.view(-1, G) if correct.numel() % G == 0 else correct.unsqueeze(0)
        rew_group = rewards.view(-1, G) if rewards.numel() % G == 0 else rewards.unsqueeze(0)
        counts = episodes.episode_counts.float()
        gap = ((old_logp - rollout.sampling_logp).abs() * m).sum() / max(n_tokens, 1) \
            if rollout.sampling_logp is not None else torch.tensor(0.0)
        return {
            "reward/outcome": float(rewards.mean()),
            "reward/accuracy": float(correct.mean()),
            "reward/pass_at_g": float(by_group.max(1).values.mean()),
            "reward/groups_with_signal": float((rew_group.max(1).values > rew_group.min(1).values).float().mean()),
            "episodes/mean": float(counts.mean()),
            "episodes/frac_multi": float((counts >= 2).float().mean()),
            "episodes/max": float(counts.max()) if counts.numel() else 0.0,
            "completion/length": n_tokens / max(m.shape[0], 1),
            "completion/truncated": float(self._truncated(rollout).float().mean()),
            "advantage/abs_mean": float((advantages.abs() * m).sum() / max(n_tokens, 1)),
            # the fraction of completions with a non-zero process part, and its mean size
            "advantage/process_groups": float(process.amax(1).gt(0).float().mean()),
            "advantage/process_abs_mean": float(process.sum() / max(n_tokens, 1)),
            # tokens whose advantage the process part turned against the outcome's sign
            "advantage/sign_flips": float(flips.sum()) / max(int(signed.sum()), 1),
            "check/old_vs_sampling_logp": float(gap),
        }

    # ---- pieces of the step -------------------------------------------------------------------

    def sample(self, prompts: list[str], num_generations: int, *, greedy: bool = False,
               max_new_tokens: int | None = None, progress: str | None = None) -> Rollout:
        r = self.config.rollout
        kwargs = dict(num_generations=num_generations, temperature=r.temperature, top_p=r.top_p,
                      max_new_tokens=max_new_tokens or r.max_new_tokens, greedy=greedy)
        if self.sampler is not None:
            return self.sampler.generate(self.model, prompts, **kwargs)
        with self._autocast():
            # sharded processes must run every layer's gather together: generate with synced_gpus
            lockstep = self.config.model.sharding != "none" and self.dp.world_size > 1
            return generate(self.model, self.tokenizer, prompts,
                            batch_size=r.eval_batch_size if greedy else None, progress=progress,
                            decoder="generate" if lockstep else r.decoder, **kwargs)

    def _truncated(self, rollout: Rollout) -> torch.Tensor:
        """``[B]`` bool: completions that hit the length cap without an EOS."""
        eos = torch.tensor(eos_ids(self.model, self.tokenizer), device=rollout.completion_ids.device)
        return ~(torch.isin(rollout.completion_ids, eos) & rollout.completion_mask).any(1)

    def _autocast(self) -> contextlib.AbstractContextManager:
        mode = self.config.model.autocast
        on = (mode == "bf16") or (mode == "auto" and self.device.type == "cuda" and torch.cuda.is_bf16_supported())
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if on else contextlib.nullcontext()

    def _head(self, model: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        head = model.get_output_embeddings()
        return head.weight, getattr(head, "bias", None)

    def _hidden(self, model: Any, rollout: Rollout) -> torch.Tensor:
        """``[b, P + T, D]`` final hidden states of the backbone (no LM head)."""
        am = rollout.attention_mask
        with self._autocast():
            # each distinct prompt encoded once (gccpo/prefix.py); sharded: all processes or none
            if self.config.train.share_prompt and all_agree(model, _repeats_prompt(rollout)):
                hidden = shared_prompt_hidden(backbone_of(model), rollout.prompt_ids, rollout.prompt_mask,
                                              rollout.completion_ids, rollout.completion_mask)
                if hidden is not None:
                    return hidden
            return backbone_of(model)(input_ids=rollout.input_ids, attention_mask=am,
                                      position_ids=position_ids(am), use_cache=False).last_hidden_state

    def _micro_batches_of(self, rollout: Rollout) -> list[tuple[torch.Tensor, int]]:
        """This step's micro-batches: :func:`_micro_batches` with the configured ``grad_accum``."""
        return _micro_batches(rollout, self.config.optim.grad_accum, share_prompt=self.config.train.share_prompt)

    def _completion_hidden(self, model: Any, hidden: torch.Tensor, rollout: Rollout) -> torch.Tensor:
        """Hidden states that predict the completion tokens, aligned with them: ``[b, T, D]``, in
        the LM head's dtype."""
        P, T = rollout.prompt_ids.shape[1], rollout.completion_ids.shape[1]
        weight, _ = self._head(model)
        h = hidden[:, P - 1:P + T - 1]
        return h if h.dtype == weight.dtype else h.to(weight.dtype)

    def _logprobs(self, model: Any, hidden: torch.Tensor, part: Rollout) -> torch.Tensor:
        targets = part.completion_ids.masked_fill(~part.completion_mask, -100)
        with gathered_head(model) as (weight, bias):  # sharded: the full head for this call only
            logp, _ = gk.fused_linear_logprobs(self._completion_hidden(model, hidden, part), weight, targets,
                                               bias=bias, temperature=self.config.rollout.temperature,
                                               logit_scale=self.logit_scale, softcap=self.softcap,
                                               backend=self.config.train.backend)
        return logp.float()

    @torch.no_grad()
    def policy_logprobs(self, model: Any, rollout: Rollout) -> torch.Tensor:
        """``[B, T]`` log-probs of the sampled tokens under ``model`` (no grad, micro-batched):
        :func:`gccpo_kernels.fused_linear_logprobs` on the backbone's hidden states and the LM
        head weight (the LM head itself is never called)."""
        model.eval()
        out = torch.zeros(rollout.completion_ids.shape, device=rollout.completion_ids.device)
        for rows, width in self._micro_batches_of(rollout):
            part = rollout.select(rows, width)
            out[rows, :width] = self._logprobs(model, self._hidden(model, part), part)
        return out

    @torch.no_grad()
    def rollout_forward(self, rollout: Rollout, episodes: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The step's one no-grad policy forward: ``(old_logp [B, T], episode latents [R, D] or None)``.

        With the causal reward, the latents are read at the probe appended after each episode
        (packed into the same forward with a 4D mask when the attention implementation takes one,
        else one extra forward per probe batch) or at the episode's last token (``boundary``);
        rows follow :meth:`EpisodeIndex.of`.
        """
        cfg = self.config
        self.model.eval()
        P = rollout.prompt_ids.shape[1]
        packed = cfg.causal and cfg.reward.readout == "probe" and \
            getattr(self.model.config, "_attn_implementation", "sdpa") in PACKED_ATTENTION
        old_logp = torch.zeros(rollout.completion_ids.shape, device=rollout.completion_ids.device)
        K = episodes.episode_ends.shape[1]
        per_row = None  # [B, K, D] latents at every episode's readout position
        for rows, width in self._micro_batches_of(rollout):
            part, ends = rollout.select(rows, width), episodes.episode_ends[rows]
            at = None
            if packed:
                share = self.config.train.share_prompt and all_agree(self.model, _repeats_prompt(part))
                with self._autocast():
                    hidden, at = packed_probe_forward(self.model, part.input_ids, part.attention_mask,
                                                      P, ends, self.probe_ids, share_prompt=share)
            else:
                hidden = self._hidden(self.model, part)
                if cfg.causal and cfg.reward.readout == "boundary":
                    at = hidden.gather(1, (P + ends.clamp_min(0)).unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
            if at is not None:
                if per_row is None:
                    per_row = at.new_zeros(rollout.completion_ids.shape[0], K, at.shape[-1])
                per_row[rows] = at
            old_logp[rows, :width] = self._logprobs(self.model, hidden, part)
        if not cfg.causal:
            return old_logp, None
        index = EpisodeIndex.of(episodes)
        if per_row is not None:
            return old_logp, per_row[index.rows, index.ks]
        latents = probe_latents(self.model, rollout.input_ids, rollout.attention_mask, P, index, self.probe_ids,
                                batch_size=cfg.reward.probe_batch_size, autocast=self._autocast)
        return old_logp, latents

    @torch.no_grad()
    def causal_reward(self, rollout: Rollout, episodes: Any, latents: torch.Tensor,
                      answers: list[str] | None = None, outcome: torch.Tensor | None = None) -> Any:
        """Episode rewards ``[B, K]`` (and their parts) from the episode latents, by the configured
        formulation (:mod:`gccpo.formulations`); ``answers``: each row's reference answer (read
        by ``info_gain``, with one extra probe forward of every question's prompt, and with
        ``answer_readout = "sequence"`` one of every episode and prompt with the answer appended);
        ``outcome``: ``[B]`` the verifier's rewards (read by ``paper``)."""
        rc = self.config.reward
        index = EpisodeIndex.of(episodes)
        B = rollout.completion_ids.shape[0]
        needs = FORMULATION_NEEDS[rc.formulation]
        if "outcome" in needs and outcome is None:
            raise ValueError(f"reward.formulation {rc.formulation} needs each row's outcome reward")
        extra: dict[str, Any] = {"outcome": outcome}
        if needs_prior(rc.formulation):
            if answers is None:
                raise ValueError(f"reward.formulation {rc.formulation} needs each row's reference answer")
            extra.update(self._answer_readouts(rollout, index, answers))
        with gathered_head(self.model) as (weight, bias):
            readouts = Readouts(latents, index, rollout.group_index, (B, max(episodes.num_episodes, 1)), weight, bias,
                                rc, logit_scale=self.logit_scale, softcap=self.softcap, answer_ids=self.answer_ids,
                                generator=self.generator, backend=self.config.train.backend, **extra)
            return FORMULATION_REGISTRY[rc.formulation](readouts)

    def _answer_readouts(self, rollout: Rollout, index: EpisodeIndex, answers: list[str]) -> dict[str, Any]:
        """The readouts right after each prompt (one probe sequence per question, shared by its rows)
        and the reference answers' tokens after the probe; with ``answer_readout = "sequence"`` the
        whole answer's log-likelihood after every episode's probe and after the prompt's."""
        rc = self.config.reward
        B, device = rollout.completion_ids.shape[0], rollout.completion_ids.device
        groups, row_group = torch.unique(rollout.group_index.to(device), return_inverse=True)
        first_row = torch.full((len(groups),), B, dtype=torch.long, device=device).scatter_reduce(
            0, row_group, torch.arange(B, device=device), "amin")
        at_prompt = EpisodeIndex(first_row, torch.zeros_like(first_row), torch.full_like(first_row, -1))
        tails = answer_continuations(self.tokenizer, rc.probe_text, self.probe_ids, answers)
        first = torch.tensor([t[0] if t else -1 for t in tails], dtype=torch.long)
        args = (self.model, rollout.input_ids, rollout.attention_mask, rollout.prompt_ids.shape[1])
        if rc.answer_readout == "sequence":  # unsharded (Config.validate): the head is the model's own
            weight, bias = self._head(self.model)
            kw = dict(temperature=rc.readout_temperature, logit_scale=self.logit_scale, softcap=self.softcap,
                      batch_size=rc.probe_batch_size, autocast=self._autocast, backend=self.config.train.backend)
            return {"answer_first": first,
                    "answer_loglik": answer_logliks(*args, index, self.probe_ids, tails, weight, bias, **kw),
                    "prior_loglik": answer_logliks(*args, at_prompt, self.probe_ids, tails, weight, bias,
                                                   **kw)[row_group]}
        prior = probe_latents(*args, at_prompt, self.probe_ids, batch_size=rc.probe_batch_size,
                              autocast=self._autocast)[row_group]
        return {"answer_first": first, "prior_latents": prior}

    def optimize(self, rollout: Rollout, advantages: torch.Tensor, old_logp: torch.Tensor,
                 ref_logp: torch.Tensor | None) -> dict[str, float]:
        """One AdamW step over ``grad_accum`` micro-batches with the whole batch's denominators.

        (62 lines, kept whole: the micro-batch loop, the skip on a non-finite gradient and the clip
        must read in order, and each piece alone would only be called here.)"""
        cfg = self.config
        self.model.train()
        normalizer = _normalizer(cfg.loss.loss_agg, rollout.completion_mask)
        self.optimizer.zero_grad(set_to_none=True)
        total_loss, metrics = 0.0, {}
        micro = self._micro_batches_of(rollout)
        for i, (rows, width) in enumerate(micro):
            part = rollout.select(rows, width)
            hidden = self._hidden(self.model, part)
            h = self._completion_hidden(self.model, hidden, part)

            def policy_loss(weight: torch.Tensor, bias: torch.Tensor | None, h: torch.Tensor) -> Any:
                return gk.fused_linear_policy_loss(
                    h, weight if weight.dtype == h.dtype else weight.to(h.dtype), part.completion_ids,
                    advantages[rows, :width], part.completion_mask, old_logp=old_logp[rows, :width],
                    ref_logp=None if ref_logp is None else ref_logp[rows, :width], bias=bias,
                    temperature=cfg.rollout.temperature, logit_scale=self.logit_scale, softcap=self.softcap,
                    config=self.loss_config, normalizer=normalizer, backend=cfg.train.backend)

            # sharded: the head weight is gathered for this call (and its backward) only, and its
            # gradient is reduced into the shards (gccpo/sharding.py)
            out = head_call(self.model, policy_loss, h)
            if self.zero3 is not None:
                self.zero3.backward(out.loss, last=i == len(micro) - 1)
            else:
                out.loss.backward()
            total_loss += float(out.loss.detach())
            _add_metrics(metrics, out.metrics)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.zero3 is not None:  # DeepSpeed reduces, clips (global norm) and steps
            grad_norm = self.zero3.step(math.isfinite(total_loss))
            finite = math.isfinite(grad_norm) and math.isfinite(total_loss)
        else:
            self.dp.average_gradients(params)  # replicated: mean over processes, before clipping (FSDP: done)
            # global norm (over the shards under FSDP); clipping scales by a NaN factor on non-finite
            # grads: skipped below
            grad_norm = clip_grad_norm(params, cfg.optim.max_grad_norm)
            finite = math.isfinite(grad_norm) and math.isfinite(total_loss)
        if finite:
            if self.zero3 is None:
                self.optimizer.step()
            self.scheduler.step()
            self.skipped_in_row = 0
        else:  # never let a non-finite loss or gradient reach the weights or the optimizer state
            self.skipped_in_row += 1
            self.skipped_total += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.model.eval()
        if not finite and self.skipped_in_row > cfg.optim.max_skipped_steps:
            raise RuntimeError(
                f"step {self.step + 1}: {self.skipped_in_row} optimizer steps in a row had a non-finite loss "
                f"({total_loss}) or gradient norm ({grad_norm}) and were skipped (optim.max_skipped_steps = "
                f"{cfg.optim.max_skipped_steps}); lower optim.lr, check the data, or raise the limit")
        reduced = gk.reduce_metrics(metrics)
        out_metrics = {"loss": total_loss, "optim/grad_norm": grad_norm,
                       "optim/lr": self.scheduler.get_last_lr()[0], "optim/skipped": float(not finite),
                       "optim/skipped_total": float(self.skipped_total)}
        out_metrics.update({f"policy/{k}": float(v) for k, v in reduced.items()})
        return out_metrics

    # ---- evaluation -------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Greedy accuracy (with 95% Wilson intervals) on the held-out ID and OOD problems."""
        out: dict[str, float] = {"step": self.step}
        for split, all_problems in (("id", self.task.eval_set), ("ood", self.task.ood_set)):
            if not all_problems:
                continue
            problems = self.dp.shard(all_problems)  # data parallel: each process its slice, counts summed
            prompts = [self.task.prompt_text(p, self.tokenizer) for p in problems]
            bar = f"eval {split} (step {self.step})" if self._show_progress else None
            r = self.sample(prompts, 1, greedy=True, max_new_tokens=self.config.rollout.eval_max_new_tokens,
                            progress=bar)
            texts = self.tokenizer.batch_decode([ids[m] for ids, m in zip(r.completion_ids, r.completion_mask)],
                                                skip_special_tokens=True)
            scores = outcome_rewards(self.task, problems, texts)
            eps = split_episodes(r.completion_ids, r.completion_mask, self.tokenizer, self.episode_config)
            self.eval_correct.setdefault(self.step, {})[split] = (scores >= 1.0).int().tolist()
            k, n, ep_sum, len_sum = self.dp.sum([float((scores >= 1.0).sum()), len(problems),
                                                 float(eps.episode_counts.float().sum()),
                                                 float(r.completion_mask.sum())])
            k, n = int(k), int(n)
            lo, hi = wilson_interval(k, n)
            out.update({f"eval/{split}_accuracy": k / n, f"eval/{split}_ci_low": lo, f"eval/{split}_ci_high": hi,
                        f"eval/{split}_n": n, f"eval/{split}_episodes": ep_sum / n,
                        f"eval/{split}_length": len_sum / n})
            if split == "id" and self.dp.is_main:
                (self.run_dir / f"eval_samples_step{self.step}.txt").write_text("\n\n=====\n\n".join(
                    f"Q: {p.question}\nREF: {p.answer}  SCORE: {s:.2f}\n{t}"
                    for p, t, s in list(zip(problems, texts, scores.tolist()))[:20]))
        return out

    # ---- the job ------------------------------------------------------------------------------------

    def train(self) -> dict[str, Any]:
        """Evaluate, train ``train.steps`` steps (evaluating / saving periodically), evaluate, summarize."""
        cfg = self.config.train
        if self.dp.is_main:
            (self.run_dir / "config.yaml").write_text(format_config(self.config))
            self._open_loggers()
        if cfg.eval_before and self.step == 0 and not self.evals:
            self._log_eval(self.evaluate())
        bar = _progress(range(self.step, cfg.steps), self._show_progress, initial=self.step, total=cfg.steps)
        for _ in bar:
            metrics = self.dp.mean_metrics(self.train_step())
            self._log(metrics)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(reward=f"{metrics['reward/outcome']:.2f}", acc=f"{metrics['reward/accuracy']:.2f}",
                                eps=f"{metrics['episodes/mean']:.1f}", s=f"{metrics['perf/step_s']:.0f}")
            last = self.step == cfg.steps
            if cfg.eval_every and self.step % cfg.eval_every == 0 and not last:
                self._log_eval(self.evaluate())
            if (cfg.save_every and self.step % cfg.save_every == 0) or (last and cfg.save_final):
                self.save()
        if not self.evals or self.evals[-1]["step"] != self.step:
            self._log_eval(self.evaluate())
        summary = self.summary()
        if self.dp.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            print(format_summary(summary))
            self.plot()
        self.run_log.close()
        return summary

    def summary(self) -> dict[str, Any]:
        # "before" only when the initial model was evaluated (train.eval_before; gccpo-compare
        # evaluates it once for all its runs)
        first = self.evals[0] if self.evals and self.evals[0]["step"] == 0 else {}
        last = self.evals[-1] if self.evals else {}
        hist = self.history
        tail = hist[-5:]
        mean = (lambda rows, k: sum(r.get(k, 0.0) for r in rows) / max(len(rows), 1))
        # before -> after per problem (the same problems, greedy): a paired 95% interval of the change
        # (data parallel: each process holds its slice of the problems; count, sum and sum of squares
        # of the differences are added up over the processes)
        change = {}
        if first and last is not first and last.get("step") == self.step:
            for split in ("id", "ood"):
                start = self.eval_correct.get(0, {}).get(split)
                end = self.eval_correct.get(self.step, {}).get(split)
                d = [a - b for a, b in zip(end, start)] if start is not None and end is not None else []
                n, total, total_sq = self.dp.sum([len(d), sum(d), sum(x * x for x in d)])
                if n:
                    change[split] = normal_interval(int(n), total, total_sq)
        return {"algo": self.config.algo, "task": self.task.name, "steps": self.step, "run_dir": str(self.run_dir),
                "before": first, "after": last, "change": change,
                "train_reward_first5": mean(hist[:5], "reward/outcome"),
                "train_reward_last5": mean(tail, "reward/outcome"),
                "episodes_mean": mean(hist, "episodes/mean"), "episodes_frac_multi": mean(hist, "episodes/frac_multi"),
                "step_seconds": mean(hist, "perf/step_s")}

    # ---- logging ----------------------------------------------------------------------------------

    def _open_loggers(self) -> None:
        self.run_log.open(self.config.train.report_to, self.config.train.wandb_project, self.config.to_dict())

    @property
    def _show_progress(self) -> bool:
        return bool(self.config.train.progress) and self.dp.is_main

    def _write(self, row: dict[str, Any]) -> None:
        if self.dp.is_main:  # data parallel: metrics are already averaged over the processes
            self.run_log.write(row)

    def _log(self, metrics: dict[str, Any]) -> None:
        self.history.append(metrics)
        self._write(metrics)

    def _log_eval(self, metrics: dict[str, Any]) -> None:
        self.evals.append(metrics)
        self._write(metrics)
        if not self.dp.is_main:
            return
        parts = [f"{s.upper()} {metrics[f'eval/{s}_accuracy']:.3f} [{metrics[f'eval/{s}_ci_low']:.3f}, "
                 f"{metrics[f'eval/{s}_ci_high']:.3f}] (n={metrics[f'eval/{s}_n']})"
                 for s in ("id", "ood") if f"eval/{s}_accuracy" in metrics]
        _print(f"[eval step {metrics['step']}] greedy accuracy: " + "; ".join(parts))

    def plot(self) -> Path | None:
        """``<run>/plots.png`` (:func:`gccpo.report.plot_run`), unless ``train.plots`` is off."""
        if not self.config.train.plots:
            return None
        return plot_run(self.history, self.evals, self.run_dir / "plots.png")

    # ---- checkpoints ------------------------------------------------------------------------------

    def save(self) -> Path:
        """``<run>/checkpoint-<step>``: the model (``save_pretrained``), tokenizer, trainer state
        (optimizer, scheduler, every RNG, the data cursor, the history: tensors and plain data
        only, :func:`plain_state`) and ``checkpoint.sha256`` (every file's SHA-256, written last).

        Atomic: everything is written into ``<run>/.checkpoint-<step>.partial`` and renamed into
        place only when complete, so a run killed at any moment leaves either the previous
        checkpoints or the new one, never a half-written one (``--resume`` skips dot-folders, and
        the next start removes them or completes an interrupted swap: :func:`recover_interrupted_saves`).
        """
        path = self.run_dir / f"checkpoint-{self.step}"
        # sharded: every process takes part in gathering the full weights and optimizer state
        model_state, optim_state = full_state_dict(self.model), optimizer_state_dict(self.model, self.optimizer)
        if not self.dp.is_main:  # replicated: the same weights everywhere; sharded: gathered above
            self.dp.barrier()
            return path
        partial = self.run_dir / f".checkpoint-{self.step}.partial"
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
        self.model.save_pretrained(partial, state_dict=model_state)
        self.tokenizer.save_pretrained(partial)
        if self.ref_model is not None:
            self.ref_model.save_pretrained(partial / "reference")
        state = plain_state({
            "step": self.step, "task_cursor": self.task.cursor, "config": self.config.to_dict(),
            "optimizer": optim_state, "scheduler": self.scheduler.state_dict(),
            "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "python_rng": random.getstate(), "history": self.history, "evals": self.evals,
            "skipped_in_row": self.skipped_in_row, "skipped_total": self.skipped_total,
        })
        torch.save(state, partial / "trainer_state.pt")
        write_manifest(partial)  # last: a folder without it is incomplete
        if path.exists():  # re-saving a step (e.g. after a resume): swap, then drop the old one
            old = self.run_dir / f".checkpoint-{self.step}.old"
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
            os.replace(partial, path)
            shutil.rmtree(old)
        else:
            os.replace(partial, path)
        self.dp.barrier()
        return path

    def _load_state(self, state: dict[str, Any]) -> None:
        """Restore the step, data cursor, optimizer, scheduler and RNG states from a verified
        trainer state, then apply the configured optimizer options to the restored optimizer."""
        self.step = int(state["step"])
        self.task.cursor = int(state["task_cursor"])
        load_optimizer_state_dict(self.model, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        random.setstate(state["python_rng"])
        if self.dp.rank:  # the checkpoint holds rank 0's RNG states: re-derive the others' from it
            seed = self.config.train.seed + self.dp.rank + 7919 * self.step
            random.seed(seed)
            torch.manual_seed(seed)
            self.generator.manual_seed(self.config.reward.seed + seed)
        self.history = list(state.get("history", []))
        self.skipped_in_row = int(state.get("skipped_in_row", 0))
        self.skipped_total = int(state.get("skipped_total", 0))
        self.evals = list(state.get("evals", []))
        self._apply_optim_config()

    def _apply_optim_config(self) -> None:
        """Set ``optim.lr`` / ``betas`` / ``weight_decay`` on the (restored) optimizer and the
        scheduler's base learning rate, and the current learning rate from the schedule, so that
        an override given on resume is what trains (``max_grad_norm`` and ``warmup_steps`` are read
        from the config every step)."""
        o, groups = self.config.optim, self.optimizer.param_groups
        for group in groups:
            group.update(betas=tuple(o.betas), weight_decay=o.weight_decay, initial_lr=o.lr)
        self.scheduler.base_lrs = [o.lr] * len(groups)
        lrs = [o.lr * fn(self.scheduler.last_epoch) for fn in self.scheduler.lr_lambdas]
        for group, lr in zip(groups, lrs):
            group["lr"] = lr
        self.scheduler._last_lr = lrs


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------
