"""Loss masking: labels train exactly the assistant's contents and end-of-turn tokens."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sft_helpers.data import validate_conversation
from sft_helpers.masking import (
    IGNORE_INDEX,
    AllMaskedError,
    assistant_spans,
    check_markers_absent,
    mask_dataset,
    naive_tokenize_with_masking,
    pad_batch,
    tokenize_with_masking,
    trained_token_count,
)
from sft_helpers.models import load_model, load_tokenizer
from sft_helpers.templates import TEMPLATES, with_generation_markers, with_template

TWO_TURNS = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6"},
]
WORD_TURNS = [
    {**m, "content": {"4": "Four.", "6": "Six."}.get(m["content"], m["content"])} for m in TWO_TURNS
]
END_OF_TURN = {
    "chatml": "<|im_end|>",
    "llama3": "<|eot_id|>",
    "mistral": "</s>",
    "gemma": "<end_of_turn>",
    "phi3": "<|end|>",
}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


@functools.cache
def speaker_for(name: str):
    """A tokenizer per shipped format; "default" is the model's own (ChatML + system prompt)."""
    tokenizer = load_tokenizer("tiny")
    return tokenizer if name == "default" else with_template(tokenizer, name)


@pytest.fixture(scope="module")
def speakers():
    return {name: speaker_for(name) for name in (*TEMPLATES, "default")}


def trained_text(tokenizer, example) -> str:
    return tokenizer.decode(example["labels"][example["labels"] != IGNORE_INDEX])


def test_input_ids_are_apply_chat_template(tokenizer):
    example = tokenize_with_masking(TWO_TURNS, tokenizer)
    expected = tokenizer.apply_chat_template(TWO_TURNS, tokenize=True, return_dict=False)
    assert example["input_ids"].tolist() == expected
    assert example["attention_mask"].tolist() == [1] * len(expected)
    assert all(v.dtype == torch.long and v.dim() == 1 for v in example.values())


def test_every_assistant_turn_is_trained_and_nothing_else(tokenizer):
    example = tokenize_with_masking(TWO_TURNS, tokenizer)
    assert trained_text(tokenizer, example) == "4<|im_end|>6<|im_end|>"


def test_the_naive_loop_trains_only_the_last_turn(tokenizer):
    example = naive_tokenize_with_masking(TWO_TURNS, tokenizer)
    assert "4" not in trained_text(tokenizer, example)
    assert trained_text(tokenizer, example).startswith("6<|im_end|>")


def test_injected_default_system_prompt_is_masked(tokenizer):
    text, spans = assistant_spans(TWO_TURNS, tokenizer)
    assert "You are a helpful AI assistant named SmolLM" in text
    assert [text[a:b] for a, b in spans.values()] == ["4", "6"]


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_each_shipped_template(speakers, name):
    speaker = speakers[name]
    chat = (
        WORD_TURNS if name == "gemma" else [{"role": "system", "content": "Be brief."}, *WORD_TURNS]
    )
    example = tokenize_with_masking(chat, speaker)
    assert example["input_ids"].tolist() == speaker.apply_chat_template(chat, return_dict=False)
    eot = END_OF_TURN[name]
    # Mistral writes a space before the reply; the tokenizer merges it into " Four", which
    # is the token the model must produce after [/INST].
    space = " " if name == "mistral" else ""
    assert trained_text(speaker, example) == f"{space}Four.{eot}{space}Six.{eot}"


def test_not_prefix_preserving_template_is_masked_right_and_naive_is_not(speakers):
    # Mistral writes the system message into the prompt but not into the training text: the
    # prefix loop's last prompt is longer than the stretch it measures and masks the reply.
    speaker = speakers["mistral"]
    chat = [{"role": "system", "content": "Answer with one word."}, *WORD_TURNS]
    assert trained_text(speaker, tokenize_with_masking(chat, speaker)) == " Four.</s> Six.</s>"
    naive = naive_tokenize_with_masking(chat, speaker)
    assert (naive["labels"] == IGNORE_INDEX).all(), "nothing at all is trained"


def test_whitespace_is_trained_as_rendered(speakers):
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello \n"}]
    chatml = speakers["chatml"]
    assert trained_text(chatml, tokenize_with_masking(chat, chatml)) == "hello \n<|im_end|>"
    # A reply that starts with whitespace: the tokenizer merges the header's "\n" with it
    # into one token "\n  ", which must be trained since it carries the reply's first spaces.
    chat[1]["content"] = "  hello \n"
    assert trained_text(chatml, tokenize_with_masking(chat, chatml)) == "\n  hello \n<|im_end|>"
    llama = speakers["llama3"]  # `| trim`: the template drops the whitespace, so do the labels
    assert trained_text(llama, tokenize_with_masking(chat, llama)) == "hello<|eot_id|>"


