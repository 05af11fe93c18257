"""Pictures of tokens: which ones a model is trained on, and where a template's special
tokens are. Each function returns an `IPython.display.HTML` object, shown by Jupyter.

    >>> token_view([1, 2], [-100, 2], tokenizer)   # doctest: +SKIP
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable, Mapping, Sequence

from sft_helpers.masking import IGNORE_INDEX

TRAINED_STYLE = "background:#b7e4c7;color:#081c15"
MASKED_STYLE = "background:#e9ecef;color:#6c757d"
SPECIAL_STYLE = "background:#ffd6a5;color:#7f4f24;font-weight:bold"
TOKEN_STYLE = "padding:1px 2px;margin:1px;border-radius:3px;display:inline-block;white-space:pre"
BOX_STYLE = "font-family:monospace;font-size:12px;line-height:1.9"
# How whitespace is drawn inside a token box, so that " " and "\n" tokens stay visible.
VISIBLE_WHITESPACE = {" ": "\u00b7", "\n": "\u21b5", "\t": "\u2192"}


def _html(markup: str):
    from IPython.display import HTML

    return HTML(markup)


def _visible(text: str) -> str:
    return html.escape("".join(VISIBLE_WHITESPACE.get(ch, ch) for ch in text))


def token_boxes(input_ids: Sequence[int], labels: Sequence[int], tokenizer) -> str:
    """The HTML of one box per token: green when trained (label != -100), grey when masked.

    >>> class Spell:  # a stand-in tokenizer: token id -> its text
    ...     def decode(self, ids): return {1: "Hi", 2: "\\n"}[ids[0]]
    >>> token_boxes([1, 2], [-100, 2], Spell()).count("<span")
    2
    """
    boxes = []
    for token_id, label in zip(list(input_ids), list(labels), strict=True):
        trained = int(label) != IGNORE_INDEX
        style = TRAINED_STYLE if trained else MASKED_STYLE
        text = tokenizer.decode([int(token_id)])
        title = f"id {int(token_id)}, label {int(label)}"
        boxes.append(
            f'<span style="{TOKEN_STYLE};{style}" title="{title}">{_visible(text)}</span>'
            + "<br>" * text.endswith("\n")  # keep the text's line layout
        )
    return "".join(boxes)


def token_view(input_ids: Sequence[int], labels: Sequence[int], tokenizer, title: str = ""):
    """Every token of an example, coloured: trained (green) or masked with -100 (grey).

    Spaces show as a middle dot, newlines as a return arrow; hover a token for its id
    and label.
    """
    n_trained = sum(int(label) != IGNORE_INDEX for label in labels)
    legend = (
        f'<span style="{TOKEN_STYLE};{TRAINED_STYLE}">trained</span>'
        f'<span style="{TOKEN_STYLE};{MASKED_STYLE}">masked (-100)</span> '
        f"{n_trained} of {len(labels)} tokens trained"
    )
    heading = f"<b>{html.escape(title)}</b><br>" if title else ""
    body = token_boxes(input_ids, labels, tokenizer)
    return _html(f'<div style="{BOX_STYLE}">{heading}{legend}<br>{body}</div>')


def _highlighted(text: str, special_tokens: Iterable[str]) -> str:
    tokens = sorted(set(special_tokens), key=len, reverse=True)
    if not tokens:
        return html.escape(text)
    pattern = re.compile("|".join(map(re.escape, tokens)))
    parts, cursor = [], 0
    for match in pattern.finditer(text):
        parts.append(html.escape(text[cursor:match.start()]))
        parts.append(f'<span style="{SPECIAL_STYLE}">{html.escape(match.group())}</span>')
        cursor = match.end()
    parts.append(html.escape(text[cursor:]))
    return "".join(parts)


def highlight_special(text: str, special_tokens: Iterable[str]):
    """`text` as preformatted HTML with each special token highlighted."""
    return _html(f'<pre style="{BOX_STYLE}">{_highlighted(text, special_tokens)}</pre>')


def side_by_side(texts: Mapping[str, str], special_tokens: Mapping[str, Iterable[str]]):
    """One column per named text (a rendered template, say), special tokens highlighted.

    `special_tokens[name]` lists the tokens to highlight in `texts[name]`.
    """
    columns = []
    for name, text in texts.items():
        body = _highlighted(text, special_tokens.get(name, ()))
        columns.append(
            f'<div style="flex:1;min-width:220px"><b>{html.escape(name)}</b>'
            f'<pre style="{BOX_STYLE};white-space:pre-wrap;word-break:break-all">{body}</pre></div>'
        )
    return _html(f'<div style="display:flex;gap:12px;flex-wrap:wrap">{"".join(columns)}</div>')
