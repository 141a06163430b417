"""The online multi-turn RL baseline: group advantages and a real (tiny) training loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from drift_ray import online_rl
from drift_ray.config import load_config
from drift_ray.episode import Episode, Generation, episodes_table
from drift_ray.online_rl import (
    Advantage,
    OnlineRLSettings,
    group_advantages,
    policy_gradient_step,
    sampled_example,
    train_online,
)
from drift_ray.prompts import Problem
from drift_ray.verifiers import get_verifier
from drift_ray.weighted_sft import IGNORE_INDEX, collate, per_sample_nll, tokenize_trajectory, weighted_loss
from drift_ray.weights import trajectory_returns


def test_grpo_advantages_are_standardised_within_each_group():
    advantages = group_advantages([1.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5], 4, "grpo")
    first, second = advantages[:4], advantages[4:]
    assert first.mean() == pytest.approx(0.0) and first.std() == pytest.approx(1.0, rel=1e-4)
    assert first[0] > 0 > first[1] and np.allclose(second, 0.0)  # a group of equal returns teaches nothing


def test_rloo_advantage_is_the_return_minus_the_mean_of_the_others():
    advantages = group_advantages([1.0, 0.0, 0.5], 3, Advantage.rloo)
    np.testing.assert_allclose(advantages, [1.0 - 0.25, 0.0 - 0.75, 0.5 - 0.5])


@pytest.mark.parametrize("kind", list(Advantage))
def test_a_group_of_equal_returns_gets_advantages_of_exactly_zero(kind):
    # The mean of three -0.2s is not -0.2 in floating point; Adam would turn the residue into a full step.
    assert np.array_equal(group_advantages([-0.2] * 3 + [1.0, 0.0, 0.0], 3, kind)[:3], np.zeros(3))


def test_groups_must_tile_the_returns():
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages([1.0, 0.0, 0.0], 4, "grpo")
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages([1.0, 0.0], 1, "grpo")


def test_online_updates_regenerate_episodes_and_report_a_curve(tiny_model_dir):
    cfg = load_config(
        None,
        # No weight decay: it would change the weights even where every advantage is 0.
        ['episode.instruction="{question}"', "episode.max_turns=2", "rollout.max_new_tokens=4", "train.weight_decay=0"],
    )
    problems = [Problem(f"p{i}", f"x is between 10 and 29 and ends in {i}. What is x?", f"1{i}") for i in range(4)]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    evaluations = []

    def evaluate(engine) -> dict[str, float]:
        assert engine.model is model  # the engine samples from the policy being trained
        assert engine.carry_cache and not engine._replies  # no cache of the weights before the update
        evaluations.append(engine.name)
        return {"multi@1": 0.0}

    settings = OnlineRLSettings(updates=3, prompts_per_update=2, samples_per_prompt=3, lr=1e-2, eval_every=2)
    before = [p.detach().clone() for p in model.parameters()]
    curve = train_online(model, tokenizer, problems, get_verifier("exact"), cfg, settings, evaluate)
    # The untrained model writes no <answer>: every return is the same, and the same returns teach nothing.
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert [point["update"] for point in curve] == [0, 2, 3]
    tokens = [point["generated_tokens"] for point in curve]
    assert tokens[0] == 0 and 0 < tokens[1] < tokens[2]  # every update generates anew
    assert len(evaluations) == 3
    assert 0 <= curve[1]["untrained_tokens"] <= curve[2]["untrained_tokens"] <= tokens[2]
    # At most one reward of 1; at least a format penalty on each turn and the whole repetition penalty.
    lowest = cfg.episode.max_turns * cfg.episode.format_penalty - cfg.weights.rep_lambda
    assert all(lowest <= point["mean_return"] <= 1.0 for point in curve[1:])


class _ScriptedEngine:
    """Answers 14 or 24 at random and ends each reply on the stop string, so that returns differ."""

    name = "scripted"

    def __init__(self, model, tokenizer, max_model_len):
        self.rng, self.tokenizer = np.random.default_rng(0), tokenizer

    def generate(self, conversations, params, n):
        replies = [[f"<answer>{self.rng.choice(['14', '24'])}</answer>" for _ in range(n)] for _ in conversations]
        return [[Generation(text, 5, 3, token_ids=self.tokenizer.encode(text)) for text in texts] for texts in replies]

    def drop_carried_cache(self):
        pass


def test_each_update_steps_on_the_advantages_of_the_episodes_it_played(tiny_model_dir, monkeypatch):
    cfg = load_config(None, ['episode.instruction="{question}"', "episode.max_turns=2", "train.weight_decay=0"])
    problems = [Problem(f"p{i}", f"x is between 10 and 29 and ends in 4 ({i}). What is x?", "14") for i in range(4)]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    played, steps = [], []
    real_play, real_step = online_rl.play_episodes, online_rl.policy_gradient_step

    def play(*args, **kwargs):
        played.append(real_play(*args, **kwargs))
        return played[-1]

    def step(model, tokenizer, examples, advantages, optimizer, cfg, micro_batch_size):
        steps.append((examples, advantages))
        real_step(model, tokenizer, examples, advantages, optimizer, cfg, micro_batch_size)

    monkeypatch.setattr(online_rl, "TransformersEngine", _ScriptedEngine)
    monkeypatch.setattr(online_rl, "play_episodes", play)
    monkeypatch.setattr(online_rl, "policy_gradient_step", step)
    settings = OnlineRLSettings(updates=2, prompts_per_update=2, samples_per_prompt=4, lr=1e-2, eval_every=1)
    before = [p.detach().clone() for p in model.parameters()]
    curve = train_online(model, tokenizer, problems, get_verifier("exact"), cfg, settings, lambda engine: {})
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))

    assert len(played) == len(steps) == 2
    for episodes, (examples, advantages) in zip(played, steps):
        returns = trajectory_returns(episodes_table(episodes, cfg.episode, "scripted"), cfg.weights.gamma,
                                     cfg.weights.rep_lambda, cfg.weights.format_penalty)
        assert np.ptp(returns) > 0
        np.testing.assert_array_equal(advantages, group_advantages(returns, 4, "grpo"))
        # Every reply, sampled as its text tokenizes and ended on the stop string, is trained whole, and no
        # end of turn after it.
        for episode, example in zip(episodes, examples, strict=True):
            assert [t for t in example.labels if t != IGNORE_INDEX] == [t for ids in episode.reply_token_ids for t in ids]
    assert curve[-1]["untrained_tokens"] == 0


def test_the_tokens_trained_are_those_sampled_in_the_context_they_were_sampled_in(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    verifier, cfg = get_verifier("exact"), load_config(None, ["episode.max_turns=4"]).episode
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    half_a_character = tokenizer.convert_tokens_to_ids("Ã")  # the byte 0xC3 alone: invalid UTF-8
    sampled = [
        tokenizer.encode("<answer>1</answer>"),  # ended on the stop string: no end of turn sampled
        tokenizer.encode("<answer>") + [half_a_character] + tokenizer.encode("2</answer>"),
        tokenizer.encode("<answer>3"),  # cut off
        tokenizer.encode("I stop.") + [end_of_turn],  # ended on its end of turn
    ]
    episode = Episode(Problem("p", "What is x?", "5"), 0, [{"role": "user", "content": "What is x?"}])
    for ids, cut in zip(sampled, (False, False, True, False)):
        text = tokenizer.decode(ids, skip_special_tokens=True)  # as the engine writes the reply
        episode.take_turn(Generation(text, 1, len(ids), cut, ids), verifier, cfg)
    assert "\ufffd" in episode.messages[3]["content"]
    example, left_out = sampled_example(tokenizer, episode)
    assert example.input_ids[-len(sampled[-1]) :] == sampled[-1]  # the last reply ends the sequence
    trained = [t for t in example.labels if t != IGNORE_INDEX]
    # The second reply reads back as other tokens from its half character on (U+FFFD, three bytes): the
    # rest of it was never sampled after what the conversation holds. The end of turn and newline that the
    # template writes after the other replies were not sampled either.
    held = sampled[1].index(half_a_character)
    assert trained == [*sampled[0], *sampled[1][:held], *sampled[2], *sampled[3]]
    assert left_out == len(sampled[1]) - held
    # Each trained token follows the context it was sampled after.
    position = len(example.input_ids) - len(sampled[-1])
    assert example.labels[position:] == sampled[-1] and example.labels[position - 1] == IGNORE_INDEX
    without_ids = Episode(episode.problem, 1, list(episode.messages[:1]))
    without_ids.take_turn(Generation("<answer>1</answer>", 1, 1), verifier, cfg)
    with pytest.raises(ValueError, match="online RL trains the tokens its engine sampled; episode p/1 has replies without them"):
        sampled_example(tokenizer, without_ids)


def test_online_settings_and_sampling_that_cannot_work_are_refused_before_anything_runs(tiny_model_dir):
    with pytest.raises(ValueError, match="samples_per_prompt must be at least 2"):
        OnlineRLSettings(samples_per_prompt=1)
    with pytest.raises(ValueError, match="eval_every must be at least 1"):
        OnlineRLSettings(eval_every=0)
    with pytest.raises(ValueError, match="lr must be a finite number of at least 0; found inf"):
        OnlineRLSettings(lr=float("inf"))
    with pytest.raises(ValueError, match="advantage must be one of grpo, rloo; found 'ppo'"):
        OnlineRLSettings(advantage="ppo")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)

    def evaluate(engine):
        raise AssertionError("evaluated before the sampling was checked")

    for overrides in (["rollout.temperature=0", "rollout.samples_per_prompt=1"], ["rollout.top_p=0.9"]):
        with pytest.raises(ValueError, match="temperature > 0 and rollout.top_p = 1"):
            train_online(model, tokenizer, [], get_verifier("exact"), load_config(None, overrides), OnlineRLSettings(), evaluate)


def test_online_returns_re_price_format_failures_as_drift_weights_do(tiny_model_dir):
    # The untrained model writes no <answer>: every turn fails the format, at weights.format_penalty each.
    overrides = ['episode.instruction="{question}"', "episode.max_turns=2", "rollout.max_new_tokens=4"]
    cfg = load_config(None, [*overrides, "weights.format_penalty=-10"])
    problems = [Problem(f"p{i}", f"x ends in {i}. What is x?", f"1{i}") for i in range(2)]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    settings = OnlineRLSettings(updates=1, prompts_per_update=2, samples_per_prompt=2, lr=0.0, eval_every=1)
    curve = train_online(model, tokenizer, problems, get_verifier("exact"), cfg, settings, lambda engine: {})
    assert curve[1]["mean_return"] <= cfg.episode.max_turns * -10


def test_a_policy_gradient_step_favours_the_trajectory_with_the_higher_return(tiny_model_dir):
    cfg = load_config(None, ["train.weight_decay=0"])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    question = {"role": "user", "content": "x is between 10 and 29 and ends in 4. What is x?"}
    conversations = [[question, {"role": "assistant", "content": f"<answer>{x}</answer>"}] for x in (14, 24, 14, 24)]
    advantages = group_advantages([1.0, 0.0, 1.0, 0.0], 4, "grpo")

    examples = [tokenize_trajectory(tokenizer, c, "all_turns", 128) for c in conversations]

    def nll() -> np.ndarray:
        batch = collate(examples[:2], [1.0, 1.0], tokenizer.pad_token_id)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return per_sample_nll(logits, batch["labels"]).numpy()

    before = nll()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    policy_gradient_step(model, tokenizer, examples, advantages, optimizer, cfg, micro_batch_size=3)
    after = nll()
    assert after[0] < before[0] and after[1] > before[1]


def test_a_policy_gradient_step_is_one_step_on_all_the_conversations_however_they_are_split(tiny_model_dir):
    cfg = load_config(None, ["train.grad_clip=0"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    question = {"role": "user", "content": "x is between 10 and 29 and ends in 4. What is x?"}
    conversations = [[question, {"role": "assistant", "content": f"<answer>{x}</answer>"}] for x in (14, 24, 4, 114)]
    examples = [tokenize_trajectory(tokenizer, c, "all_turns", 128) for c in conversations]
    advantages = group_advantages([1.0, 0.0, 0.5, 0.0], 4, "grpo")

    def step(micro_batch_size: int) -> list[torch.Tensor]:
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        policy_gradient_step(model, tokenizer, examples, advantages, optimizer, cfg, micro_batch_size)
        return [p.detach() for p in model.parameters()]

    whole, split, start = step(4), step(3), [p.detach() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters()]
    assert not all(torch.equal(a, b) for a, b in zip(whole, start))
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_a_policy_gradient_step_is_of_the_distribution_sampled_from(tiny_model_dir, temperature):
    cfg = load_config(None, ["train.grad_clip=0", f"rollout.temperature={temperature}"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    question = {"role": "user", "content": "x is between 10 and 29 and ends in 4. What is x?"}
    conversations = [[question, {"role": "assistant", "content": text}] for text in ("<answer>14", "<answer>24</answer>")]
    examples = [tokenize_trajectory(tokenizer, c, "all_turns", 512) for c in conversations]
    advantages = np.array([-1.0, 1.0])

    def policy():  # with dropout, which generation (eval mode) does without
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir, attention_dropout=0.5).eval()

    # By hand: the logits divided by the temperature, without dropout.
    reference = policy()
    batch = collate(examples, advantages.tolist(), tokenizer.pad_token_id)
    logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits / temperature
    weighted_loss(per_sample_nll(logits, batch["labels"]), batch["weights"], 2.0).backward()
    model = policy()
    policy_gradient_step(model, tokenizer, examples, advantages, torch.optim.SGD(model.parameters(), lr=1.0), cfg, 1)
    for trained, start in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(trained.detach(), start.detach() - start.grad, rtol=1e-5, atol=1e-6)
