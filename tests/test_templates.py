"""Chat templates: the five shipped formats, prefix preservation, generation markers."""

from __future__ import annotations

import pytest

from sft_helpers.models import load_tokenizer
from sft_helpers.templates import (
    TEMPLATES,
    has_generation_markers,
    is_prefix_preserving,
    prefix_violation,
    render,
    with_generation_markers,
    with_template,
)

CHAT = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "See you."},
]
SYSTEM = {"role": "system", "content": "Be brief."}
# What each format writes for CHAT (with the system message where the format has one).
EXPECTED = {
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
    "<|im_start|>assistant\nSee you.<|im_end|>\n",
    "llama3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nSee you.<|eot_id|>",
    # Mistral drops the system message unless the conversation ends with a user message.
    "mistral": "<s>[INST] Hi[/INST] Hello!</s>[INST] Bye[/INST] See you.</s>",
    "gemma": "<bos><start_of_turn>user\nHi<end_of_turn>\n"
    "<start_of_turn>model\nHello!<end_of_turn>\n"
    "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\nSee you.<end_of_turn>\n",
    "phi3": "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n"
    "<|user|>\nBye<|end|>\n<|assistant|>\nSee you.<|end|>\n<|endoftext|>",
}
GENERATION_PROMPT = {
    "chatml": "<|im_start|>assistant\n",
    "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "mistral": "[/INST]",
    "gemma": "<start_of_turn>model\n",
    "phi3": "<|assistant|>\n",
}


def chat_for(name: str) -> list[dict]:
    return CHAT if name == "gemma" else [SYSTEM, *CHAT]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


def test_the_five_formats_are_shipped():
    assert set(TEMPLATES) == {"chatml", "llama3", "mistral", "gemma", "phi3"}


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_render_writes_the_format(name):
    assert render(chat_for(name), name) == EXPECTED[name]


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_generation_prompt_ends_with_the_assistant_header(name):
    prompt = chat_for(name)[:-1]
    assert render(prompt, name, add_generation_prompt=True).endswith(GENERATION_PROMPT[name])
    if name != "mistral":  # [INST] ... [/INST] already asks for the reply
        assert not render(prompt, name).endswith(GENERATION_PROMPT[name])


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_with_template_makes_each_special_token_one_token(tokenizer, name):
    speaker = with_template(tokenizer, name)
    text = speaker.apply_chat_template(chat_for(name), tokenize=False)
    assert text == EXPECTED[name]
    for token in ("<|eot_id|>", "<end_of_turn>", "<|end|>", "[INST]"):
        if token in text:
            assert len(speaker.encode(token, add_special_tokens=False)) == 1
    assert tokenizer.chat_template != speaker.chat_template or name == "chatml"


def test_render_accepts_a_jinja_string_and_matches_the_tokenizer(tokenizer):
    assert render(CHAT, tokenizer.chat_template) == tokenizer.apply_chat_template(
        CHAT, tokenize=False
    )
    assert "You are a helpful AI assistant named SmolLM" in render(CHAT, tokenizer.chat_template)


def test_prefix_preservation():
    assert is_prefix_preserving("chatml", [chat_for("chatml")])
    assert is_prefix_preserving("llama3", [chat_for("llama3")])
    # Mistral writes the system message into a prompt's last user turn, and drops it from
    # a conversation that ends with a reply.
    assert render([SYSTEM, CHAT[0]], "mistral") == "<s>[INST] Be brief.\n\nHi[/INST]"
    assert not is_prefix_preserving("mistral", [chat_for("mistral")])
    assert is_prefix_preserving("mistral", [CHAT]), "without a system message it is"
    k, prefix, full = prefix_violation("mistral", chat_for("mistral"))
    assert k == 2 and "Be brief." in prefix and not full.startswith(prefix)


def test_prefix_preservation_of_a_tokenizer(tokenizer):
    assert is_prefix_preserving(tokenizer, [CHAT, [SYSTEM, *CHAT]])
    dated = TEMPLATES["chatml"].replace(
        "{% for message in messages %}",
        "{% for message in messages %}{% if loop.last %}{{ '(final) ' }}{% endif %}",
    )
    assert not is_prefix_preserving(dated, [CHAT])


@pytest.mark.parametrize("name", [*TEMPLATES, "default"])
def test_generation_markers_keep_the_text_and_mark_the_replies(tokenizer, name):
    speaker = tokenizer if name == "default" else with_template(tokenizer, name)
    chat = CHAT if name in ("gemma", "default") else [SYSTEM, *CHAT]
    marked = with_generation_markers(speaker.chat_template)
    assert has_generation_markers(marked) and not has_generation_markers(speaker.chat_template)
    plain = speaker.apply_chat_template(chat, tokenize=False)
    assert speaker.apply_chat_template(chat, tokenize=False, chat_template=marked) == plain
    out = speaker.apply_chat_template(chat, chat_template=marked, return_assistant_tokens_mask=True)
    trained = [t for t, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert "Hello!" in speaker.decode(trained) and "See you." in speaker.decode(trained)
    assert "Hi" not in speaker.decode(trained) and "Bye" not in speaker.decode(trained)
    assert with_generation_markers(marked) == marked


def test_trl_accepts_the_marked_default_template(tokenizer):
    from trl.chat_template_utils import has_generation_markers as trl_has_markers
    from trl.chat_template_utils import is_chat_template_stop_token_trained

    marked = with_generation_markers(tokenizer.chat_template)
    assert trl_has_markers(marked)
    assert is_chat_template_stop_token_trained(tokenizer, chat_template=marked)


def test_unknown_template_is_refused():
    with pytest.raises(ValueError, match="cannot add"):
        with_generation_markers("{% for m in messages %}{{ m.content }}{% endfor %}")
