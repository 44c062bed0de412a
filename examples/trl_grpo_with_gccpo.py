"""TRL's GRPOTrainer with the gccpo fused loss (and, optionally, the GCCPO causal reward).

Runs offline on a CPU in seconds by default: a tiny random Llama and a character-level tokenizer
are built here, and the "task" is to write digits. Point ``--model`` at a real checkpoint (a local
directory or a Hub id) to train a real model; everything else is TRL's usual setup, since
``GCCPOGRPOTrainer`` takes exactly ``GRPOTrainer``'s arguments and a plain ``GRPOConfig``.

    python examples/trl_grpo_with_gccpo.py                      # fused loss, TRL's default dapo
    python examples/trl_grpo_with_gccpo.py --loss-type grpo --beta 0.04
    python examples/trl_grpo_with_gccpo.py --causal             # + causal reward, token advantages
    python examples/trl_grpo_with_gccpo.py --logprobs-only      # TRL's loss on the gccpo kernel
"""

from __future__ import annotations

import argparse
import string
import tempfile

import torch
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from gccpo.integrations.trl import GCCPOGRPOTrainer, GRPOConfig


def tiny_model(path: str) -> str:
    """Save a random 2-layer Llama (hidden 32) and a character tokenizer to ``path``."""
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for ch in string.ascii_lowercase + string.digits + " +-=?.\n":
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")  # one token per character
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=0, eos_token_id=1, bos_token_id=None, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def digit_reward(completions: list[str], **kwargs) -> list[float]:
    """Fraction of characters that are digits."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint path or Hub id (default: a tiny random Llama)")
    parser.add_argument("--loss-type", default="dapo", choices=["grpo", "bnpo", "dr_grpo", "dapo"])
    parser.add_argument("--beta", type=float, default=0.0, help="KL coefficient (TRL's k3 KL)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--causal", action="store_true", help="add the GCCPO causal reward (token advantages)")
    parser.add_argument("--logprobs-only", action="store_true", help="keep TRL's loss, use the gccpo kernel")
    parser.add_argument("--output-dir", default=None)
    opts = parser.parse_args()

    workdir = tempfile.mkdtemp(prefix="gccpo-trl-")
    model = opts.model or tiny_model(f"{workdir}/model")
    tokenizer = AutoTokenizer.from_pretrained(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dataset = Dataset.from_dict({"prompt": ["1+2=", "7*3=", "9-4=", "2+2="] * 8})
    args = GRPOConfig(output_dir=opts.output_dir or f"{workdir}/out", use_cpu=not torch.cuda.is_available(),
                      bf16=False, report_to="none", gradient_checkpointing=False, num_generations=4,
                      num_iterations=2, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                      max_completion_length=16, max_steps=opts.steps, learning_rate=1e-2, loss_type=opts.loss_type,
                      beta=opts.beta, logging_steps=1, save_strategy="no", seed=0)
    extra = {}
    if opts.causal:
        from gccpo.config import RewardConfig
        from gccpo.episodes import EpisodeConfig

        reward = RewardConfig(eta=0.5, readout="boundary", formulation="spec")  # TRL: spec or mi_floor
        extra = dict(gccpo_causal_reward=True, gccpo_reward=reward,
                     gccpo_episodes=EpisodeConfig(delimiter="tokens", tokens_per_episode=4))
    trainer = GCCPOGRPOTrainer(model=model, reward_funcs=digit_reward, args=args, train_dataset=dataset,
                               processing_class=tokenizer, gccpo_fused_loss=not opts.logprobs_only, **extra)
    print(f"loss path: {trainer.gccpo_loss_path}; config: {trainer.gccpo_loss_config}")
    trainer.train()
    for row in trainer.state.log_history:
        keep = {k: round(v, 4) for k, v in row.items() if isinstance(v, float) and
                (k in ("loss", "reward", "entropy", "kl") or k.startswith(("clip_ratio/region", "gccpo/")))}
        if keep:
            print(keep)


if __name__ == "__main__":
    main()
