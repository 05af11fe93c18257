"""Loss masking: train on the assistant's tokens only.

`tokenize_with_masking` turns one conversation into `input_ids`, `attention_mask` and
`labels`, where `labels` is -100 (ignored by `CrossEntropyLoss`) on everything except each
assistant message's content and the end-of-turn token that closes it. It renders the chat
template ONCE per conversation: each assistant content travels through the template wrapped
in invisible marker characters, so the rendered text itself says where every assistant span
starts and ends (character offsets); the tokenizer's offset mapping turns characters into
tokens. Whatever the template adds around the messages (a default system prompt, a date, a
system message moved into another turn) is simply not inside a span.

    >>> from sft_helpers.models import load_tokenizer                      # doctest: +SKIP
    >>> chat = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    >>> example = tokenize_with_masking(chat, load_tokenizer("tiny"))     # doctest: +SKIP
    >>> tokenizer.decode(example["labels"][example["labels"] != -100])    # doctest: +SKIP
    '4<|im_end|>'

`naive_tokenize_with_masking` keeps the prefix loop that many tutorials use, to show what
goes wrong with it (it trains only the last assistant turn). `mask_dataset` builds a
dataset and drops the examples that truncation leaves with nothing to train; `pad_batch`
pads a batch without losing the EOS label when the pad token is the EOS token;
`trained_token_count` is the loss normaliser of gradient accumulation.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from jinja2.exceptions import TemplateError

from sft_helpers.data import location, validate_conversation

IGNORE_INDEX = -100  # CrossEntropyLoss's default ignore_index
# Markers put around each assistant content before rendering, removed after. U+E000/U+E001
# (private use) open/close a span, followed by a plane-15 private-use character that encodes
# the message index. The edge markers are whitespace for str.strip() (ASCII record/unit
# separators), so a template that trims contents (`| trim`, Llama 3, Gemma) strips them
# along with the content's own leading/trailing whitespace: their absence tells us it did.
_OPEN, _CLOSE = "\ue000", "\ue001"
_EDGE_LEFT, _EDGE_RIGHT = "\x1e", "\x1f"
_INDEX_BASE = 0xF0000
_MAX_MESSAGES = 0xFFFD
_MARKER = re.compile("([\ue000\ue001])([\U000F0000-\U000FFFFD])")
_RESERVED = re.compile("[\ue000\ue001\x1e\x1f\U000F0000-\U000FFFFD]")


class AllMaskedError(ValueError):
    """Truncation left a conversation with no trained token: its loss would be NaN or 0."""


def check_markers_absent(conversation, index: int | None = None) -> None:
    """Raise `ValueError` naming the conversation and message when a content holds one of
    the marker characters this module puts around assistant contents (or when there are
    more messages than the markers can number). Run after `data.validate_conversation`.

    >>> check_markers_absent([{"role": "user", "content": "\ue000"}], index=3)
    Traceback (most recent call last):
    ...
    ValueError: conversation 3, message 0: the content holds a reserved marker character ...
    """
    if len(conversation) > _MAX_MESSAGES:
        raise ValueError(
            f"{location(index)}: {len(conversation)} messages, more than {_MAX_MESSAGES}"
        )
    for i, message in enumerate(conversation):
        if _RESERVED.search(message["content"]):
            raise ValueError(
                f"{location(index, i)}: the content holds a reserved marker character (U+E000, "
                "U+E001, U+001E, U+001F or plane-15 private use); remove it"
            )


def rendered_ids(tokenizer, conversation, **kwargs) -> torch.Tensor:
    """`apply_chat_template` ids as a 1-D tensor, the way the prefix loop is usually written
    (`return_tensors="pt"`; transformers 5 returns a BatchEncoding by default)."""
    encoding = tokenizer.apply_chat_template(conversation, return_tensors="pt", **kwargs)
    return encoding["input_ids"][0]


def naive_tokenize_with_masking(conversation, tokenizer, max_length: int = 2048) -> dict:
    """The prefix loop: for each non-assistant message, render the conversation up to it
    with the generation prompt and mask that many leading tokens.

    Kept to teach from, as it is usually written. Each mask covers everything before the
    NEXT assistant reply, earlier replies included, so only the last assistant turn is
    trained; and it renders the template once per non-assistant message (quadratic work in
    the number of turns). Truncation can silently leave no trained token at all.
    """
    full = rendered_ids(tokenizer, conversation)
    labels = full.clone()
    for i, message in enumerate(conversation):
        if message["role"] == "assistant":
            continue
        prefix = rendered_ids(tokenizer, conversation[: i + 1], add_generation_prompt=True)
        labels[: len(prefix)] = IGNORE_INDEX
    input_ids = full[:max_length]
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels[:max_length],
    }


def _split_whitespace(text: str) -> tuple[str, str, str]:
    core = text.strip()
    if not core:
        return text, "", ""
    start = text.index(core)
    return text[:start], core, text[start + len(core):]


def _marked(conversation) -> list[dict]:
    """The conversation with each assistant content wrapped in span markers."""
    marked = []
    for i, message in enumerate(conversation):
        message = dict(message)
        if message["role"] == "assistant":
            lead, core, trail = _split_whitespace(message["content"])
            tag = chr(_INDEX_BASE + i)
            message["content"] = (
                f"{_EDGE_LEFT}{lead}{_OPEN}{tag}{core}{_CLOSE}{tag}{trail}{_EDGE_RIGHT}"
            )
        marked.append(message)
    return marked


def _spans_from_markers(marked_text: str, conversation, index: int | None):
    """(clean text, {message index: (start, end)}) from a rendered marked conversation.

    Raises `ValueError` when the markers show that the template did something to an
    assistant content other than copy it (optionally trimmed): dropped, repeated,
    reordered or rewritten it. Then no mask can be trusted.
    """
    assistants = [i for i, m in enumerate(conversation) if m["role"] == "assistant"]
    found: dict[int, list[tuple[str, int]]] = {i: [] for i in assistants}
    for match in _MARKER.finditer(marked_text):
        i = ord(match.group(2)) - _INDEX_BASE
        found.setdefault(i, []).append((match.group(1), match.start()))
    spans, n_reserved = {}, 0
    for i in assistants:
        kinds = [kind for kind, _ in found[i]]
        if kinds != [_OPEN, _CLOSE]:
            raise ValueError(
                f"{location(index, i)}: the chat template does not write this assistant content "
                "exactly once (it drops or repeats it), so its span in the rendered text "
                "cannot be determined"
            )
        open_end, close_start = found[i][0][1] + 2, found[i][1][1]
        lead, core, trail = _split_whitespace(conversation[i]["content"])
        if marked_text[open_end:close_start] != core:
            raise ValueError(
                f"{location(index, i)}: the chat template rewrites this assistant content, so "
                "its span in the rendered text cannot be determined"
            )
        start, end = open_end - 2, close_start + 2
        n_reserved += 4
        # An edge marker still in place means the template kept that side's whitespace.
        if marked_text[start - len(lead) - 1:start] == _EDGE_LEFT + lead:
            start -= len(lead) + 1
            n_reserved += 1
        if marked_text[end:end + len(trail) + 1] == trail + _EDGE_RIGHT:
            end += len(trail) + 1
            n_reserved += 1
        spans[i] = (start, end)
    reserved = [match.start() for match in _RESERVED.finditer(marked_text)]
    if len(reserved) != n_reserved:
        raise ValueError(
            f"{location(index)}: the chat template moves or copies part of an assistant content, "
            "so the assistant spans cannot be determined"
        )

    def clean(position: int) -> int:  # the position once the markers before it are removed
        return position - bisect.bisect_left(reserved, position)

    text = _RESERVED.sub("", marked_text)
    return text, {i: (clean(start), clean(end)) for i, (start, end) in spans.items()}


def _special_ids(tokenizer) -> set[int]:
    added = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    return added | set(tokenizer.all_special_ids)


def _failing_message(tokenizer, conversation) -> int:
    """The first message whose arrival makes the template fail (only called on failure)."""
    for k in range(1, len(conversation)):
        try:
            tokenizer.apply_chat_template(conversation[:k], tokenize=False)
        except TemplateError:
            return k - 1
    return len(conversation) - 1


def render_marked(conversation, tokenizer, index: int | None = None) -> str:
    """The conversation rendered once by the tokenizer's template, assistant contents
    wrapped in span markers. A Jinja error is re-raised as `ValueError` with its context."""
    try:
        return tokenizer.apply_chat_template(_marked(conversation), tokenize=False)
    except TemplateError as error:
        where = location(index, _failing_message(tokenizer, conversation))
        raise ValueError(f"{where}: the chat template refused the conversation: {error}") from error


def show_markers(marked_text: str) -> str:
    """`marked_text` (from `render_marked`) with its markers made visible: `⟦i:` and `:i⟧`
    around the content of message i, `·` for a whitespace edge marker.

    >>> show_markers("A\x1e\ue000\U000F0001hi\ue001\U000F0001\x1fB")
    'A·⟦1:hi:1⟧·B'
    """
    def visible(match: re.Match) -> str:
        i = ord(match.group(2)) - _INDEX_BASE
        return f"⟦{i}:" if match.group(1) == _OPEN else f":{i}⟧"

    text = _MARKER.sub(visible, marked_text)
    return text.replace(_EDGE_LEFT, "·").replace(_EDGE_RIGHT, "·")


def assistant_spans(conversation, tokenizer, index: int | None = None):
    """`(text, spans)`: the rendered conversation (exactly what `apply_chat_template`
    renders) and, for each assistant message index, the (start, end) characters of its
    content in that text. One template render.

    >>> text, spans = assistant_spans(chat, tokenizer)                     # doctest: +SKIP
    >>> {i: text[a:b] for i, (a, b) in spans.items()}                      # doctest: +SKIP
    {1: '4'}
    """
    validate_conversation(conversation, index)
    check_markers_absent(conversation, index)
    return _spans_from_markers(render_marked(conversation, tokenizer, index), conversation, index)


def _encode(tokenizer, text: str):
    """`text` encoded as `apply_chat_template` does (no special tokens added), as an object
    with `ids`, `char_to_token` and `token_to_chars`. The Rust tokenizer is called directly,
    skipping the Python wrapper's per-call setup, when no truncation or padding is left set
    on it; otherwise the wrapper (which resets them) is used."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.truncation is None and backend.padding is None:
        return backend.encode(text, add_special_tokens=False)
    encoding = tokenizer(text, add_special_tokens=False)
    encoding.ids = encoding["input_ids"]
    return encoding


