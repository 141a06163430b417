"""Tests of the weighted-SFT core: exact masks, truncation, the loss and its invariance to batch splitting."""

from __future__ import annotations

import math
import string

import pytest
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from drift_ray.config import ExampleKind, LossKind, LrSchedule
from drift_ray.weighted_sft import (
    IGNORE_INDEX,
    TokenizedExample,
    collate,
    fit_plain,
    length_buckets,
    loss_normalizer,
    lr_lambda,
    padding_token_id,
    per_sample_nll,
    tokenize_trajectory,
    weighted_loss,
)

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+3?"},
    {"role": "assistant", "content": "<answer>6</answer>"},
    {"role": "user", "content": "Incorrect. Please think again."},
    {"role": "assistant", "content": "<answer>5</answer>"},
]


def make_tokenizer(
    chat_template: str = CHATML, word_start: bool = False, merges: list[tuple[str, str]] = ()
) -> PreTrainedTokenizerFast:
    """A character-level tokenizer with ChatML special tokens. `word_start`: it marks each text's start
    and its spaces with "▁", as SentencePiece tokenizers (Llama 2, Mistral v1) do, so a reply tokenized
    alone begins with a "▁" of its own. `merges`: pairs of characters it makes one token of."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
    characters = sorted(set(string.printable)) + (["▁"] if word_start else [])
    vocab = {token: i for i, token in enumerate(specials + characters + [a + b for a, b in merges])}
    core = Tokenizer(models.BPE(vocab=vocab, merges=list(merges), unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    if word_start:
        core.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    core.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        chat_template=chat_template,
        name_or_path="test-chars",
    )


def make_model(vocab_size: int, seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        vocab_size=vocab_size,
    )
    return Qwen2ForCausalLM(config)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


def supervised_runs(tokenizer, example: TokenizedExample) -> list[str]:
    """The decoded text of each contiguous run of supervised positions."""
    runs: list[list[int]] = []
    previous_supervised = False
    for token, label in zip(example.input_ids, example.labels):
        if label != IGNORE_INDEX:
            assert label == token
            if not previous_supervised:
                runs.append([])
            runs[-1].append(token)
        previous_supervised = label != IGNORE_INDEX
    return [tokenizer.decode(run) for run in runs]


def test_last_turn_supervises_only_the_last_reply(tokenizer):
    example = tokenize_trajectory(tokenizer, CONVERSATION, ExampleKind.last_turn, max_length=512)

    assert supervised_runs(tokenizer, example) == ["<answer>5</answer><|im_end|>\n"]
    assert tokenizer.decode(example.input_ids) == tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    context = [token for token, label in zip(example.input_ids, example.labels) if label == IGNORE_INDEX]
    assert tokenizer.decode(context) == tokenizer.apply_chat_template(
        CONVERSATION[:-1], add_generation_prompt=True, tokenize=False
    )


def test_all_turns_supervises_every_reply_and_nothing_else(tokenizer):
    example = tokenize_trajectory(tokenizer, CONVERSATION, ExampleKind.all_turns, max_length=512)

    assert supervised_runs(tokenizer, example) == [
        "<answer>6</answer><|im_end|>\n",
        "<answer>5</answer><|im_end|>\n",
    ]
    assert tokenizer.decode(example.input_ids) == tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    supervised_text = "".join(supervised_runs(tokenizer, example))
    for message in CONVERSATION:
        if message["role"] != "assistant":
            assert message["content"] not in supervised_text


CUT_CONVERSATION = [
    *CONVERSATION[:2],
    {"role": "assistant", "content": "Let me count: 1, 2, 3, 4"},  # reached max_new_tokens
    *CONVERSATION[3:],
]


def test_a_cut_off_reply_is_trained_without_an_end_of_turn(tokenizer):
    cut_last = [*CONVERSATION[:-1], {"role": "assistant", "content": "<answer>5 because"}]
    example = tokenize_trajectory(tokenizer, cut_last, ExampleKind.last_turn, 512, cut_off=[False, True])
    assert supervised_runs(tokenizer, example) == ["<answer>5 because"]
    assert tokenizer.decode(example.input_ids).endswith("<|im_start|>assistant\n<answer>5 because")
    # Not known (None) is taken as ended.
    example = tokenize_trajectory(tokenizer, cut_last, ExampleKind.last_turn, 512, cut_off=[None, None])
    assert supervised_runs(tokenizer, example) == ["<answer>5 because<|im_end|>\n"]

    # An earlier reply that was cut off keeps its end of turn in the sequence, as the later turns saw it,
    # but unsupervised.
    example = tokenize_trajectory(tokenizer, CUT_CONVERSATION, ExampleKind.all_turns, 512, cut_off=[True, False])
    assert supervised_runs(tokenizer, example) == ["Let me count: 1, 2, 3, 4", "<answer>5</answer><|im_end|>\n"]
    assert tokenizer.decode(example.input_ids) == tokenizer.apply_chat_template(CUT_CONVERSATION, tokenize=False)
    # last_turn has no earlier reply to supervise.
    example = tokenize_trajectory(tokenizer, CUT_CONVERSATION, ExampleKind.last_turn, 512, cut_off=[True, False])
    assert supervised_runs(tokenizer, example) == ["<answer>5</answer><|im_end|>\n"]
    # Cut to max_length, the cut-off last reply is kept whole, and still without an end of turn.
    example = tokenize_trajectory(tokenizer, cut_last, ExampleKind.last_turn, 24, cut_off=[False, True])
    assert supervised_runs(tokenizer, example) == ["<answer>5 because"] and example.cut_tokens > 0


def test_a_reply_cut_off_before_it_wrote_any_text_supervises_nothing(tokenizer):
    silent = [*CONVERSATION[:2], {"role": "assistant", "content": ""}, *CONVERSATION[3:]]
    example = tokenize_trajectory(tokenizer, silent, ExampleKind.all_turns, 512, cut_off=[True, False])
    assert supervised_runs(tokenizer, example) == ["<answer>5</answer><|im_end|>\n"]
    assert tokenizer.decode(example.input_ids) == tokenizer.apply_chat_template(silent, tokenize=False)
    example = tokenize_trajectory(tokenizer, silent[:3], ExampleKind.last_turn, 512, cut_off=[True])
    assert supervised_runs(tokenizer, example) == []
    logits = torch.zeros(1, len(example.input_ids), len(tokenizer))
    assert per_sample_nll(logits, torch.tensor([example.labels])).tolist() == [0.0]
    # Not cut off, a reply is at least its end of turn: a template that writes none, for no text, is refused.
    bare = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match=r"renders message 3 \(an assistant reply; counted from 1\) as no tokens at all"):
        tokenize_trajectory(make_tokenizer(bare), silent[:3], ExampleKind.last_turn, 512)


def test_cut_off_flags_are_one_per_assistant_message(tokenizer):
    with pytest.raises(ValueError, match="cut_off has 1 flag for 2 assistant messages"):
        tokenize_trajectory(tokenizer, CONVERSATION, ExampleKind.last_turn, 512, cut_off=[True])


def test_a_template_that_ends_an_earlier_reply_otherwise_cannot_leave_its_end_out():
    # Ends a message longer than 20 characters with <|endoftext|>, the others with <|im_end|>.
    tokenizer = make_tokenizer(
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
        "{% if message['content'] | length > 20 %}<|endoftext|>{% else %}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(ValueError, match=r"ends message 3 \(an assistant reply; counted from 1\) otherwise.*train.examples=last_turn"):
        tokenize_trajectory(tokenizer, CUT_CONVERSATION, ExampleKind.all_turns, 512, cut_off=[True, False])


@pytest.mark.parametrize("kind", list(ExampleKind))
def test_a_reply_gets_the_tokens_of_the_whole_text_not_a_word_start_of_its_own(kind):
    tokenizer = make_tokenizer(word_start=True)
    assert tokenizer.tokenize("a b") == ["▁", "a", "▁", "b"]
    conversation = [{**message, "content": f"so {message['content']}"} for message in CONVERSATION]
    example = tokenize_trajectory(tokenizer, conversation, kind, max_length=512)

    rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
    assert example.input_ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    context = tokenizer.apply_chat_template(conversation[:-1], add_generation_prompt=True, tokenize=False)
    reply_start = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    assert example.labels[reply_start:] == example.input_ids[reply_start:]
    assert example.labels[reply_start - 1] == IGNORE_INDEX
    assert len(supervised_runs(tokenizer, example)) == (2 if kind is ExampleKind.all_turns else 1)
    assert tokenizer.convert_ids_to_tokens(example.labels[reply_start]) == "s"  # of "so", no "▁" before it


def test_a_token_across_the_reply_boundary_is_split_there():
    # The generation prompt ends in "\n", and a reply that starts with one would merge with it: the
    # engine's model, continuing the prompt's tokens, produced the reply's "\n" as a token of its own.
    tokenizer = make_tokenizer(merges=[("\n", "\n")])
    conversation = [*CONVERSATION[:-1], {"role": "assistant", "content": "\n<answer>5</answer>"}]
    example = tokenize_trajectory(tokenizer, conversation, ExampleKind.last_turn, max_length=512)

    assert supervised_runs(tokenizer, example) == ["\n<answer>5</answer><|im_end|>\n"]
    assert tokenizer.decode(example.input_ids) == tokenizer.apply_chat_template(conversation, tokenize=False)
    assert example.input_ids != tokenizer(tokenizer.decode(example.input_ids), add_special_tokens=False)["input_ids"]


def test_a_split_at_one_reply_leaves_the_next_pieces_their_whole_text_tokens():
    tokenizer = make_tokenizer(word_start=True, merges=[("\n", "\n")])
    conversation = [*CONVERSATION[:2], {"role": "assistant", "content": "\nno"}, CONVERSATION[3],
                    {"role": "assistant", "content": "so <answer>5</answer>"}]
    example = tokenize_trajectory(tokenizer, conversation, ExampleKind.all_turns, max_length=512)

    run_starts = [i for i, label in enumerate(example.labels) if label != IGNORE_INDEX and example.labels[i - 1] == IGNORE_INDEX]
    # Reply 1 would merge with the generation prompt's "\n", so it was tokenized alone (a word start of
    # its own comes with that); reply 2 still gets the whole text's tokens.
    assert tokenizer.convert_ids_to_tokens([example.input_ids[i] for i in run_starts]) == ["▁", "s"]


def test_messages_after_the_last_reply_are_dropped(tokenizer):
    trailing = CONVERSATION + [{"role": "user", "content": "Incorrect. Please think again."}]
    for kind in ExampleKind:
        assert tokenize_trajectory(tokenizer, trailing, kind, 512) == tokenize_trajectory(
            tokenizer, CONVERSATION, kind, 512
        )


def test_a_conversation_without_reply_is_rejected(tokenizer):
    with pytest.raises(ValueError, match="assistant message"):
        tokenize_trajectory(tokenizer, CONVERSATION[:2], ExampleKind.last_turn, 512)


def test_left_truncation_keeps_the_reply(tokenizer):
    full = tokenize_trajectory(tokenizer, CONVERSATION, ExampleKind.last_turn, max_length=512)
    reply = "<answer>5</answer><|im_end|>\n"
    max_length = 40

    example = tokenize_trajectory(tokenizer, CONVERSATION, ExampleKind.last_turn, max_length)

    assert len(full.input_ids) > max_length
    assert example.input_ids == full.input_ids[-max_length:]
    assert (full.cut_tokens, example.cut_tokens) == (0, len(full.input_ids) - max_length)
    assert supervised_runs(tokenizer, example) == [reply]


THREE_TURNS = [
    *CONVERSATION[:4],
    {"role": "assistant", "content": "<answer>7</answer>"},
    {"role": "user", "content": "Incorrect. Please think again."},
    {"role": "assistant", "content": "<answer>5</answer>"},
]


@pytest.mark.parametrize("kind", list(ExampleKind))
def test_truncation_drops_the_oldest_turns_after_the_question(tokenizer, kind):
    full = tokenize_trajectory(tokenizer, THREE_TURNS, kind, max_length=512)
    # The first answer and its feedback dropped: the question, the second answer, its feedback, the reply.
    shorter = [*THREE_TURNS[:2], *THREE_TURNS[4:]]
    cut_off = [True, False, False]  # the dropped answer's flag goes with it
    expected = tokenize_trajectory(tokenizer, shorter, kind, max_length=512, cut_off=[False, False])

    example = tokenize_trajectory(tokenizer, THREE_TURNS, kind, len(expected.input_ids), cut_off)

    assert (example.input_ids, example.labels) == (expected.input_ids, expected.labels)
    assert example.cut_tokens == len(full.input_ids) - len(expected.input_ids) > 0
    assert tokenizer.decode(example.input_ids).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+3?")
    assert "<answer>6</answer>" not in tokenizer.decode(example.input_ids)


def test_truncation_keeps_the_cut_off_flags_of_the_turns_it_keeps(tokenizer):
    # The second answer was cut off: once the first is dropped, it is still trained without an end of turn.
    shorter = [*THREE_TURNS[:2], *THREE_TURNS[4:]]
    expected = tokenize_trajectory(tokenizer, shorter, ExampleKind.all_turns, max_length=512, cut_off=[True, False])
    example = tokenize_trajectory(
        tokenizer, THREE_TURNS, ExampleKind.all_turns, len(expected.input_ids), cut_off=[False, True, False]
    )
    assert (example.input_ids, example.labels) == (expected.input_ids, expected.labels)
    assert supervised_runs(tokenizer, example) == ["<answer>7</answer>", "<answer>5</answer><|im_end|>\n"]


def test_truncation_keeps_the_last_answer_and_its_feedback_then_cuts_from_the_left(tokenizer):
    full = tokenize_trajectory(tokenizer, THREE_TURNS, ExampleKind.last_turn, max_length=512)
    shortest = tokenize_trajectory(tokenizer, [*THREE_TURNS[:2], *THREE_TURNS[4:]], ExampleKind.last_turn, 512)
    max_length = len(shortest.input_ids) - 5

    example = tokenize_trajectory(tokenizer, THREE_TURNS, ExampleKind.last_turn, max_length)

    assert example.input_ids == shortest.input_ids[-max_length:]
    assert example.cut_tokens == len(full.input_ids) - max_length
    assert supervised_runs(tokenizer, example) == ["<answer>5</answer><|im_end|>\n"]


def test_a_reply_longer_than_max_length_is_cut_on_the_right(tokenizer):
    long_reply = [{"role": "user", "content": "Count."}, {"role": "assistant", "content": "1 2 3 4 5 6 7 8 9 10"}]
    full = tokenize_trajectory(tokenizer, long_reply, ExampleKind.last_turn, max_length=512)
    reply_start = next(i for i, label in enumerate(full.labels) if label != IGNORE_INDEX)

    example = tokenize_trajectory(tokenizer, long_reply, ExampleKind.last_turn, max_length=8)

    assert example.input_ids == full.input_ids[reply_start - 1 : reply_start + 7]
    assert example.cut_tokens == len(full.input_ids) - 8
    assert example.labels[0] == IGNORE_INDEX
    assert supervised_runs(tokenizer, example) == ["1 2 3 4"]  # the first 7 reply tokens, each predicted


def test_a_template_whose_renderings_do_not_extend_one_another_is_refused_only_for_all_turns():
    counting = make_tokenizer("{{ messages | length }}" + CHATML)
    example = tokenize_trajectory(counting, CONVERSATION, ExampleKind.last_turn, 512)
    # The last reply after the prompt the policy saw, though the whole conversation renders otherwise.
    context = counting.apply_chat_template(CONVERSATION[:-1], add_generation_prompt=True, tokenize=False)
    assert counting.decode(example.input_ids) == context + "<answer>5</answer><|im_end|>\n"
    with pytest.raises(ValueError, match="test-chars.*not prefix-stable"):
        tokenize_trajectory(counting, CONVERSATION, ExampleKind.all_turns, 512)


THINKING_PROMPT = CHATML.replace("<|im_start|>assistant\n{% endif %}", "<|im_start|>assistant\n<think>\n{% endif %}")


@pytest.mark.parametrize("template", [CHATML, THINKING_PROMPT], ids=["plain-prompt", "prompt-opens-think"])
def test_the_last_reply_is_trained_as_written_where_the_template_would_drop_its_reasoning(template):
    # As DeepSeek-R1's template writes every assistant message; its generation prompt may open the reasoning.
    dropping = make_tokenizer(template.replace("{{ message['content'] }}", "{{ message['content'].split('</think>')[-1] }}"))
    reasoned = "2+3 is 5</think><answer>5</answer>"
    example = tokenize_trajectory(dropping, [*CONVERSATION[:-1], {"role": "assistant", "content": reasoned}], ExampleKind.last_turn, 512)
    context = dropping.apply_chat_template(CONVERSATION[:-1], add_generation_prompt=True, tokenize=False)
    assert dropping.decode(example.input_ids) == context + reasoned + "<|im_end|>\n"
    assert supervised_runs(dropping, example) == [reasoned + "<|im_end|>\n"]


def test_a_template_that_does_not_write_a_reply_is_refused():
    hiding = make_tokenizer(CHATML.replace("{{ message['content'] }}", "{{ '' if message['role'] == 'assistant' else message['content'] }}"))
    with pytest.raises(ValueError, match=r"^test-chars: the chat template does not write the content of the assistant message after messages\[:4\]"):
        tokenize_trajectory(hiding, CONVERSATION, ExampleKind.last_turn, 512)


def test_all_turns_needs_a_template_stable_across_turns():
    # Like templates that drop earlier reasoning: only the last reply is rendered in full.
    shown = "{{ message['content'] if loop.last or message['role'] != 'assistant' else '...' }}"
    last_reply_only = make_tokenizer(CHATML.replace("{{ message['content'] }}", shown))
    tokenize_trajectory(last_reply_only, CONVERSATION, ExampleKind.last_turn, 512)
    with pytest.raises(ValueError, match="not prefix-stable.*examples=last_turn"):
        tokenize_trajectory(last_reply_only, CONVERSATION, ExampleKind.all_turns, 512)


def test_collate_pads_on_the_right(tokenizer):
    short = TokenizedExample([5, 6, 7], [IGNORE_INDEX, 6, 7])
    long = TokenizedExample([8, 9, 10, 11, 12], [IGNORE_INDEX, IGNORE_INDEX, 10, 11, 12])

    batch = collate([short, long], [0.5, 2.0], pad_token_id=0)

    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, IGNORE_INDEX], long.labels]
    assert batch["weights"].dtype == torch.float32 and batch["weights"].tolist() == [0.5, 2.0]


def test_length_buckets_cover_every_index_once_and_cut_padding():
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 500, (300,), generator=generator).tolist()

    batches = length_buckets(lengths, batch_size=8, seed=3)

    assert sorted(i for batch in batches for i in batch) == list(range(300))
    assert [len(batch) for batch in batches].count(8) == len(batches) - 1
    assert length_buckets(lengths, batch_size=8, seed=3) == batches
    assert length_buckets(lengths, batch_size=8, seed=4) != batches

    def padding(groups):
        return sum(len(g) * max(lengths[i] for i in g) - sum(lengths[i] for i in g) for g in groups)

    unsorted = [list(range(i, min(i + 8, 300))) for i in range(0, 300, 8)]
    assert padding(batches) < padding(unsorted) / 4


def test_per_sample_nll_matches_a_token_loop():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=generator)
    labels = torch.randint(0, 11, (3, 7), generator=generator)
    labels[0, :4] = IGNORE_INDEX
    labels[1, 2:] = IGNORE_INDEX
    labels[2, 5] = IGNORE_INDEX

    expected = []
    for row in range(3):
        token_nll = [
            -torch.log_softmax(logits[row, t - 1], dim=-1)[labels[row, t]]
            for t in range(1, 7)
            if labels[row, t] != IGNORE_INDEX
        ]
        expected.append(sum(token_nll) / len(token_nll))

    torch.testing.assert_close(per_sample_nll(logits, labels), torch.stack(expected), atol=1e-6, rtol=0)
    assert per_sample_nll(logits.bfloat16(), labels).dtype == torch.float32


def test_weighted_loss_with_unit_weights_is_the_plain_mean():
    nll = torch.tensor([0.5, 1.5, 4.0])
    weights = torch.ones(3)

    loss = weighted_loss(nll, weights, loss_normalizer([1.0, 1.0, 1.0], LossKind.sample_mean))

    assert loss.item() == pytest.approx(nll.mean().item())


def test_loss_normalizers():
    weights = [0.5, 2.0, 0.0, 1.0]
    assert loss_normalizer(weights, LossKind.sample_mean) == 4.0
    assert loss_normalizer(weights, LossKind.weight_normalized) == 3.5
    assert loss_normalizer([0.25, 0.5], "weight_normalized") == 0.75
    assert loss_normalizer([0.0, 0.0], LossKind.weight_normalized) == 1.0
    with pytest.raises(ValueError, match="non-negative"):
        loss_normalizer([1.0, -0.5], LossKind.sample_mean)


def test_a_zero_weight_sample_gets_no_gradient():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 6, 9, generator=generator, requires_grad=True)
    labels = torch.randint(0, 9, (3, 6), generator=generator)
    weights = torch.tensor([1.0, 0.0, 2.0])

    weighted_loss(per_sample_nll(logits, labels), weights, loss_normalizer(weights.tolist(), "sample_mean")).backward()

    assert torch.count_nonzero(logits.grad[1]) == 0
    assert torch.count_nonzero(logits.grad[0]) > 0 and torch.count_nonzero(logits.grad[2]) > 0


# Four examples of different lengths with different weights: one global batch.
INVARIANCE_WEIGHTS = [0.5, 2.0, 1.25, 0.25]


def invariance_examples(tokenizer) -> list[TokenizedExample]:
    conversations = [
        [{"role": "user", "content": "q" * (3 + 5 * i)}, {"role": "assistant", "content": "a" * (2 + 3 * i)}]
        for i in range(4)
    ]
    return [tokenize_trajectory(tokenizer, c, ExampleKind.last_turn, 512) for c in conversations]


def gradient(model, tokenizer, examples, weights, normalizer) -> list[torch.Tensor]:
    """Gradients of the micro-batch loss of these examples, with the given global normalizer."""
    model.zero_grad(set_to_none=True)
    batch = collate(examples, weights, tokenizer.pad_token_id)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    weighted_loss(per_sample_nll(logits, batch["labels"]), batch["weights"], normalizer).backward()
    return [p.grad.clone() for p in model.parameters()]


def assert_same_gradients(actual, expected):
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("kind", list(LossKind))
def test_gradient_accumulation_of_4_micro_batches_equals_one_batch(tokenizer, kind):
    model = make_model(len(tokenizer))
    examples = invariance_examples(tokenizer)
    normalizer = loss_normalizer(INVARIANCE_WEIGHTS, kind)
    full_batch = gradient(model, tokenizer, examples, INVARIANCE_WEIGHTS, normalizer)

    model.zero_grad(set_to_none=True)
    for example, weight in zip(examples, INVARIANCE_WEIGHTS):
        batch = collate([example], [weight], tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        weighted_loss(per_sample_nll(logits, batch["labels"]), batch["weights"], normalizer).backward()
    accumulated = [p.grad.clone() for p in model.parameters()]

    assert any(g.abs().max() > 1e-4 for g in full_batch)
    assert_same_gradients(accumulated, full_batch)


def test_padding_takes_the_pad_token_else_the_eos_token_else_fails():
    tokenizer = make_tokenizer()
    assert padding_token_id(tokenizer) == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    tokenizer.pad_token = None
    assert padding_token_id(tokenizer) == tokenizer.convert_tokens_to_ids("<|im_end|>")
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="test-chars: the tokenizer has neither a pad token nor an EOS token"):
        padding_token_id(tokenizer)


def test_lr_lambda_shapes():
    total, ratio = 100, 0.1
    warmup = [lr_lambda(step, total, ratio, LrSchedule.constant) for step in range(10)]
    steps = [b - a for a, b in zip(warmup, warmup[1:])]
    assert 0 < warmup[0] < 0.2 and warmup[-1] < 1
    assert steps == pytest.approx([steps[0]] * len(steps))

    assert [lr_lambda(step, total, ratio, "constant") for step in range(10, total + 1)] == [1.0] * (total - 9)

    cosine = [lr_lambda(step, total, ratio, LrSchedule.cosine) for step in range(total + 1)]
    assert cosine[:10] == warmup
    assert cosine[10] == 1.0
    assert cosine[55] == pytest.approx(0.5)
    assert all(b <= a for a, b in zip(cosine[10:], cosine[11:]))
    assert 0 < cosine[total - 1] < 1e-3 and cosine[total] == pytest.approx(0.0, abs=1e-12)
    assert lr_lambda(0, total, 0.0, LrSchedule.cosine) == 1.0
    # A short run reaches the peak: its last step at least, however long the warmup ratio asks for.
    assert [lr_lambda(0, 1, 0.1, schedule) for schedule in LrSchedule] == [1.0, 1.0]
    assert [lr_lambda(step, 2, 0.9, "constant") for step in range(2)] == [0.5, 1.0]


def demo_conversations() -> list[list[dict[str, str]]]:
    problems = [("1+1", "2"), ("2+2", "4"), ("3+4", "7"), ("5+3", "8")]
    return [
        [{"role": "user", "content": question}, {"role": "assistant", "content": f"<answer>{answer}</answer>"}]
        for question, answer in problems
    ] * 4


def mean_nll(model, tokenizer, conversations) -> float:
    examples = [tokenize_trajectory(tokenizer, c, ExampleKind.last_turn, 128) for c in conversations]
    batch = collate(examples, [1.0] * len(examples), tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return per_sample_nll(logits, batch["labels"]).mean().item()


def fit(tokenizer, conversations, seed: int, epochs: int, weights=None):
    model = make_model(len(tokenizer))
    stats = fit_plain(
        model,
        tokenizer,
        conversations,
        weights,
        kind=ExampleKind.last_turn,
        loss=LossKind.sample_mean,
        lr=1e-2,
        epochs=epochs,
        batch_size=4,
        max_length=128,
        warmup_ratio=0.1,
        schedule=LrSchedule.cosine,
        seed=seed,
    )
    return model, stats


def test_fit_plain_lowers_the_loss(tokenizer):
    conversations = demo_conversations()
    before = mean_nll(make_model(len(tokenizer)), tokenizer, conversations)

    model, stats = fit(tokenizer, conversations, seed=0, epochs=6)
    after = mean_nll(model, tokenizer, conversations)

    assert stats["steps"] == 6 * 4
    assert stats["tokens"] == 6 * sum(
        len(tokenize_trajectory(tokenizer, c, ExampleKind.last_turn, 128).input_ids) for c in conversations
    )
    assert after < before / 2
    assert stats["final_loss"] < stats["initial_loss"] / 2
    assert math.isfinite(stats["tokens_per_s"]) and stats["seconds"] > 0



def test_fit_plain_leaves_out_weight_0_as_the_distributed_loop_does(tokenizer):
    conversations = demo_conversations()
    weights = [float(i % 2) for i in range(len(conversations))]
    model, stats = fit(tokenizer, conversations, seed=0, epochs=2, weights=weights)
    kept, kept_stats = fit(tokenizer, conversations[1::2], seed=0, epochs=2)

    assert stats == {**kept_stats, "seconds": stats["seconds"], "tokens_per_s": stats["tokens_per_s"]}
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), kept.parameters()))
    with pytest.raises(ValueError, match="at least one conversation with a positive weight"):
        fit(tokenizer, conversations, seed=0, epochs=1, weights=[0.0] * len(conversations))
    for bad in (-1.0, math.nan):
        with pytest.raises(ValueError, match=f"finite and >= 0; found {bad} at conversation 2$"):
            fit(tokenizer, conversations, seed=0, epochs=1, weights=[1.0, 1.0, bad] + weights[3:])


def test_fit_plain_is_deterministic_for_a_seed(tokenizer):
    conversations = demo_conversations()
    model, stats = fit(tokenizer, conversations, seed=0, epochs=2)
    again, again_stats = fit(tokenizer, conversations, seed=0, epochs=2)
    other, _ = fit(tokenizer, conversations, seed=1, epochs=2)

    assert again_stats["final_loss"] == stats["final_loss"]
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))
