"""gccpo.models: the one logit transform the trainer and the TRL integration read."""

from __future__ import annotations

import pytest

from gccpo.models import logit_params


class _Cfg:
    def __init__(self, **kw):
        self.model_type = kw.pop("model_type", "llama")
        self.__dict__.update(kw)


class _Wrapper(_Cfg):
    def __init__(self, text, **kw):
        super().__init__(**kw)
        self.text = text

    def get_text_config(self):
        return self.text


@pytest.mark.parametrize("cfg, want", [
    (_Cfg(), (1.0, None)),
    (_Cfg(logit_scale=0.0625), (0.0625, None)),                          # Cohere multiplies
    (_Cfg(output_multiplier=2.5), (2.5, None)),
    (_Cfg(lm_head_multiplier=0.5), (0.5, None)),                          # Falcon-H1
    (_Cfg(logits_scaling=8.0), (0.125, None)),                            # Granite divides
    (_Cfg(logits_scaling=8.0, model_type="hyperclovax"), (8.0, None)),    # HyperCLOVA X multiplies
    (_Cfg(final_logit_softcapping=30.0), (1.0, 30.0)),                    # Gemma caps
    (_Cfg(logit_scale=2.0, logits_scaling=8.0), (2.0, None)),             # logit_scale first, as TRL
    (_Wrapper(_Cfg(final_logit_softcapping=30.0, logit_scale=0.5)), (0.5, 30.0)),  # the text config
    (_Cfg(logit_scale=0.0, logits_scaling=0, final_logit_softcapping=0.0), (1.0, None)),  # 0: not set
], ids=["plain", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling",
        "hyperclovax", "softcap", "order", "text_config", "zeros"])
def test_logit_params(cfg, want):
    assert logit_params(cfg) == want


def test_trl_reads_the_same_transform():
    pytest.importorskip("trl")
    from gccpo.integrations.trl import logit_transform

    class _Model:
        config = _Wrapper(_Cfg(lm_head_multiplier=0.25, final_logit_softcapping=15.0))

    assert logit_transform(_Model()) == logit_params(_Model.config) == (0.25, 15.0)