def _first_token(encoding, start: int, end: int, closing: int) -> int:
    """The first token that overlaps the characters [start, end); `closing` if none does."""
    for position in range(start, end):  # a character the tokenizer dropped maps to no token
        token = encoding.char_to_token(position)
        if token is not None:
            return token
    return closing


def _labels(encoding, input_ids: np.ndarray, spans, special_ids, index) -> np.ndarray:
    """Labels from character spans: every token that overlaps an assistant content (the
    rule transformers uses for `{% generation %}` spans), plus the end-of-turn token that
    must start exactly where the content ends."""
    labels = np.full_like(input_ids, IGNORE_INDEX)
    for i, (start, end) in spans.items():
        closing = encoding.char_to_token(end)
        if (
            closing is None
            or encoding.token_to_chars(closing)[0] != end
            or int(input_ids[closing]) not in special_ids
        ):
            raise ValueError(
                f"{location(index, i)}: no special end-of-turn token right after this assistant "
                "content, so the turn's end cannot be trained (the model would never learn to stop)"
            )
        first = _first_token(encoding, start, end, closing)
        labels[first:closing + 1] = input_ids[first:closing + 1]
    return labels


def tokenize_with_masking(
    conversation, tokenizer, max_length: int = 2048, *, index: int | None = None
) -> dict[str, torch.Tensor]:
    """`input_ids`, `attention_mask` and `labels` (1-D LongTensors) for one conversation.

    `input_ids` equals `tokenizer.apply_chat_template(conversation)` cut to `max_length`.
    `labels` equals `input_ids` on every token of every assistant content and on the
    end-of-turn token that closes it, and is -100 elsewhere (system, user, role headers,
    anything the template injects). Raises `ValueError` (naming `index` and the message)
    for bad input or when a span cannot be determined, and `AllMaskedError` when
    `max_length` cuts away every trained token.

    >>> example = tokenize_with_masking(chat, tokenizer)                    # doctest: +SKIP
    >>> sorted(example)                                                      # doctest: +SKIP
    ['attention_mask', 'input_ids', 'labels']
    """
    if not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a positive int, not {max_length!r}")
    text, spans = assistant_spans(conversation, tokenizer, index)
    encoding = _encode(tokenizer, text)
    input_ids = np.array(encoding.ids, dtype=np.int64)
    labels = _labels(encoding, input_ids, spans, _special_ids(tokenizer), index)
    trained = np.flatnonzero(labels != IGNORE_INDEX)
    if trained[0] >= max_length:
        raise AllMaskedError(
            f"{location(index)}: {len(input_ids)} tokens, and max_length={max_length} cuts away "
            f"every trained token (the first is token {trained[0]}); its loss would be NaN"
        )
    ids = torch.from_numpy(input_ids[:max_length].copy())
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.from_numpy(labels[:max_length].copy()),
    }


