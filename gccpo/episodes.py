"""Splitting tokenized completions into episodes (reasoning steps), SPEC §6.

An episode boundary is found in the *text* and mapped back to *tokens*: for every match of the
delimiter pattern, the episode ends after the token that holds the match's last character. A
delimiter that sits inside a multi-character token (byte-level BPE merges "\\n\\n " or ".\\n\\n" into
one token) or that spans two tokens ("\\n" + "\\n") therefore cuts after the right token. Where the
character is not covered by any token (tokenizers that trim whitespace from their offsets), the
cut goes after the last token that starts before it.

Then:
- an episode whose tokens are all whitespace or special tokens (a run of blank lines, a trailing
  EOS) is merged into the episode before it (a leading one into the episode after it), so that no
  episode is empty of content (``merge_blank``);
- at most ``max_episodes`` episodes are kept: the tail merges into the last one.

Token offsets come from the tokenizer: a fast (Rust) tokenizer re-encodes the decoded text with
offsets, which are used when the ids round-trip exactly; otherwise (slow tokenizers, completions
whose sampled tokenization is not the canonical one) the text is decoded incrementally, token by
token with a short context window, as streaming detokenizers do.

Delimiters (``EpisodeConfig.delimiter``):
- ``"blank_line"`` (default): a line break, optional spaces/tabs, a line break;
- ``"newline"``: every line break;
- ``"sentence"``: sentence-final punctuation followed by whitespace (the cut goes after the
  punctuation, so that the space, which byte-level BPE attaches to the next word, starts the next
  episode), and every line break. For models such as SmolLM2 that often answer on one line;
- ``"regex"``: ``EpisodeConfig.pattern``, any Python regular expression (a zero-width match at
  position p cuts before character p);
- ``"tokens"``: a fixed number of tokens per episode (no tokenizer needed).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

PRESETS: dict[str, str] = {
    "blank_line": r"\n[ \t\r]*\n",
    "newline": r"\n",
    "sentence": r"[.!?][\"')\]]*(?=\s)|\n",
}
DELIMITERS = (*PRESETS, "regex", "tokens")


@dataclass(frozen=True)
class EpisodeConfig:
    """How completions are split into episodes.

    Attributes:
        delimiter: ``"blank_line"``, ``"newline"``, ``"sentence"``, ``"regex"`` or ``"tokens"``.
        pattern: the regular expression for ``delimiter="regex"``.
        tokens_per_episode: episode length for ``delimiter="tokens"``.
        max_episodes: K_max; the tail beyond it merges into the last episode.
        merge_blank: merge episodes made only of whitespace / special tokens into a neighbour.
    """

    delimiter: str = "blank_line"
    pattern: str | None = None
    tokens_per_episode: int = 64
    max_episodes: int = 16
    merge_blank: bool = True

    def __post_init__(self) -> None:
        if self.delimiter not in DELIMITERS:
            raise ValueError(f"delimiter must be one of {DELIMITERS}, got {self.delimiter!r}")
        if self.delimiter == "regex":
            if not isinstance(self.pattern, str) or not self.pattern:
                raise ValueError(f"pattern must be a regular expression with delimiter='regex', got {self.pattern!r}")
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"pattern must be a valid regular expression ({exc}), got {self.pattern!r}") from None
        elif self.pattern is not None:
            raise ValueError(f"pattern must be None unless delimiter is 'regex' (it is {self.delimiter!r}), "
                             f"got {self.pattern!r}")
        if not isinstance(self.merge_blank, bool):
            raise ValueError(f"merge_blank must be true or false, got {self.merge_blank!r}")
        if not isinstance(self.max_episodes, int) or self.max_episodes < 1:
            raise ValueError(f"max_episodes must be an int >= 1, got {self.max_episodes!r}")
        if not isinstance(self.tokens_per_episode, int) or self.tokens_per_episode < 1:
            raise ValueError(f"tokens_per_episode must be an int >= 1, got {self.tokens_per_episode!r}")

    def compiled(self) -> re.Pattern[str]:
        """The delimiter as a compiled regular expression (not for ``"tokens"``)."""
        if self.delimiter == "tokens":
            raise ValueError("delimiter='tokens' splits by count, not by a pattern")
        return re.compile(self.pattern if self.delimiter == "regex" else PRESETS[self.delimiter])


@dataclass
class Episodes:
    """Episodes of a padded batch of completions.

    Attributes:
        episode_ids: ``[B, T]`` int64, the episode of each completion token (contiguous from 0),
            -1 outside the completion (padding, prompt).
        episode_ends: ``[B, K]`` int64, the position in [0, T) of the last token of episode k, -1
            where the completion has fewer episodes. K is the largest count in the batch (or
            ``pad_to``).
        episode_counts: ``[B]`` int64, episodes per completion (0 for an empty completion).
    """

    episode_ids: torch.Tensor
    episode_ends: torch.Tensor
    episode_counts: torch.Tensor

    @property
    def num_episodes(self) -> int:
        """K, the width of ``episode_ends`` (and of the episode rewards the batch needs)."""
        return self.episode_ends.shape[1]

    def to(self, device: torch.device | str) -> "Episodes":
        return Episodes(self.episode_ids.to(device), self.episode_ends.to(device),
                        self.episode_counts.to(device))


# --------------------------------------------------------------------------------------------
# text + token spans -> cut positions
# --------------------------------------------------------------------------------------------


def episode_cuts(text: str, spans: Sequence[tuple[int, int]], config: EpisodeConfig, *,
                 special: Sequence[bool] | None = None) -> list[int]:
    """Token indices after which an episode ends (the completion's last token excluded).

    Args:
        text: the completion's text.
        spans: ``(start, end)`` character span of each of its tokens in ``text`` (empty spans for
            tokens that print nothing on their own, e.g. the first byte of a split character).
        config: the delimiter, ``merge_blank`` and ``max_episodes``.
        special: per token, True for special tokens (EOS ...), which count as blank.

    Returns:
        Sorted token indices c_0 < c_1 < ... < n - 1: episode k is tokens (c_{k-1}, c_k], the last
        episode runs to the end. At most ``max_episodes - 1`` cuts.
    """
    n = len(spans)
    if n == 0:
        return []
    if config.delimiter == "tokens":
        cuts = list(range(config.tokens_per_episode - 1, n - 1, config.tokens_per_episode))
        return cuts[:config.max_episodes - 1]
    starts, ends = _monotone(spans)
    last_chars = np.fromiter((m.end() - 1 for m in config.compiled().finditer(text)), dtype=np.int64)
    # the token holding each delimiter's last character, or the last token starting before it
    owners = np.searchsorted(starts, last_chars, side="right") - 1
    cuts = sorted(set(owners[(owners >= 0) & (owners < n - 1)].tolist()))
    if config.merge_blank:
        first, stop = starts.tolist(), ends.tolist()

        def is_blank(a: int, b: int) -> bool:  # tokens a..b, both included
            if not text[first[a]:stop[b]].strip():
                return True
            if special is None or not any(special[a:b + 1]):
                return False
            return all(special[j] or not text[first[j]:stop[j]].strip() for j in range(a, b + 1))

        cuts = _merge_blank(cuts, n, is_blank)
    return cuts[:config.max_episodes - 1]


def _monotone(spans: Sequence[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Starts made non-decreasing (special tokens may report (0, 0) mid-text), ends >= starts."""
    arr = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    starts = np.maximum.accumulate(arr[:, 0])
    return starts, np.maximum(arr[:, 1], starts)


def _merge_blank(cuts: list[int], n: int, is_blank: Callable[[int, int], bool]) -> list[int]:
    """Drop cuts so that no episode is blank: a blank episode joins the one before it, a leading
    blank episode joins the one after it, an all-blank completion is one episode."""
    kept_ends: list[int] = []
    start = 0
    for end in [*cuts, n - 1]:
        blank = is_blank(start, end)
        if blank and kept_ends:
            kept_ends[-1] = end
        elif not blank:
            kept_ends.append(end)
        start = end + 1
    return kept_ends[:-1]


# --------------------------------------------------------------------------------------------
# tokenizer -> text + token spans
# --------------------------------------------------------------------------------------------


def _decode(tokenizer: Any, ids: list[int]) -> str:
    try:
        return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    except TypeError:  # a minimal tokenizer: decode(ids) only
        return tokenizer.decode(ids)


def incremental_spans(tokenizer: Any, ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
    """Text and per-token character spans by decoding token by token.

    Each step decodes a window of a few tokens with and without the new token and attributes the
    difference to it; a token that completes no character yet (the first bytes of a multi-byte
    character print U+FFFD) gets an empty span and its character goes to the token completing it.
    The window keeps SentencePiece's leading-space handling right. Cost: two decodes per token.
    """
    text = ""
    spans: list[tuple[int, int]] = []
    prefix = read = 0
    pending = 0  # first token not yet given a span
    for j in range(len(ids)):
        before = _decode(tokenizer, ids[prefix:read]) if read > prefix else ""
        after = _decode(tokenizer, ids[prefix:j + 1])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            start = len(text)
            text += after[len(before):]
            spans.extend([(start, start)] * (j - pending))
            spans.append((start, len(text)))
            pending = j + 1
            prefix, read = read, j + 1
    spans.extend([(len(text), len(text))] * (len(ids) - pending))
    return text, spans


def _special_ids(tokenizer: Any) -> set[int]:
    ids = getattr(tokenizer, "all_special_ids", None)
    return set(int(i) for i in ids) if ids else set()


def token_spans(tokenizer: Any, rows: list[list[int]]) -> list[tuple[str, list[tuple[int, int]]]]:
    """``(text, spans)`` for each row of token ids.

    A fast tokenizer decodes the batch, then re-encodes it with offsets in one call (through its
    Rust ``backend_tokenizer`` when it has one, else ``tokenizer(..., return_offsets_mapping=True)``
    when ``is_fast``); rows whose ids round-trip use those offsets, the others (and every row of a
    slow tokenizer) fall back to :func:`incremental_spans`.
    """
    out: list[tuple[str, list[tuple[int, int]]] | None] = [None] * len(rows)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and rows:
        texts = backend.decode_batch(rows, skip_special_tokens=False)
        for i, (r, enc) in enumerate(zip(rows, backend.encode_batch(texts, add_special_tokens=False))):
            if enc.ids == r:
                out[i] = (texts[i], enc.offsets)
    elif getattr(tokenizer, "is_fast", False) and callable(tokenizer) and rows:
        texts = [_decode(tokenizer, r) for r in rows]
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        for i, (r, got, offs) in enumerate(zip(rows, enc["input_ids"], enc["offset_mapping"])):
            if list(got) == list(r):
                out[i] = (texts[i], [(int(s), int(e)) for s, e in offs])
    for i, r in enumerate(rows):
        if out[i] is None:
            out[i] = incremental_spans(tokenizer, r)
    return out  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# padded batch -> Episodes
# --------------------------------------------------------------------------------------------


def episodes_from_cuts(cuts: Sequence[Sequence[int]], completion_mask: torch.Tensor, *,
                       pad_to: int | None = None) -> Episodes:
    """Tensors for a padded batch from per-row cuts (indices into the row's completion tokens).

    The completion tokens of row b are the positions where ``completion_mask[b]`` is set, in
    order: left padding, right padding (or a prompt before the completion) all work.
    """
    mask = completion_mask.detach().to("cpu") != 0
    if mask.dim() != 2:
        raise ValueError(f"completion_mask must be [B, T], got {tuple(mask.shape)}")
    B, T = mask.shape
    if len(cuts) != B:
        raise ValueError(f"got cuts for {len(cuts)} rows, the mask has {B}")
    ids = torch.full((B, T), -1, dtype=torch.int64)
    counts = torch.zeros(B, dtype=torch.int64)
    row_ends: list[torch.Tensor] = []
    for b in range(B):
        pos = mask[b].nonzero().squeeze(1)
        n = pos.numel()
        c = torch.tensor(list(cuts[b]), dtype=torch.int64)
        if n == 0:
            row_ends.append(c[:0])
            continue
        if c.numel() and (bool((c[1:] <= c[:-1]).any()) or int(c[0]) < 0 or int(c[-1]) >= n - 1):
            raise ValueError(f"row {b}: cuts must increase within [0, {n - 1}), got {c.tolist()}")
        marks = np.zeros(n, dtype=np.int64)
        marks[c.numpy() + 1] = 1  # token j's episode: the number of cuts before it
        ids[b, pos] = torch.from_numpy(np.cumsum(marks))
        row_ends.append(pos[torch.cat([c, torch.tensor([n - 1])])])
        counts[b] = c.numel() + 1
    k = int(counts.max()) if B else 0
    if pad_to is not None:
        if pad_to < k:
            raise ValueError(f"pad_to={pad_to} is below the largest episode count {k}")
        k = pad_to
    ends = torch.full((B, k), -1, dtype=torch.int64)
    for b, e in enumerate(row_ends):
        ends[b, :e.numel()] = e
    device = completion_mask.device
    return Episodes(ids.to(device), ends.to(device), counts.to(device))


def split_episodes(completion_ids: torch.Tensor, completion_mask: torch.Tensor, tokenizer: Any = None,
                   config: EpisodeConfig | None = None, *, pad_to: int | None = None) -> Episodes:
    """Split a padded batch of completions into episodes.

    Args:
        completion_ids: ``[B, T]`` token ids (padding anywhere the mask is 0).
        completion_mask: ``[B, T]`` bool / 0-1, set on completion tokens (left or right padded).
        tokenizer: a Hugging Face tokenizer (fast ones are used through their offsets) or any
            object with ``decode(ids)``; not needed for ``delimiter="tokens"``.
        config: :class:`EpisodeConfig` (default: blank-line delimiter, at most 16 episodes).
        pad_to: width of ``episode_ends`` (default: the largest episode count in the batch).

    Returns:
        :class:`Episodes` on the device of ``completion_mask``.
    Cost: one batch decode + one batch encode on the host for a fast tokenizer (two decodes per
    token for rows that need the incremental fallback), plus O(B*T) tensor work.
    """
    config = config or EpisodeConfig()
    if completion_ids.shape != completion_mask.shape or completion_ids.dim() != 2:
        raise ValueError(f"completion_ids {tuple(completion_ids.shape)} and completion_mask "
                         f"{tuple(completion_mask.shape)} must both be [B, T]")
    mask = completion_mask.detach().to("cpu") != 0
    ids_cpu = completion_ids.detach().to("cpu")
    rows = [ids_cpu[b][mask[b]].tolist() for b in range(ids_cpu.shape[0])]
    if config.delimiter == "tokens":
        cuts = [episode_cuts("", [(0, 0)] * len(r), config) for r in rows]
        return episodes_from_cuts(cuts, completion_mask, pad_to=pad_to)
    if tokenizer is None:
        raise ValueError(f"delimiter={config.delimiter!r} needs a tokenizer (or use delimiter='tokens')")
    special_ids = _special_ids(tokenizer)
    cuts = []
    for r, (text, spans) in zip(rows, token_spans(tokenizer, rows)):
        cuts.append(episode_cuts(text, spans, config, special=[t in special_ids for t in r]))
    return episodes_from_cuts(cuts, completion_mask, pad_to=pad_to)
