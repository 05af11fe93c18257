"""Chat templates: the Jinja strings that turn a list of messages into one training text.

A chat template is a Jinja program carried by the tokenizer (`tokenizer.chat_template`).
This module ships five common formats, renders a conversation with any of them, checks
whether a template is prefix-preserving, and marks the assistant turns of a template with
`{% generation %}` blocks (what `return_assistant_tokens_mask=True` and TRL's
`assistant_only_loss=True` need).

    >>> chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    >>> render(chat, "chatml")
    '<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nHello<|im_end|>\\n'
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

# The part of the default model's (SmolLM2 ChatML) template that writes one message, and
# the same part with the assistant's content and closing <|im_end|> in a generation block.
# The newline after <|im_end|> stays outside the block: it is not part of the turn the
# model must learn to produce (generation stops at <|im_end|>).
# (Its string literals hold real newline characters, not the escape backslash-n.)
CHATML_MESSAGE = (
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
)
CHATML_MESSAGE_MARKED = (
    "{% if message['role'] == 'assistant' %}"
    "{{'<|im_start|>assistant\n'}}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{'\n'}}"
    "{% else %}" + CHATML_MESSAGE + "{% endif %}"
)
# Each template is written the way the model family's published template renders a
# conversation of system/user/assistant messages (tools and multimodal content left out).
TEMPLATES: dict[str, str] = {
    # ChatML (SmolLM2, Qwen2.5, ...): role header on its own line, <|im_end|> closes a turn.
    # The default model's template is this one plus an injected default system prompt.
    "chatml": (
        "{% for message in messages %}" + CHATML_MESSAGE + "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    # Llama 3 Instruct: BOS once, header tokens around the role, contents trimmed,
    # <|eot_id|> closes a turn.
    "llama3": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
        " + message['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
        "{% endif %}"
    ),
    # Mistral Instruct v0.3: [INST] ... [/INST], replies trimmed, EOS closes a reply. There is
    # no system turn: the system message is glued to the user message only when that message
    # is the LAST one (a prompt). A training conversation, which ends with a reply, loses its
    # system message entirely, and the template is not prefix-preserving.
    "mistral": (
        "{% if messages[0]['role'] == 'system' %}"
        "{% set system_message = messages[0]['content'] %}{% set loop_messages = messages[1:] %}"
        "{% else %}{% set loop_messages = messages %}{% endif %}"
        "{{ bos_token }}"
        "{% for message in loop_messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('roles must alternate user/assistant after an optional system') }}"
        "{% endif %}"
        "{% if message['role'] == 'user' %}"
        "{% if loop.last and system_message is defined %}"
        "{{ '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}"
        "{% else %}{{ '[INST] ' + message['content'] + '[/INST]' }}{% endif %}"
        "{% else %}{{ ' ' + message['content'] | trim + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
    # Gemma: no system role at all, assistant is called "model", contents trimmed.
    "gemma": (
        "{{ bos_token }}"
        "{% if messages[0]['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "{% for message in messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/...') }}"
        "{% endif %}"
        "{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
        "{% else %}{% set role = message['role'] %}{% endif %}"
        "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
    ),
    # Phi-3: <|role|> headers, <|end|> closes a turn, EOS appended only when not generating.
    "phi3": (
        "{% for message in messages %}"
        "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
    ),
}

# The special tokens each format uses: the variables its template reads (bos_token,
# eos_token) and the tokens a tokenizer must know as single added tokens.
TEMPLATE_TOKENS: dict[str, dict[str, object]] = {
    "chatml": {"bos_token": "", "eos_token": "<|im_end|>", "added": ["<|im_start|>", "<|im_end|>"]},
    "llama3": {
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "added": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    },
    "mistral": {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "added": ["<s>", "</s>", "[INST]", "[/INST]"],
    },
    "gemma": {
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "added": ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"],
    },
    "phi3": {
        "bos_token": "<s>",
        "eos_token": "<|endoftext|>",
        "added": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"],
    },
}

# For the other shipped formats: (what writes a message, its marked replacement).
_MARKED_PARTS = {
    "chatml": (CHATML_MESSAGE, CHATML_MESSAGE_MARKED),
    "llama3": (
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
        " + message['content'] | trim + '<|eot_id|>' }}",
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
        "{% if message['role'] == 'assistant' %}"
        "{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
        "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}",
    ),
    "mistral": (
        "{% else %}{{ ' ' + message['content'] | trim + eos_token }}{% endif %}",
        "{% else %}{{ ' ' }}{% generation %}{{ message['content'] | trim + eos_token }}"
        "{% endgeneration %}{% endif %}",
    ),
    "gemma": (
        "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}",
        "{{ '<start_of_turn>' + role + '\\n' }}"
        "{% if role == 'model' %}"
        "{% generation %}{{ message['content'] | trim + '<end_of_turn>' }}{% endgeneration %}"
        "{% else %}{{ message['content'] | trim + '<end_of_turn>' }}{% endif %}{{ '\\n' }}",
    ),
    "phi3": (
        "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}",
        "{{ '<|' + message['role'] + '|>\\n' }}"
        "{% if message['role'] == 'assistant' %}"
        "{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}"
        "{% else %}{{ message['content'] + '<|end|>' }}{% endif %}{{ '\\n' }}",
    ),
}


def template_source(template: str) -> str:
    """The Jinja source of `template`: a key of `TEMPLATES`, or a Jinja string itself."""
    return TEMPLATES.get(template, template)


def render(
    conversation: Sequence[Mapping[str, str]],
    template: str,
    *,
    add_generation_prompt: bool = False,
    **variables: str,
) -> str:
    """Render `conversation` with `template` (a key of `TEMPLATES` or a Jinja string).

    The template sees the same variables as in `tokenizer.apply_chat_template`; for a
    shipped format, `bos_token`/`eos_token` default to that format's tokens.

    >>> render([{"role": "user", "content": "Hi"}], "gemma", add_generation_prompt=True)
    '<bos><start_of_turn>user\\nHi<end_of_turn>\\n<start_of_turn>model\\n'
    """
    from transformers.utils.chat_template_utils import render_jinja_template

    tokens = TEMPLATE_TOKENS.get(template, {"bos_token": "", "eos_token": ""})
    defaults = {"bos_token": tokens["bos_token"], "eos_token": tokens["eos_token"]}
    rendered, _ = render_jinja_template(
        conversations=[list(conversation)],
        chat_template=template_source(template),
        add_generation_prompt=add_generation_prompt,
        **{**defaults, **variables},
    )
    return rendered[0]


def with_template(tokenizer, name: str):
    """A copy of `tokenizer` that speaks the shipped format `name`.

    The copy gets the format's template and its special tokens as added tokens (so that
    `<|eot_id|>` is one token, not five), with BOS/EOS set accordingly. It is meant for
    looking at token boundaries: the new tokens have no embedding in any model.
    """
    tokens = TEMPLATE_TOKENS[name]
    copied = copy.deepcopy(tokenizer)
    copied.add_special_tokens({"additional_special_tokens": list(tokens["added"])})
    if tokens["bos_token"]:
        copied.bos_token = tokens["bos_token"]
    copied.eos_token = tokens["eos_token"]
    copied.chat_template = TEMPLATES[name]
    return copied


def _render_with(tokenizer_or_template, conversation, add_generation_prompt: bool) -> str:
    if isinstance(tokenizer_or_template, str):
        return render(
            conversation, tokenizer_or_template, add_generation_prompt=add_generation_prompt
        )
    return tokenizer_or_template.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def prefix_violation(tokenizer_or_template, conversation) -> tuple[int, str, str] | None:
    """The first turn at which rendering `conversation` is not prefix-preserving, or None.

    For each assistant message k, the conversation before it, rendered with the generation
    prompt, must be a prefix of the whole rendered conversation: that is what a model sees
    at inference and what prefix-based masking assumes. Returns `(k, prefix, full)`.
    """
    full = _render_with(tokenizer_or_template, conversation, add_generation_prompt=False)
    for k, message in enumerate(conversation):
        if message["role"] != "assistant" or k == 0:
            continue
        prefix = _render_with(tokenizer_or_template, conversation[:k], add_generation_prompt=True)
        if not full.startswith(prefix):
            return k, prefix, full
    return None


def is_prefix_preserving(tokenizer_or_template, conversations) -> bool:
    """True when, on every conversation, each assistant turn's rendered prompt is a prefix
    of the rendered conversation (see `prefix_violation`).

    `tokenizer_or_template` is a tokenizer (its chat template is used), a key of
    `TEMPLATES` or a Jinja string.

    >>> chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
    ...         {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
    ...         {"role": "assistant", "content": "Bye"}]
    >>> is_prefix_preserving("chatml", [chat]), is_prefix_preserving("mistral", [chat])
    (True, False)
    """
    return all(prefix_violation(tokenizer_or_template, c) is None for c in conversations)


def has_generation_markers(chat_template: str) -> bool:
    """True when `chat_template` contains a `{% generation %}` block."""
    return "generation %}" in chat_template or "generation -%}" in chat_template


def with_generation_markers(chat_template: str) -> str:
    """`chat_template` with each assistant turn's content and end-of-turn token inside
    `{% generation %}...{% endgeneration %}`.

    Works for the default model's ChatML template and for each template in `TEMPLATES`
    (they are recognised by the part that writes one message); a template that already has
    markers is returned as is; any other template raises `ValueError`, since guessing where
    its assistant turns are would give a wrong mask.

    >>> "{% generation %}" in with_generation_markers(TEMPLATES["chatml"])
    True
    """
    if has_generation_markers(chat_template):
        return chat_template
    for plain, marked in _MARKED_PARTS.values():
        if chat_template.count(plain) == 1:
            return chat_template.replace(plain, marked)
    raise ValueError(
        "cannot add {% generation %} markers to this chat template: it is neither the default "
        "model's ChatML template nor one of " + ", ".join(TEMPLATES) + ". Wrap the assistant "
        "content and its end-of-turn token in {% generation %}...{% endgeneration %} by hand."
    )