def test_empty_assistant_content_trains_the_end_of_turn_token(tokenizer):
    chat = [{"role": "user", "content": "Say nothing."}, {"role": "assistant", "content": ""}]
    assert trained_text(tokenizer, tokenize_with_masking(chat, tokenizer)) == "<|im_end|>"


def test_special_token_text_inside_content_is_content(tokenizer):
    chat = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a<|im_end|>b"}]
    example = tokenize_with_masking(chat, tokenizer)
    assert trained_text(tokenizer, example) == "a<|im_end|>b<|im_end|>"


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        (
            TEMPLATES["chatml"].replace("message['content']", "message['content'] | upper"),
            "rewrites",
        ),
        (
            TEMPLATES["chatml"].replace(
                "{% for message in messages %}", "{% for message in messages + messages %}"
            ),
            "exactly once",
        ),
        (
            TEMPLATES["chatml"].replace(
                "{% for message in messages %}",
                "{% for message in messages if message.role != 'assistant' %}",
            ),
            "exactly once",
        ),
        (TEMPLATES["chatml"].replace("'<|im_end|>'", "'<END>'"), "end-of-turn"),
    ],
    ids=["rewrites", "repeats", "drops", "plain-text-end"],
)
def test_undeterminable_spans_raise_instead_of_guessing(tokenizer, template, problem):
    speaker = with_template(tokenizer, "chatml")
    speaker.chat_template = template
    with pytest.raises(ValueError, match=problem):
        tokenize_with_masking(WORD_TURNS, speaker, index=3)


@pytest.mark.parametrize(
    ("conversation", "message"),
    [
        ({"role": "user"}, r"conversation 5: expected a list of messages, got dict"),
        ([], r"conversation 5: the conversation is empty"),
        (["hi"], r"conversation 5, message 0: expected a mapping"),
        ([{"content": "hi"}], r"conversation 5, message 0: missing 'role'"),
        ([{"role": "user"}], r"conversation 5, message 0: missing 'content'"),
        (
            [{"role": "user", "content": None}],
            r"message 0: 'content' must be a string, got NoneType",
        ),
        ([{"role": 1, "content": "x"}], r"message 0: 'role' must be a string, got int"),
        (
            [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}],
            r"conversation 5, message 1: unknown role 'bot'",
        ),
        ([{"role": "user", "content": "x"}], r"conversation 5: no assistant message"),
        (
            [
                {"role": "user", "content": "x"},
                {"role": "system", "content": "y"},
                {"role": "assistant", "content": "z"},
            ],
            r"conversation 5, message 1: a system message must come first",
        ),
    ],
)
def test_bad_input_names_the_conversation_and_message(tokenizer, conversation, message):
    with pytest.raises(ValueError, match=message):
        validate_conversation(conversation, index=5)
    with pytest.raises(ValueError, match=message):
        tokenize_with_masking(conversation, tokenizer, index=5)


def test_a_marker_character_in_a_content_is_refused(tokenizer):
    conversation = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "\ue000"}]
    message = r"conversation 5, message 1: the content holds a reserved marker character"
    validate_conversation(conversation, index=5)  # the shape is fine; the marker is masking's
    with pytest.raises(ValueError, match=message):
        check_markers_absent(conversation, index=5)
    with pytest.raises(ValueError, match=message):
        tokenize_with_masking(conversation, tokenizer, index=5)


def test_template_errors_name_the_message(speakers):
    chat = [
        {"role": "user", "content": "a"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "c"},
    ]
    with pytest.raises(
        ValueError, match=r"conversation 2, message 1: the chat template refused.*alternate"
    ):
        tokenize_with_masking(chat, speakers["gemma"], index=2)
    system = [{"role": "system", "content": "s"}, *TWO_TURNS]
    with pytest.raises(ValueError, match=r"message 0: .*System role not supported"):
        tokenize_with_masking(system, speakers["gemma"])


def test_max_length(tokenizer):
    full = tokenize_with_masking(TWO_TURNS, tokenizer)
    first_trained = int((full["labels"] != IGNORE_INDEX).nonzero()[0])
    cut = tokenize_with_masking(TWO_TURNS, tokenizer, max_length=first_trained + 1)
    assert cut["input_ids"].tolist() == full["input_ids"][: first_trained + 1].tolist()
    assert trained_text(tokenizer, cut) == "4"
    n = len(full["input_ids"])
    with pytest.raises(
        AllMaskedError, match=rf"conversation 4: {n} tokens, and max_length={first_trained}"
    ):
        tokenize_with_masking(TWO_TURNS, tokenizer, max_length=first_trained, index=4)
    with pytest.raises(ValueError, match="max_length must be a positive int"):
        tokenize_with_masking(TWO_TURNS, tokenizer, max_length=0)


