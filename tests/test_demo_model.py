"""Tests of the demo reference: tokenizer, chat template, the cached build, and (slow) what pre-training teaches."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoTokenizer

from drift_ray import demo_model
from drift_ray.demo_model import DEMO_EPISODE, METADATA_FILE, build_tokenizer, ensure_demo_model

TOKENIZER = build_tokenizer()
PRINTABLE_ASCII = [chr(code) for code in range(32, 127)] + ["\n"]
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "x is between 23 and 52 and ends in 6. What is x?"},
    {"role": "assistant", "content": "<answer>36</answer>"},
    {"role": "user", "content": "Incorrect. Please think again."},
    {"role": "assistant", "content": "<answer>26</answer>"},
]
# A handful of optimizer steps: enough to exercise the whole build in a few seconds.
TINY_RECIPE = dict(num_problems=12, samples_per_prompt=1, epochs=1, batch_size=8, max_length=256)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=PRINTABLE_ASCII, max_size=200))
def test_tokenizer_round_trips_ascii_text_in_at_most_one_token_per_character(text):
    ids = TOKENIZER(text, add_special_tokens=False)["input_ids"]
    assert len(ids) <= len(text)
    assert TOKENIZER.decode(ids) == text


def test_other_text_round_trips_one_token_per_byte():
    text = "d\u00e9j\u00e0 vu \u65e5\u672c\ttab"
    ids = TOKENIZER(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode())
    assert TOKENIZER.decode(ids) == text


def test_demo_words_answer_tags_and_digits_are_single_tokens():
    def tokens(text: str) -> list[str]:
        return TOKENIZER.convert_ids_to_tokens(TOKENIZER(text, add_special_tokens=False)["input_ids"])

    assert tokens("<answer>36</answer>") == ["<answer>", "3", "6", "</answer>"]
    assert tokens("Incorrect. Please think again.") == ["Incorrect", ".", "ĠPlease", "Ġthink", "Ġagain", "."]
    question = tokens(CONVERSATION[1]["content"])
    assert question[:3] == ["x", "Ġis", "Ġbetween"] and len(question) == 20
    assert build_tokenizer().get_vocab() == TOKENIZER.get_vocab()  # built deterministically


def test_special_tokens_are_single_tokens_with_chatml_roles():
    ids = TOKENIZER("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids[0] == TOKENIZER.convert_tokens_to_ids("<|im_start|>") and ids[-1] == TOKENIZER.eos_token_id
    assert TOKENIZER.convert_ids_to_tokens(ids[1:-1]) == ["user", "Ċ", "h", "i"]
    assert (TOKENIZER.eos_token, TOKENIZER.pad_token, TOKENIZER.padding_side) == ("<|im_end|>", "<|endoftext|>", "left")
    assert TOKENIZER.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_chat_template_renders_chatml():
    rendered = TOKENIZER.apply_chat_template(CONVERSATION[:3], tokenize=False)
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nx is between 23 and 52 and ends in 6. What is x?<|im_end|>\n"
        "<|im_start|>assistant\n<answer>36</answer><|im_end|>\n"
    )
    prompt = TOKENIZER.apply_chat_template(CONVERSATION[:2], add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("end", [3, 5])
def test_chat_template_with_the_generation_prompt_is_a_prefix_of_the_answered_conversation(end):
    prompt = TOKENIZER.apply_chat_template(CONVERSATION[: end - 1], add_generation_prompt=True, tokenize=False)
    assert TOKENIZER.apply_chat_template(CONVERSATION[:end], tokenize=False).startswith(prompt)


def test_saved_tokenizer_and_model_load_with_the_auto_classes(tiny_model_dir):
    # AutoTokenizer picks the tokenizer class from the model type: the saved one must come back as built.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "x is 3.\n<answer> 4  </answer>"
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == TOKENIZER(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False) == TOKENIZER.apply_chat_template(
        CONVERSATION, tokenize=False
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.config.model_type == "qwen2" and model.config.eos_token_id == tokenizer.eos_token_id
    assert 0.5e6 < sum(p.numel() for p in model.parameters()) < 1.5e6


@pytest.mark.parametrize("size", ["tiny", "small", {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2,
                                              "num_key_value_heads": 1, "intermediate_size": 96}])
def test_model_configs_take_a_named_size_or_dimensions_of_their_own(size):
    config = demo_model.build_model_config(len(TOKENIZER), size, tokenizer=TOKENIZER)
    dimensions = demo_model.MODEL_SIZES[size] if isinstance(size, str) else size
    assert {key: getattr(config, key) for key in dimensions} == dimensions
    assert len(config.layer_types) == dimensions["num_hidden_layers"]


def test_an_unknown_model_size_or_dimension_is_refused():
    with pytest.raises(ValueError, match="demo model size 'huge' is unknown"):
        demo_model.build_model_config(len(TOKENIZER), "huge")
    misspelt = {**demo_model.MODEL_SIZES["tiny"], "num_layers": 3}
    with pytest.raises(ValueError, match=r"demo model dimensions \[.*'num_layers'.*\]; expected exactly"):
        demo_model.build_model_config(len(TOKENIZER), misspelt)
    for wrong, message in [
        ({"num_hidden_layers": 0}, r"must be positive integers; found num_hidden_layers=0$"),
        ({"hidden_size": 64.0}, r"must be positive integers; found hidden_size=64\.0$"),
        ({"num_attention_heads": 3}, r"hidden_size \(128\) must be an even multiple of num_attention_heads \(3\)"),
        ({"hidden_size": 12}, r"hidden_size \(12\) must be an even multiple of num_attention_heads \(4\)"),
        ({"num_key_value_heads": 3}, r"and that a multiple of num_key_value_heads \(3\)"),
    ]:
        with pytest.raises(ValueError, match=message):
            demo_model.build_model_config(len(TOKENIZER), {**demo_model.MODEL_SIZES["tiny"], **wrong})


def test_demo_model_is_built_once_then_found_in_the_cache(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="drift_ray.demo_model")
    path = ensure_demo_model(tmp_path, **TINY_RECIPE)
    # Said before the minutes of pre-training, not after them.
    [announced] = [record.getMessage() for record in caplog.records if "demo reference: building" in record.getMessage()]
    assert path in announced
    record = json.loads((Path(path) / METADATA_FILE).read_text())
    assert record["settings"]["num_problems"] == 12 and record["pretraining"]["steps"] == 2
    assert record["settings"]["episode"] == DEMO_EPISODE.model_dump(mode="json")
    model_file = Path(path) / "model.safetensors"
    built_at = model_file.stat().st_mtime_ns

    caplog.clear()
    assert ensure_demo_model(tmp_path, **TINY_RECIPE) == path
    assert model_file.stat().st_mtime_ns == built_at
    assert not caplog.records  # found, not built
    assert ensure_demo_model(tmp_path, **{**TINY_RECIPE, "seed": 1}) != path
    assert AutoModelForCausalLM.from_pretrained(path).config.vocab_size == len(TOKENIZER)


def test_a_crashed_build_leaves_nothing_that_looks_like_a_model(tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash during pre-training")

    with monkeypatch.context() as patch:
        patch.setattr(demo_model, "fit_plain", crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            ensure_demo_model(tmp_path, **TINY_RECIPE)
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]

    # A build killed outright leaves its temporary directory behind: it is never taken for the model.
    path = Path(ensure_demo_model(tmp_path / "reference", **TINY_RECIPE))
    leftover = tmp_path / f".{path.name}.building-killed"
    leftover.mkdir()
    (leftover / "config.json").write_text("{}")
    rebuilt = Path(ensure_demo_model(tmp_path, **TINY_RECIPE))
    assert rebuilt == tmp_path / path.name and (rebuilt / METADATA_FILE).exists()
    assert not leftover.exists()

    # A copy of the cache cut short lacks the metadata, which a build writes last: rebuilt, not loaded.
    for name in (METADATA_FILE, "model.safetensors"):
        (rebuilt / name).unlink()
    assert Path(ensure_demo_model(tmp_path, **TINY_RECIPE)) == rebuilt
    assert (rebuilt / METADATA_FILE).exists() and (rebuilt / "model.safetensors").exists()


def test_concurrent_callers_share_one_build(tmp_path, monkeypatch):
    builds = []
    real_build = demo_model._build

    def counted_build(*args, **kwargs):
        builds.append(threading.get_ident())
        real_build(*args, **kwargs)

    monkeypatch.setattr(demo_model, "_build", counted_build)
    paths: list[str] = []
    callers = [threading.Thread(target=lambda: paths.append(ensure_demo_model(tmp_path, **TINY_RECIPE))) for _ in range(3)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    assert len(builds) == 1 and len(set(paths)) == 1 and len(paths) == 3


@pytest.fixture(scope="module")
def pretrained_rates() -> dict[str, dict[str, float]]:
    """The full recipe, played greedily and at temperature 1 on 200 candidates test problems: shares of
    replies with a parsable answer and with a candidate as the answer, share of answers after feedback that
    repeat the previous answer, and multi@1 / multi@5."""
    from drift_ray.builtin_tasks import candidates_task
    from drift_ray.engines import TransformersEngine
    from drift_ray.episode import SamplingParams, play_episodes
    from drift_ray.verifiers import get_verifier

    from drift_ray.pipeline import cache_dir

    # The pipeline's cache: built once per machine (minutes), shared with `drift-ray run`.
    engine = TransformersEngine(ensure_demo_model(cache_dir() / "models"))
    test = candidates_task(seed=0).test
    settings = {"greedy": SamplingParams(0.0, max_new_tokens=16), "sampled": SamplingParams(1.0, max_new_tokens=16, seed=0)}
    rates = {}
    for name, params in settings.items():
        episodes = play_episodes(test, engine, get_verifier("exact"), params, 1, DEMO_EPISODE)
        answers = [(e, a) for e in episodes for a in e.answers]
        pairs = [(a, b) for e in episodes for a, b in zip(e.answers, e.answers[1:]) if None not in (a, b)]
        rates[name] = {
            "parsable": sum(a is not None for _, a in answers) / len(answers),
            "candidate": sum(a in map(str, e.problem.metadata["candidates"]) for e, a in answers) / len(answers),
            "repeated": sum(a == b for a, b in pairs) / max(len(pairs), 1),
            **{f"multi@{k}": sum(e.t_star is not None and e.t_star <= k for e in episodes) / len(episodes) for k in (1, 5)},
        }
    return rates


@pytest.mark.slow
def test_pretrained_demo_model_answers_candidates_in_format(pretrained_rates):
    """It learned the skill, not only the format: most answers fit both clues, where a number drawn from
    the range would fit one time in ten. The share depends on the processor, whose floating-point kernels
    make the pre-trained reference another model: 0.71 on an AVX-512 EPYC, above 0.8 on earlier machines."""
    assert pretrained_rates["greedy"]["parsable"] > 0.95
    assert pretrained_rates["greedy"]["candidate"] > 0.6


@pytest.mark.slow
def test_pretrained_demo_model_shows_the_greedy_collapse_that_sampling_escapes(pretrained_rates):
    """The paper's failure: greedily, the reference repeats a wrong answer after "Incorrect", so multi@5 stays
    close to acc@1; sampled episodes sometimes try another candidate and find the answer in later turns."""
    greedy, sampled = pretrained_rates["greedy"], pretrained_rates["sampled"]
    assert greedy["repeated"] > 0.6 and greedy["repeated"] > sampled["repeated"] + 0.2
    assert greedy["multi@5"] - greedy["multi@1"] < 0.15
    assert sampled["multi@5"] > greedy["multi@5"] + 0.15