def mask_dataset(
    conversations: Sequence, tokenizer, max_length: int = 2048
) -> tuple[list[dict[str, torch.Tensor]], int]:
    """`(examples, n_dropped)`: `tokenize_with_masking` on each conversation, dropping
    those that truncation leaves with no trained token. Bad input still raises.

    >>> examples, n_dropped = mask_dataset(conversations, tokenizer, 512)   # doctest: +SKIP
    """
    examples, n_dropped = [], 0
    for index, conversation in enumerate(conversations):
        try:
            examples.append(tokenize_with_masking(conversation, tokenizer, max_length, index=index))
        except AllMaskedError:
            n_dropped += 1
    return examples, n_dropped


def pad_batch(
    examples: Sequence[Mapping[str, torch.Tensor]], pad_token_id: int, padding_side: str = "right"
) -> dict[str, torch.Tensor]:
    """Stack examples into 2-D tensors, padding `input_ids` with `pad_token_id`,
    `attention_mask` with 0 and `labels` with -100.

    Padding is decided by position, never by comparing ids with `pad_token_id`: when the
    pad token is the EOS token (SmolLM2: both are <|im_end|>), masking every id equal to
    it would also mask the trained EOS labels, and the model would never learn to stop.

    >>> t = torch.tensor
    >>> a = {"input_ids": t([5, 2]), "attention_mask": t([1, 1]), "labels": t([-100, 2])}
    >>> b = {"input_ids": t([7]), "attention_mask": t([1]), "labels": t([7])}
    >>> batch = pad_batch([a, b], pad_token_id=2)
    >>> batch["labels"].tolist()
    [[-100, 2], [7, -100]]
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', not {padding_side!r}")
    if not examples:
        raise ValueError("cannot pad an empty batch")
    width = max(len(e["input_ids"]) for e in examples)
    fill = {"input_ids": pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    batch = {}
    for key, value in fill.items():
        rows = []
        for example in examples:
            row = torch.as_tensor(example[key], dtype=torch.long)
            pad = torch.full((width - len(row),), value, dtype=torch.long)
            rows.append(torch.cat([row, pad] if padding_side == "right" else [pad, row]))
        batch[key] = torch.stack(rows)
    return batch


def trained_token_count(batches: Sequence[Mapping[str, torch.Tensor]]) -> int:
    """The normaliser of one optimizer step: how many labels the causal-LM loss scores in
    all of the step's micro-batches (labels not -100, after the shift by one position).

    Dividing each micro-batch's *summed* loss by this count (transformers: pass it as
    `num_items_in_batch`) makes k accumulated micro-batches give the gradient of one batch
    of all their examples. Averaging each micro-batch's mean loss instead weights every
    micro-batch the same, however many tokens it trains.

    >>> t = torch.tensor
    >>> trained_token_count([{"labels": t([[-100, 5, 6]])}, {"labels": t([[7, -100, 8]])}])
    3
    """
    if not batches:
        raise ValueError("no micro-batches: one optimizer step needs at least one")
    count = 0
    for i, batch in enumerate(batches):
        labels = torch.as_tensor(batch["labels"])
        if labels.dim() != 2:
            raise ValueError(f"micro-batch {i}: labels must be 2-D (batch, sequence), "
                             f"not of shape {tuple(labels.shape)}")
        count += int((labels[:, 1:] != IGNORE_INDEX).sum())
    if count == 0:
        raise AllMaskedError(f"none of the {len(batches)} micro-batches has a trained label: "
                             "the step's loss would be NaN")
    return count