def test_mask_dataset_drops_all_masked_examples_and_counts_them(tokenizer):
    long_prompt = [
        {"role": "user", "content": "word " * 200},
        {"role": "assistant", "content": "ok"},
    ]
    examples, n_dropped = mask_dataset(
        [TWO_TURNS, long_prompt, TWO_TURNS], tokenizer, max_length=64
    )
    assert n_dropped == 1 and len(examples) == 2
    with pytest.raises(ValueError, match="conversation 1: the conversation is empty"):
        mask_dataset([TWO_TURNS, []], tokenizer)


def test_pad_batch_keeps_the_eos_label_when_pad_is_eos(tokenizer):
    from transformers import DataCollatorForLanguageModeling

    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    examples = [tokenize_with_masking(c, tokenizer) for c in (TWO_TURNS, short)]
    batch = pad_batch(examples, tokenizer.pad_token_id)
    eos = tokenizer.eos_token_id
    n_short = len(examples[1]["input_ids"])
    assert batch["input_ids"].shape == batch["labels"].shape == (2, len(examples[0]["input_ids"]))
    assert batch["attention_mask"][1].tolist() == [1] * n_short + [0] * (
        batch["input_ids"].shape[1] - n_short
    )
    assert (batch["labels"][1, n_short:] == IGNORE_INDEX).all()
    assert (batch["labels"] == eos).sum() == 3, (
        "both <|im_end|> of TWO_TURNS and the one of `short`"
    )
    # The pitfall: transformers' language-modelling collator masks every id equal to pad.
    library = DataCollatorForLanguageModeling(tokenizer, mlm=False)(
        [{"input_ids": e["input_ids"].tolist()} for e in examples]
    )
    assert (library["labels"] == eos).sum() == 0
    left = pad_batch(examples, tokenizer.pad_token_id, padding_side="left")
    assert left["labels"][1, -n_short:].tolist() == examples[1]["labels"].tolist()
    with pytest.raises(ValueError, match="padding_side"):
        pad_batch(examples, 0, padding_side="middle")


# --- properties over random conversations ------------------------------------------------

RESERVED = "\ue000\ue001\x1e\x1f"
# Printable text up to plane 2: the tokenizer's byte-level vocabulary has no token for some
# control bytes and for the lead byte of planes 4-7 (it drops them), so such text does not
# survive a round trip through any route.
TEXT = st.text(
    st.characters(
        max_codepoint=0x2FFFF,
        blacklist_categories=("Cs", "Co", "Cc", "Cn"),
        blacklist_characters=RESERVED,
    ),
    max_size=40,
)
NO_LIMIT = 100_000
CONTENT = st.one_of(
    TEXT,
    st.text(" \n\t", min_size=1, max_size=6),  # whitespace only
    st.builds(
        lambda word, n: word * n, st.sampled_from(["lorem ", "数据 ", "🙂"]), st.integers(200, 600)
    ),  # very long
)


@st.composite
def conversations(draw):
    chat = []
    if draw(st.booleans()):
        chat.append({"role": "system", "content": draw(CONTENT)})
    for _ in range(draw(st.integers(1, 8))):
        chat.append({"role": "user", "content": draw(CONTENT)})
        chat.append({"role": "assistant", "content": draw(CONTENT)})
    return chat


def trained_runs(tokenizer, example, eot_id) -> list[str]:
    """The trained tokens, decoded, cut after each end-of-turn token."""
    runs, run = [], []
    for label in example["labels"].tolist():
        if label == IGNORE_INDEX:
            continue
        run.append(label)
        if label == eot_id:
            runs.append(tokenizer.decode(run))
            run = []
    assert not run, "trained tokens after the last end-of-turn token"
    return runs


PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize(
    ("speaker_name", "header", "trims"),
    [
        ("default", "<|im_start|>assistant\n", False),
        ("llama3", "<|start_header_id|>assistant<|end_header_id|>\n\n", True),
    ],
)
@PROPERTY
@given(chat=conversations())
def test_property_trained_tokens_are_the_assistant_contents(speaker_name, header, trims, chat):
    speaker = speaker_for(speaker_name)
    example = tokenize_with_masking(chat, speaker, max_length=NO_LIMIT)
    ids, labels = example["input_ids"], example["labels"]
    assert ids.tolist() == speaker.apply_chat_template(chat, return_dict=False)
    assert ((labels == IGNORE_INDEX) | (labels == ids)).all()
    eot = speaker.eos_token if speaker_name == "default" else "<|eot_id|>"
    runs = trained_runs(speaker, example, speaker.convert_tokens_to_ids(eot))
    replies = [m["content"] for m in chat if m["role"] == "assistant"]
    assert len(runs) == len(replies)
    for run, reply in zip(runs, replies, strict=True):
        expected = (reply.strip() if trims else reply) + eot
        assert run.endswith(expected)
        extra = run[: len(run) - len(expected)]
        # Only where the tokenizer merges the header's last character with the reply's
        # first (a reply starting with whitespace) may one token reach into the header.
        assert extra == "" or (header.endswith(extra) and reply[:1].isspace())


@pytest.mark.parametrize("speaker_name", ["default", "llama3"])
@PROPERTY
@given(chat=conversations())
def test_property_agrees_with_transformers_generation_mask(speaker_name, chat):
    speaker = speaker_for(speaker_name)
    library = speaker.apply_chat_template(
        chat,
        chat_template=with_generation_markers(speaker.chat_template),
        return_assistant_tokens_mask=True,
        return_dict=True,
    )
    example = tokenize_with_masking(chat, speaker, max_length=NO_LIMIT)
    assert example["input_ids"].tolist() == library["input_ids"]
    assert (example["labels"] != IGNORE_INDEX).long().tolist() == library["assistant_masks"]


def test_same_labels_when_the_rust_tokenizer_has_truncation_set(tokenizer):
    # With truncation or padding left set on the Rust tokenizer, encoding goes through the
    # transformers wrapper (which resets them); both routes must give the same example.
    import copy

    wrapped = copy.deepcopy(tokenizer)
    wrapped.backend_tokenizer.enable_truncation(max_length=100_000)
    chat = [
        {"role": "user", "content": "Hi 🙂"},
        {"role": "assistant", "content": "  Hello 数据\n"},
    ]
    direct, via_wrapper = (
        tokenize_with_masking(chat, tokenizer),
        tokenize_with_masking(chat, wrapped),
    )
    assert all(torch.equal(direct[k], via_wrapper[k]) for k in direct)
    assert wrapped.backend_tokenizer.truncation is None, "the wrapper reset it"


# --- gradient accumulation ---------------------------------------------------------------

ACCUMULATED = [
    TWO_TURNS,
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there, friend!"}],
    [{"role": "user", "content": "Name three colours, please."},
     {"role": "assistant", "content": "Red, green and blue are three colours of the rainbow."}],
]


def _gradients(model, batches, normaliser=None):
    """The gradient of the summed losses of `batches`: each micro-batch's loss divided by
    `normaliser` (transformers' `num_items_in_batch`), or its own mean when None."""
    model.zero_grad()
    for batch in batches:
        loss = model(**batch, num_items_in_batch=normaliser).loss
        (loss if normaliser is not None else loss / len(batches)).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_the_normaliser_makes_accumulation_equal_one_batch(tokenizer):
    model, _ = load_model("tiny")
    examples = [tokenize_with_masking(c, tokenizer) for c in ACCUMULATED]
    micro = [pad_batch([e], tokenizer.pad_token_id) for e in examples]
    assert len({trained_token_count([b]) for b in micro}) == 3  # unequal token counts
    whole = _gradients(model, [pad_batch(examples, tokenizer.pad_token_id)])
    accumulated = _gradients(model, micro, trained_token_count(micro))
    mean_of_means = _gradients(model, micro)
    assert (accumulated - whole).abs().max() < 1e-6
    assert (mean_of_means - whole).abs().max() > 100 * (accumulated - whole).abs().max()


def test_trained_token_count_counts_after_the_shift():
    labels = torch.tensor([[3, 4, IGNORE_INDEX], [IGNORE_INDEX, IGNORE_INDEX, 9]])
    assert trained_token_count([{"labels": labels}]) == 2  # the first position is never scored


@pytest.mark.parametrize(("batches", "error", "message"), [
    ([], ValueError, "no micro-batches"),
    ([{"labels": torch.tensor([1, 2])}], ValueError, "micro-batch 0: labels must be 2-D"),
    ([{"labels": torch.tensor([[5, IGNORE_INDEX]])}], AllMaskedError, "would be NaN"),
])
def test_trained_token_count_rejects_bad_input(batches, error, message):
    with pytest.raises(error, match=message):
        trained_token_count(batches)
