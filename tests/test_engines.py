"""Tests of the generation engines on untrained tiny models (fast) and of the vLLM engine (GPU only)."""

from __future__ import annotations

import json
import re
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tokenizers import decoders
from transformers import AutoTokenizer

from drift_ray.config import EngineKind, RolloutConfig
from drift_ray.engines import (
    TransformersEngine,
    VLLMEngine,
    _StopStrings,
    build_engine,
    cut_at_stop,
    lora_adapter_base,
    reply_text,
    vllm_max_lora_rank,
)
from drift_ray.episode import Generation, SamplingParams
from drift_ray.weighted_sft import IGNORE_INDEX, tokenize_trajectory
from tests.test_weighted_sft import make_tokenizer

QUESTIONS = ["What is 2+2?", "hello", "x is between 12 and 31, and x+7 ends in 4. What is x?", "abc" * 5, "Why?"]
CONVERSATIONS = [[{"role": "user", "content": q}] for q in QUESTIONS]
GREEDY = SamplingParams(temperature=0, max_new_tokens=24, stop=())


@pytest.fixture(scope="module")
def engine(tiny_model_dir: str) -> TransformersEngine:
    return TransformersEngine(tiny_model_dir, torch_threads=1)


@pytest.fixture(scope="module")
def chaotic_dir(chaotic_tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The chaotic tiny model with its <|im_end|> output row scaled up just enough that, under greedy
    decoding of CONVERSATIONS, some replies end on it and some run to max_new_tokens. Found here rather
    than fixed, so the tests hold whatever the demo tokenizer's vocabulary does to the random weights."""
    engine = TransformersEngine(chaotic_tiny_model_dir, torch_threads=1)
    row = engine.model.get_output_embeddings().weight[engine.tokenizer.eos_token_id]
    original = row.detach().clone()
    for factor in np.arange(1.0, 4.0, 0.1):
        with torch.no_grad():
            row.copy_(original * factor)
        lengths = {group[0].completion_tokens for group in engine.generate(CONVERSATIONS, GREEDY, 1)}
        if min(lengths) < GREEDY.max_new_tokens == max(lengths):
            break
    else:
        pytest.fail("no scale of the <|im_end|> output row gives both early-ending and full-length greedy replies")
    out = tmp_path_factory.mktemp("chaotic-ending")
    engine.model.save_pretrained(out)
    engine.tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def chaotic(chaotic_dir: str) -> TransformersEngine:
    return TransformersEngine(chaotic_dir, torch_threads=1)


def texts(results: list[list[Generation]]) -> list[list[str]]:
    return [[g.text for g in group] for group in results]


def test_n_samples_per_conversation_with_token_counts(engine):
    params = SamplingParams(temperature=1.0, max_new_tokens=12, seed=0)
    results = engine.generate(CONVERSATIONS, params, 3)
    assert [len(group) for group in results] == [3] * len(CONVERSATIONS)
    for conversation, group in zip(CONVERSATIONS, results):
        rendered = engine.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        prompt_length = len(engine.tokenizer(rendered, add_special_tokens=False)["input_ids"])
        for generation in group:
            assert generation.prompt_tokens == prompt_length
            assert 1 <= generation.completion_tokens <= 12


def test_greedy_samples_are_identical_deterministic_and_depend_on_the_prompt(chaotic):
    first = texts(chaotic.generate(CONVERSATIONS, GREEDY, 3))
    assert all(len(set(group)) == 1 for group in first)
    assert len({group[0] for group in first}) == len(CONVERSATIONS)
    assert texts(chaotic.generate(CONVERSATIONS, GREEDY, 3)) == first


def test_sampling_is_reproducible_for_a_seed_and_differs_between_seeds(engine):
    def sample(seed: int) -> list[list[str]]:
        return texts(engine.generate(CONVERSATIONS, SamplingParams(temperature=1.0, max_new_tokens=16, seed=seed), 4))

    same = sample(7)
    assert sample(7) == same
    assert sample(8) != same
    assert all(len(set(group)) > 1 for group in same)


def test_top_p_keeps_only_the_most_likely_tokens(chaotic):
    tiny_nucleus = SamplingParams(temperature=1.0, top_p=1e-6, max_new_tokens=24, stop=(), seed=3)
    assert chaotic.generate(CONVERSATIONS, tiny_nucleus, 2) == chaotic.generate(CONVERSATIONS, GREEDY, 2)


def test_shared_prefill_equals_one_prompt_copy_per_sample_under_greedy(chaotic):
    shared = chaotic.generate(CONVERSATIONS, GREEDY, 3)
    copies = chaotic.generate([c for c in CONVERSATIONS for _ in range(3)], GREEDY, 1)
    assert [g for group in shared for g in group] == [group[0] for group in copies]


def test_encoding_each_prompt_per_sample_gives_the_shared_prefill_results(chaotic_dir, chaotic):
    unshared = TransformersEngine(chaotic_dir, torch_threads=1, share_prefill=False)
    assert unshared.generate(CONVERSATIONS, GREEDY, 3) == chaotic.generate(CONVERSATIONS, GREEDY, 3)


def prefill_tokens(engine: TransformersEngine, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Records, for each prefill forward pass of `engine`, how many token positions it was fed (padding included)."""
    fed: list[int] = []
    forward = engine.model.forward

    def counting(*args, **kwargs):
        if kwargs["input_ids"].shape[1] > 1:
            fed.append(kwargs["input_ids"].numel())
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine.model, "forward", counting)
    return fed


def play_turns(engine: TransformersEngine, turns: int, newcomer_at: int) -> list[list[dict]]:
    """Greedy conversations grown turn by turn with a feedback message; a fresh conversation joins at `newcomer_at`."""
    conversations = [list(c) for c in CONVERSATIONS]
    for turn in range(turns):
        if turn == newcomer_at:
            conversations.append([{"role": "user", "content": "A newcomer?"}])
        for conversation, group in zip(conversations, engine.generate(conversations, GREEDY, 1)):
            conversation += [{"role": "assistant", "content": group[0].text}, {"role": "user", "content": "Wrong."}]
    return conversations


def test_carried_cache_prefills_only_new_tokens_and_changes_no_greedy_reply(chaotic_dir, monkeypatch):
    carried = TransformersEngine(chaotic_dir, torch_threads=1, carry_cache=True)
    fresh = TransformersEngine(chaotic_dir, torch_threads=1, carry_cache=False)
    carried_fed, fresh_fed = prefill_tokens(carried, monkeypatch), prefill_tokens(fresh, monkeypatch)
    assert play_turns(carried, 3, newcomer_at=1) == play_turns(fresh, 3, newcomer_at=1)
    assert carried_fed[0] == fresh_fed[0]  # nothing to reuse on the first turn
    assert sum(carried_fed[1:]) < sum(fresh_fed[1:]) / 2


def test_no_cache_is_carried_beyond_max_carried_bytes(chaotic_dir, monkeypatch):
    whole = TransformersEngine(chaotic_dir, torch_threads=1)
    whole.generate(CONVERSATIONS, GREEDY, 1)
    carried = sum(prefix.nbytes for prefix in whole._replies.values())
    assert len(whole._replies) == len(CONVERSATIONS) and carried > 0
    all_but_one = TransformersEngine(chaotic_dir, torch_threads=1, max_carried_bytes=carried - 1)
    all_but_one.generate(CONVERSATIONS, GREEDY, 1)
    assert len(all_but_one._replies) == len(CONVERSATIONS) - 1

    capped = TransformersEngine(chaotic_dir, torch_threads=1, max_carried_bytes=0)
    fresh = TransformersEngine(chaotic_dir, torch_threads=1, carry_cache=False)
    capped_fed, fresh_fed = prefill_tokens(capped, monkeypatch), prefill_tokens(fresh, monkeypatch)
    assert play_turns(capped, 2, newcomer_at=1) == play_turns(fresh, 2, newcomer_at=1)
    assert capped_fed == fresh_fed


def test_a_dropped_cache_is_not_reused_after_the_weights_change(chaotic_dir, monkeypatch):
    policy = TransformersEngine(chaotic_dir, torch_threads=1)
    first = policy.generate(CONVERSATIONS, GREEDY, 1)
    with torch.no_grad():  # an update in place, as online RL makes between calls
        for parameter in policy.model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    policy.drop_carried_cache()
    after = [
        [*c, {"role": "assistant", "content": group[0].text}, {"role": "user", "content": "Wrong."}]
        for c, group in zip(CONVERSATIONS, first)
    ]
    fresh = TransformersEngine(policy.model, tokenizer=policy.tokenizer, carry_cache=False)
    policy_fed, fresh_fed = prefill_tokens(policy, monkeypatch), prefill_tokens(fresh, monkeypatch)
    assert policy.generate(after, GREEDY, 1) == fresh.generate(after, GREEDY, 1)
    assert policy_fed == fresh_fed  # the whole history prefilled with the new weights


def test_carried_cache_is_not_used_for_a_conversation_whose_reply_was_changed(chaotic_dir):
    carried = TransformersEngine(chaotic_dir, torch_threads=1, carry_cache=True)
    first = carried.generate(CONVERSATIONS, GREEDY, 1)
    edited = [
        [*c, {"role": "assistant", "content": group[0].text[:-1] + "#"}, {"role": "user", "content": "Wrong."}]
        for c, group in zip(CONVERSATIONS, first)
    ]
    fresh = TransformersEngine(chaotic_dir, torch_threads=1, carry_cache=False)
    assert carried.generate(edited, GREEDY, 1) == fresh.generate(edited, GREEDY, 1)


def test_rows_that_finish_early_leave_the_batch_without_changing_the_others(chaotic):
    batched = chaotic.generate(CONVERSATIONS, GREEDY, 2)
    lengths = {group[0].completion_tokens for group in batched}
    assert min(lengths) < GREEDY.max_new_tokens == max(lengths), "expected some replies to end early"
    alone = [chaotic.generate([c], GREEDY, 2)[0] for c in CONVERSATIONS]
    assert batched == alone


def test_small_batch_budget_splits_the_work_without_changing_greedy_results(chaotic_dir, chaotic):
    small = TransformersEngine(chaotic_dir, torch_threads=1, max_batch_tokens=40)
    assert small.generate(CONVERSATIONS, GREEDY, 2) == chaotic.generate(CONVERSATIONS, GREEDY, 2)


def test_end_of_turn_token_ends_the_reply_is_counted_and_not_returned(chaotic):
    results = chaotic.generate(CONVERSATIONS, GREEDY, 1)
    ended = [group[0] for group in results if group[0].completion_tokens < GREEDY.max_new_tokens]
    assert ended, "expected some greedy replies of the chaotic model to end on <|im_end|>"
    for generation in ended:
        assert generation.completion_tokens == len(generation.text) + 1
        assert "<|im_end|>" not in generation.text
    end_of_turn = chaotic.tokenizer.convert_tokens_to_ids("<|im_end|>")
    for [generation] in results:  # the tokens sampled, which online RL trains: the end of turn where sampled
        assert len(generation.token_ids) == generation.completion_tokens
        assert chaotic.tokenizer.decode(generation.token_ids, skip_special_tokens=True) == generation.text
        assert (generation.token_ids[-1] == end_of_turn) == (generation in ended)


def test_a_reply_is_cut_off_where_it_reached_max_new_tokens_without_ending(chaotic):
    replies = [group[0] for group in chaotic.generate(CONVERSATIONS, GREEDY, 1)]
    # Some greedy replies of the chaotic model end on <|im_end|> (a token more than their characters).
    assert [reply.cut_off for reply in replies] == [reply.completion_tokens == len(reply.text) for reply in replies]
    assert {reply.cut_off for reply in replies} == {True, False}
    cut = next(reply for reply in replies if reply.cut_off)
    # The reply's shortest suffix seen nowhere before in it, as a stop string: reached on the last token allowed.
    stop = next(cut.text[-k:] for k in range(1, len(cut.text) + 1) if cut.text.find(cut.text[-k:]) == len(cut.text) - k)
    params = SamplingParams(temperature=0, max_new_tokens=GREEDY.max_new_tokens, stop=(stop,))
    [[stopped]] = chaotic.generate([CONVERSATIONS[replies.index(cut)]], params, 1)
    assert (stopped.text, stopped.completion_tokens, stopped.cut_off) == (cut.text, GREEDY.max_new_tokens, False)


@pytest.mark.parametrize("share_prefill", [True, False])
def test_a_reply_stops_cut_off_at_the_end_of_the_model_s_context_and_a_prompt_filling_it_is_refused(
    chaotic_dir, share_prefill
):
    default = TransformersEngine(chaotic_dir, torch_threads=1)
    assert default.context_length == default.model.config.max_position_embeddings
    texts = [default.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in CONVERSATIONS]
    prompts = [len(ids) for ids in default.tokenizer(texts, add_special_tokens=False)["input_ids"]]
    engine = TransformersEngine(chaotic_dir, torch_threads=1, share_prefill=share_prefill, max_model_len=max(prompts) + 3)
    at_the_end = []
    for prompt, group in zip(prompts, engine.generate(CONVERSATIONS, GREEDY, 2)):
        for reply in group:
            assert prompt + reply.completion_tokens <= engine.context_length
            if prompt + reply.completion_tokens == engine.context_length:
                at_the_end.append(reply)
    assert at_the_end
    # Cut off unless its last token ended the turn (a token more than its characters).
    assert all(reply.cut_off == (reply.completion_tokens == len(reply.text)) for reply in at_the_end)
    longest = [CONVERSATIONS[prompts.index(max(prompts))]]
    filled = TransformersEngine(chaotic_dir, torch_threads=1, max_model_len=max(prompts))
    with pytest.raises(
        ValueError,
        match=rf"conversation 0 is a prompt of {max(prompts)} tokens, .* context of {max(prompts)} tokens "
        r"\(rollout\.max_model_len\)",
    ):
        filled.generate(longest, GREEDY, 1)
    positions = default.model.config.max_position_embeddings
    default.context_length = max(prompts)  # as a model of that many positions has
    with pytest.raises(ValueError, match=rf"context of {max(prompts)} tokens \(max_position_embeddings\)"):
        default.generate(longest, GREEDY, 1)
    with pytest.raises(ValueError, match=rf"rollout\.max_model_len={positions + 1} is above the model's context of {positions} "):
        TransformersEngine(chaotic_dir, max_model_len=positions + 1)


def test_a_reply_at_the_end_of_the_context_feeds_no_position_beyond_it(chaotic_dir):
    """A row that filled the context stays in the batch until a quarter of it has finished: its later
    steps must not feed positions past the model's last (learned position embeddings have none there)."""
    engine = TransformersEngine(chaotic_dir, torch_threads=1)
    long = [{"role": "user", "content": " ".join(QUESTIONS)}]
    conversations = [long, *CONVERSATIONS[:4]]  # the long one's row is 1/5 of the batch
    texts = [engine.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
    prompts = [len(ids) for ids in engine.tokenizer(texts, add_special_tokens=False)["input_ids"]]
    assert prompts[0] > max(prompts[1:]) + 8
    engine.context_length = prompts[0] + 3
    fed = []
    forward = engine.model.forward

    def recording(*args, **kwargs):
        if kwargs.get("position_ids") is not None:
            fed.append(int(kwargs["position_ids"].max()))
        return forward(*args, **kwargs)

    engine.model.forward = recording
    no_end = SamplingParams(temperature=0, max_new_tokens=GREEDY.max_new_tokens, stop=())
    replies = engine.generate(conversations, no_end, 1)
    assert replies[0][0].completion_tokens == 3 and replies[0][0].cut_off
    assert fed and max(fed) < engine.context_length


def test_max_new_tokens_is_respected(chaotic):
    for limit in (1, 5):
        params = SamplingParams(temperature=1.0, max_new_tokens=limit, stop=(), seed=0)
        for group in chaotic.generate(CONVERSATIONS, params, 2):
            assert all(1 <= g.completion_tokens <= limit for g in group)


def test_reply_ends_just_after_the_first_stop_string(chaotic):
    unstopped = [group[0].text for group in chaotic.generate(CONVERSATIONS, GREEDY, 1)]
    full = max(unstopped, key=len)
    conversation = CONVERSATIONS[unstopped.index(full)]
    stop = full[6:9]
    end = full.find(stop) + len(stop)
    params = SamplingParams(temperature=0, max_new_tokens=24, stop=("never-generated", stop))
    stopped = chaotic.generate([conversation], params, 2)[0]
    assert [g.text for g in stopped] == [full[:end]] * 2
    assert [g.completion_tokens for g in stopped] == [end] * 2


def test_cut_at_stop_keeps_text_up_to_the_earliest_ending_stop_string():
    assert cut_at_stop("a <answer>1</answer> b </answer>", ["</answer>"]) == "a <answer>1</answer>"
    assert cut_at_stop("xx STOP yy END", ["END", "STOP"]) == "xx STOP"
    assert cut_at_stop("no stop here", ["</answer>", ""]) == "no stop here"


def test_a_reply_reads_as_it_continues_the_prompt_so_weighted_sft_trains_the_sampled_tokens():
    # Llama 2's SentencePiece tokenizer and template: "▁" starts a word, and the decoder drops the one that
    # starts a text; the template writes a space before the reply.
    template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
        "{% else %} {{ m['content'] | trim }} <|im_end|>{% endif %}{% endfor %}"
    )
    tokenizer = make_tokenizer(template, word_start=True, merges=[("▁", "5")])
    tokenizer.backend_tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    conversation = [{"role": "user", "content": "What is 2+3?"}]
    prompt = tokenizer(tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False),
                       add_special_tokens=False)["input_ids"]
    sampled = tokenizer.convert_tokens_to_ids(["▁5"])
    assert tokenizer.decode(sampled) == "5"  # alone, the word start is lost
    text = reply_text(tokenizer, prompt, sampled)
    assert text == " 5"
    example = tokenize_trajectory(tokenizer, [*conversation, {"role": "assistant", "content": text}], "last_turn", 64)
    supervised = [token for token, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]
    assert example.input_ids[: len(prompt)] == prompt and supervised[0] == sampled[0]


def test_build_engine_refuses_the_unresolved_demo_model():
    with pytest.raises(ValueError, match="ensure_demo_model"):
        build_engine(RolloutConfig(model="builtin:demo"))


def test_build_engine_makes_a_transformers_engine(tiny_model_dir):
    import torch

    cfg = RolloutConfig(engine=EngineKind.transformers, dtype="bfloat16", torch_threads=1, max_model_len=100)
    engine = build_engine(cfg, tiny_model_dir)
    assert isinstance(engine, TransformersEngine) and engine.name == tiny_model_dir
    assert next(engine.model.parameters()).dtype == torch.bfloat16
    assert engine.context_length == 100


def test_build_engine_gives_vllm_the_context_to_size_its_cache_for(tiny_model_dir, fake_vllm):
    build_engine(RolloutConfig(engine=EngineKind.vllm, gpus_per_actor=1, max_model_len=4096), tiny_model_dir)
    [(model, options)] = fake_vllm.built
    assert model == tiny_model_dir and options["max_model_len"] == 4096


def test_build_engine_without_a_reserved_gpu_runs_on_the_cpu(tiny_model_dir, monkeypatch):
    import torch

    # A GPU node: Ray no longer hides its GPUs from an actor that reserved none.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    engine = build_engine(RolloutConfig(engine=EngineKind.transformers, gpus_per_actor=0, torch_threads=1), tiny_model_dir)
    assert engine.device == torch.device("cpu") and next(engine.model.parameters()).device.type == "cpu"


@pytest.mark.vllm
def test_vllm_engine_samples_n_replies_and_keeps_the_stop_string(tiny_model_dir):
    pytest.importorskip("vllm")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("vLLM needs a CUDA GPU")
    from drift_ray.engines import VLLMEngine

    engine = VLLMEngine(tiny_model_dir, gpu_memory_utilization=0.3)
    params = SamplingParams(temperature=1.0, max_new_tokens=16, stop=("a",), seed=0)
    results = engine.generate(CONVERSATIONS, params, 3)
    assert [len(group) for group in results] == [3] * len(CONVERSATIONS)
    for group in results:
        for generation in group:
            assert 1 <= generation.completion_tokens <= 16 and generation.prompt_tokens > 0
            assert "a" not in generation.text[:-1]


@pytest.fixture
def fake_vllm(monkeypatch) -> SimpleNamespace:
    """vLLM as VLLMEngine uses it, without vLLM or a GPU: records each LLM's options and each chat's requests."""
    calls = SimpleNamespace(built=[], asked=[])

    class FakeLLM:
        def __init__(self, model, **options):
            calls.built.append((model, options))
            self.model = model

        def get_tokenizer(self):
            return AutoTokenizer.from_pretrained(self.model)

        def chat(self, conversations, sampling, use_tqdm, lora_request):
            calls.asked.append(sampling)
            # The first two samples of each request reached max_tokens, the second on its end-of-turn token,
            # which releases that test the length first report as "length" too.
            turn_end = self.get_tokenizer().convert_tokens_to_ids("<|im_end|>")
            outputs = [
                SimpleNamespace(text="<answer>1", token_ids=[1, 2], finish_reason="length"),
                SimpleNamespace(text="<answer>1", token_ids=[1, turn_end], finish_reason="length"),
            ]
            outputs += [SimpleNamespace(text="<answer>1</answer>", token_ids=[1, 2], finish_reason="stop")] * 2
            return [SimpleNamespace(prompt_token_ids=[0], outputs=outputs[: params.n]) for params in sampling]

    monkeypatch.setitem(sys.modules, "vllm", SimpleNamespace(LLM=FakeLLM, SamplingParams=SimpleNamespace))
    monkeypatch.setitem(sys.modules, "vllm.lora", SimpleNamespace())
    monkeypatch.setitem(sys.modules, "vllm.lora.request", SimpleNamespace(LoRARequest=lambda *args: args))
    return calls


def test_vllm_engine_seeds_every_conversation_apart_and_ends_turns_where_transformers_does(
    tiny_model_dir, engine, fake_vllm
):
    """vLLM seeds each request's sampler with the request's seed (its n children with seed + j): one
    SamplingParams for all would make conversations with the same history reply alike. And it stops at
    the eos of the model's configs only, which for a base model's config is not the chat's end of turn."""
    replies = VLLMEngine(tiny_model_dir).generate([CONVERSATIONS[0]] * 3, SamplingParams(temperature=1.0, seed=100), 4)
    [(_, options)] = fake_vllm.built
    assert options["max_model_len"] is None  # the model's
    [sampling] = fake_vllm.asked
    assert [params.seed for params in sampling] == [100, 104, 108]
    assert all(params.n == 4 and params.temperature == 1.0 for params in sampling)
    # A reply that stops on "</answer>" keeps it, as the transformers engine's replies do.
    assert all(params.stop == ["</answer>"] and params.include_stop_str_in_output is True for params in sampling)
    assert [len(group) for group in replies] == [4, 4, 4]
    assert [[reply.cut_off for reply in group] for group in replies] == [[True, False, False, False]] * 3
    turn_end = engine.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert turn_end in engine.end_of_turn_ids
    assert all(params.stop_token_ids == [turn_end] for params in sampling)


@pytest.mark.parametrize(
    "ranks, max_lora_rank", [({"r": 8}, 8), ({"r": 32}, 32), ({"r": 16, "rank_pattern": {"q_proj": 48}}, 64)]
)
def test_the_vllm_engine_serves_an_adapter_of_any_rank_it_accepts(
    tiny_model_dir, tmp_path, fake_vllm, ranks, max_lora_rank
):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": tiny_model_dir, **ranks}))
    engine = VLLMEngine(str(adapter))
    [(model, options)] = fake_vllm.built
    assert model == tiny_model_dir and engine.lora_request == ("drift-adapter", 1, str(adapter))
    assert options["enable_lora"] is True and options["max_lora_rank"] == max_lora_rank

    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": tiny_model_dir, "r": 1024}))
    with pytest.raises(ValueError, match=r"json: LoRA rank 1024 is above the largest vLLM serves \(512\)"):
        VLLMEngine(str(adapter))


@pytest.mark.parametrize(
    "content, problem", [('["r", 8]', "holds a JSON array, not an object"), ('{"r": 8, "base', "not valid JSON")]
)
def test_an_adapter_config_that_is_no_json_object_is_named(tmp_path, content, problem):
    # A model directory is the user's: its adapter_config.json failed as an AttributeError the CLI does not
    # catch, or as a JSON error that named no file.
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(content)
    for read in (lora_adapter_base, vllm_max_lora_rank):
        with pytest.raises(ValueError, match=re.escape(f"{adapter / 'adapter_config.json'}: {problem}")):
            read(str(adapter))


@pytest.mark.parametrize("stop", ["</answer>", "答案"])
def test_a_stop_string_is_seen_however_many_tokens_its_characters_take(engine, stop):
    if not stop.isascii():  # the case at stake: the demo tokenizer spends 3 tokens on each of these characters
        assert len(engine.tokenizer(stop, add_special_tokens=False)["input_ids"]) > len(stop) + 1
    tokens = engine.tokenizer(f"some reply {stop}", add_special_tokens=False)["input_ids"]
    stops = _StopStrings(engine.tokenizer, [stop])
    assert stops.hit(tokens) and not stops.hit(tokens[:-1])


def test_a_batch_is_budgeted_on_its_widest_cached_prefix_plus_its_widest_fed_part(tiny_model_dir):
    engine = TransformersEngine(tiny_model_dir, torch_threads=1, max_batch_tokens=300)
    prompts = [[1] * 100, [2] * 100]
    # Uncached, the two rows are 100 + 10 wide: 220 tokens fit in one batch.
    assert engine._chunks(prompts, [0, 0], 1, 10) == [[0, 1]]
    # One of them 95 tokens into its cache: the rows are 95 + 100 + 10 wide, 410 tokens; apart, 110 and 105.
    assert engine._chunks(prompts, [95, 0], 1, 10) == [[0], [1]]
    assert engine._chunks(prompts, [95, 95], 1, 10) == [[0, 1]]
