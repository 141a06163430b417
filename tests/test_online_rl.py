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
    ends_not_sampled,
    train_online,
)
from drift_ray.prompts import Problem
from drift_ray.verifiers import get_verifier
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
    # At most one reward of 1; at least a format penalty on each turn and the whole repetition penalty.
    lowest = cfg.episode.max_turns * cfg.episode.format_penalty - cfg.weights.rep_lambda
    assert all(lowest <= point["mean_return"] <= 1.0 for point in curve[1:])


class _ScriptedEngine:
    """Answers 14 or 24 at random and ends each reply on the stop string, so that returns differ."""

    name = "scripted"

    def __init__(self, model, tokenizer, max_model_len):
        self.rng = np.random.default_rng(0)

    def generate(self, conversations, params, n):
        return [[Generation(f"<answer>{self.rng.choice(['14', '24'])}</answer>", 5, 3) for _ in range(n)] for _ in conversations]

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

    def step(model, tokenizer, conversations, advantages, optimizer, cfg, micro_batch_size, unsampled_ends):
        steps.append((conversations, advantages, unsampled_ends))
        real_step(model, tokenizer, conversations, advantages, optimizer, cfg, micro_batch_size, unsampled_ends)

    monkeypatch.setattr(online_rl, "TransformersEngine", _ScriptedEngine)
    monkeypatch.setattr(online_rl, "play_episodes", play)
    monkeypatch.setattr(online_rl, "policy_gradient_step", step)
    settings = OnlineRLSettings(updates=2, prompts_per_update=2, samples_per_prompt=4, lr=1e-2, eval_every=1)
    before = [p.detach().clone() for p in model.parameters()]
    train_online(model, tokenizer, problems, get_verifier("exact"), cfg, settings, lambda engine: {})
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))

    assert len(played) == len(steps) == 2
    for episodes, (conversations, advantages, unsampled) in zip(played, steps):
        returns = trajectory_returns(episodes_table(episodes, cfg.episode, "scripted"), cfg.weights.gamma,
                                     cfg.weights.rep_lambda, cfg.weights.format_penalty)
        assert np.ptp(returns) > 0
        np.testing.assert_array_equal(advantages, group_advantages(returns, 4, "grpo"))
        assert conversations == [e.messages for e in episodes]
        # Every reply ended on the stop string: no end of turn was sampled.
        assert unsampled == [[True] * len(e.cut_off) for e in episodes]


def test_the_ends_the_policy_did_not_sample_are_those_after_a_stop_string_or_a_cut_off():
    problem = Problem("p", "What is x?", "3")
    episode = Episode(problem, 0, [{"role": "user", "content": "What is x?"}])
    cfg = load_config(None, ["episode.max_turns=3"]).episode
    for reply in (Generation("<answer>1</answer>", 1, 1), Generation("<answer>2", 1, 1, cut_off=True), Generation("I stop.", 1, 1)):
        episode.take_turn(reply, get_verifier("exact"), cfg)
    assert ends_not_sampled(episode, ("</answer>",)) == [True, True, False]


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
    from drift_ray.weighted_sft import collate, per_sample_nll, tokenize_trajectory

    cfg = load_config(None, ["train.weight_decay=0"])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    question = {"role": "user", "content": "x is between 10 and 29 and ends in 4. What is x?"}
    conversations = [[question, {"role": "assistant", "content": f"<answer>{x}</answer>"}] for x in (14, 24, 14, 24)]
    advantages = group_advantages([1.0, 0.0, 1.0, 0.0], 4, "grpo")

    def nll() -> np.ndarray:
        examples = [tokenize_trajectory(tokenizer, c, "all_turns", 128) for c in conversations[:2]]
        batch = collate(examples, [1.0, 1.0], tokenizer.pad_token_id)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return per_sample_nll(logits, batch["labels"]).numpy()

    before = nll()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    policy_gradient_step(model, tokenizer, conversations, advantages, optimizer, cfg, micro_batch_size=3)
    after = nll()
    assert after[0] < before[0] and after[1] > before[1]


def test_a_policy_gradient_step_is_one_step_on_all_the_conversations_however_they_are_split(tiny_model_dir):
    cfg = load_config(None, ["train.grad_clip=0"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    question = {"role": "user", "content": "x is between 10 and 29 and ends in 4. What is x?"}
    conversations = [[question, {"role": "assistant", "content": f"<answer>{x}</answer>"}] for x in (14, 24, 4, 114)]
    advantages = group_advantages([1.0, 0.0, 0.5, 0.0], 4, "grpo")

    def step(micro_batch_size: int) -> list[torch.Tensor]:
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        policy_gradient_step(model, tokenizer, conversations, advantages, optimizer, cfg, micro_batch_size)
        return [p.detach() for p in model.parameters()]

    whole, split, start = step(4), step(3), [p.detach() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters()]
    assert not all(torch.equal(a, b) for a, b in zip(whole, start))
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_a_policy_gradient_step_leaves_out_ends_the_policy_did_not_sample_under_its_temperature(tiny_model_dir, temperature):
    from drift_ray.weighted_sft import collate, per_sample_nll, tokenize_trajectory, weighted_loss

    cfg = load_config(None, ["train.grad_clip=0", f"rollout.temperature={temperature}"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    question = {"role": "user", "content": "x is between 10 and 29 and ends in 4. What is x?"}
    conversations = [[question, {"role": "assistant", "content": text}] for text in ("<answer>14", "<answer>24</answer>")]
    advantages = np.array([-1.0, 1.0])

    def step(unsampled) -> list[torch.Tensor]:
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        policy_gradient_step(model, tokenizer, conversations, advantages, optimizer, cfg, 2, unsampled_ends=unsampled)
        return [p.detach() for p in model.parameters()]

    # By hand: the first reply supervised without its <|im_end|>, which the policy never sampled, and the
    # distribution the replies were sampled from.
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    examples = [tokenize_trajectory(tokenizer, c, "all_turns", 512, cut) for c, cut in zip(conversations, ([True], None))]
    batch = collate(examples, advantages.tolist(), tokenizer.pad_token_id)
    logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits / temperature
    weighted_loss(per_sample_nll(logits, batch["labels"]), batch["weights"], 2.0).backward()
    cut = step([[True], [False]])
    for trained, start in zip(cut, reference.parameters()):
        torch.testing.assert_close(trained, start.detach() - start.grad, rtol=1e-5, atol=1e-6)
    assert not all(torch.equal(a, b) for a, b in zip(cut, step(None)))
