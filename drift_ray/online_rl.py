"""Online multi-turn RL baseline (group-normalised policy gradient, GRPO/RLOO style), in a single process.

This is the cost comparison DRIFT is measured against, not a distributed trainer: every update plays
fresh episodes with the *current* policy and takes one gradient step on them, so generation is paid at
every update (DRIFT pays it once). It shares DRIFT's code wherever the logic is the same: the episode
loop (`play_episodes`), the return R (`weights.trajectory_returns`) and the loss (`weighted_sft`), where
the group-normalised advantage takes the place of DRIFT's weight:

    loss = Σ_i A_i · L_i / N,   L_i = mean token NLL of trajectory i's assistant turns,
    A_i  = (R_i − mean_group R) / (std_group R + ε)   (grpo)   or   R_i − mean of the others' R   (rloo).

The NLL is of the distribution the episodes were sampled from: the logits divided by
rollout.temperature (top-p truncation would make it another one, so top_p must be 1), in eval mode as
generation runs (dropout would make it another one too). What is trained is what the policy sampled, as
the engine sampled it: the ids of each reply, in the context the engine fed it (`sampled_example`), not the
replies' text tokenized anew, which may differ (invalid UTF-8 that an early policy samples reads back as
U+FFFD, another split of the same text) and would train tokens never sampled. So train.max_length does not
cut an episode either: it is trained whole, within rollout.max_model_len as it was played.
No KL term to the reference: the comparison is about the cost of regenerating rollouts.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any, Callable, Sequence

import numpy as np
import numpy.typing as npt
import torch

from drift_ray import schema
from drift_ray.config import Config
from drift_ray.engines import TransformersEngine, chat_prompt_ids
from drift_ray.episode import Episode, SamplingParams, episodes_table, play_episodes, stable_seed
from drift_ray.prompts import Problem
from drift_ray.verifiers import Verifier
from drift_ray.weighted_sft import IGNORE_INDEX, TokenizedExample, collate, padding_token_id, per_sample_nll, weighted_loss
from drift_ray.weights import trajectory_returns

log = logging.getLogger(__name__)


class Advantage(str, Enum):
    grpo = "grpo"
    rloo = "rloo"


@dataclass(frozen=True)
class OnlineRLSettings:
    updates: int = 100
    prompts_per_update: int = 32
    samples_per_prompt: int = 8
    lr: float = 1e-4
    advantage: Advantage = Advantage.grpo
    micro_batch_size: int = 64
    eval_every: int = 20

    def __post_init__(self) -> None:
        # Checked here, not where first used: that is after the first evaluation and rollouts.
        least = {"updates": 1, "prompts_per_update": 1, "samples_per_prompt": 2, "micro_batch_size": 1, "eval_every": 1}
        for name, minimum in least.items():
            if getattr(self, name) < minimum:
                raise ValueError(f"online RL setting {name} must be at least {minimum}; found {getattr(self, name)}")
        if not 0 <= self.lr < float("inf"):
            raise ValueError(f"online RL setting lr must be a finite number of at least 0; found {self.lr}")
        kinds = [kind.value for kind in Advantage]
        if self.advantage not in kinds:
            raise ValueError(f"online RL setting advantage must be one of {', '.join(kinds)}; found {self.advantage!r}")


def group_advantages(returns: npt.ArrayLike, group_size: int, kind: Advantage | str) -> npt.NDArray[np.float64]:
    """Advantages of consecutive groups of `group_size` returns (one group per prompt)."""
    returns = np.asarray(returns, dtype=np.float64)
    if group_size < 2 or returns.size % group_size:
        raise ValueError(
            f"group advantages need groups of at least 2 samples that tile the returns; "
            f"found {returns.size} returns in groups of {group_size}"
        )
    groups = returns.reshape(-1, group_size)
    if Advantage(kind) is Advantage.grpo:
        advantages = (groups - groups.mean(axis=1, keepdims=True)) / (groups.std(axis=1, keepdims=True) + 1e-6)
    else:
        others_mean = (groups.sum(axis=1, keepdims=True) - groups) / (group_size - 1)
        advantages = groups - others_mean
    # Equal returns teach nothing; their rounded mean would leave advantages of 1e-11 that Adam's step
    # normalisation turns into a full-size update.
    return np.where(np.ptp(groups, axis=1, keepdims=True) > 0, advantages, 0.0).reshape(-1)


def train_online(
    model: Any,
    tokenizer: Any,
    problems: Sequence[Problem],
    verifier: Verifier,
    cfg: Config,
    settings: OnlineRLSettings,
    evaluate: Callable[[TransformersEngine], dict[str, Any]],
) -> list[dict[str, Any]]:
    """Run the updates; return the curve: after update 0 (the start) and every `eval_every` updates, the
    update, wall-clock seconds, generated tokens so far and those of them left out of the gradient
    (`sampled_example`), the mean return of that update's episodes (not of every update since the last
    point), and what `evaluate(engine)` returns.

    Evaluation time is excluded from the wall-clock, as DRIFT's curve excludes it.
    """
    rollout = cfg.rollout
    if not (rollout.temperature > 0 and rollout.top_p == 1):
        raise ValueError(
            f"online RL samples with rollout.temperature > 0 and rollout.top_p = 1, so that its gradient is of the "
            f"distribution it samples; found temperature {rollout.temperature} and top_p {rollout.top_p}"
        )
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    # The engine carries each turn's cache to the next, as DRIFT's rollout engine does; every update drops it.
    engine = TransformersEngine(model, tokenizer=tokenizer, max_model_len=rollout.max_model_len)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=cfg.train.weight_decay)
    seconds, generated, untrained = 0.0, 0, 0
    model.eval()
    curve = [{"update": 0, "seconds": 0.0, "generated_tokens": 0, "untrained_tokens": 0, **evaluate(engine)}]
    for update in range(1, settings.updates + 1):
        started = time.perf_counter()
        batch = rng.sample(list(problems), min(settings.prompts_per_update, len(problems)))
        params = SamplingParams(
            rollout.temperature, rollout.top_p, rollout.max_new_tokens, seed=stable_seed(cfg.seed, "online", update)
        )
        episodes = play_episodes(batch, engine, verifier, params, settings.samples_per_prompt, cfg.episode)
        table = episodes_table(episodes, cfg.episode, engine.name)
        generated += int(sum(table.column(schema.COMPLETION_TOKENS).to_pylist()))
        returns = trajectory_returns(table, cfg.weights.gamma, cfg.weights.rep_lambda, cfg.weights.format_penalty)
        # play_episodes returns each prompt's samples together, in order: consecutive groups.
        advantages = group_advantages(returns, settings.samples_per_prompt, settings.advantage)
        examples = [sampled_example(tokenizer, episode) for episode in episodes]
        untrained += sum(left_out for _, left_out in examples)
        policy_gradient_step(
            model, tokenizer, [example for example, _ in examples], advantages, optimizer, cfg, settings.micro_batch_size
        )
        engine.drop_carried_cache()
        seconds += time.perf_counter() - started
        if update % settings.eval_every == 0 or update == settings.updates:
            point = {"update": update, "seconds": round(seconds, 2), "generated_tokens": generated, "untrained_tokens": untrained}
            curve.append({**point, "mean_return": float(np.mean(returns)), **evaluate(engine)})
    if untrained:
        log.warning(
            "online RL left %d of the %d tokens it sampled out of its gradient (untrained_tokens in the curve): the "
            "conversation reads them back as other tokens (invalid UTF-8 as U+FFFD, say), so they were not sampled in "
            "the context they would be trained in", untrained, generated,
        )
    return curve


def sampled_example(tokenizer: Any, episode: Episode) -> tuple[TokenizedExample, int]:
    """The episode as one training sequence whose supervised tokens are those its policy sampled, each after
    the context it was sampled in; and how many sampled tokens that leaves out.

    The sequence is the last turn's prompt, as the engine feeds it (`chat_prompt_ids`), then the last reply's
    sampled ids. A reply supervises the longest start of its sampled ids that the sequence holds after its
    own prompt, where the sequence begins with that prompt: what follows a reply's end of turn in the
    template (ChatML's newline) was never sampled, nor was what a stop string cut from its last token, and
    a reply whose text reads back as other tokens is left out from there on."""
    turns = [i for i, message in enumerate(episode.messages) if message["role"] == "assistant"]
    if not turns or any(ids is None for ids in episode.reply_token_ids):
        raise ValueError(
            f"online RL trains the tokens its engine sampled; episode {episode.trajectory_id} has replies without "
            "them, from an engine that does not give them"
        )
    prompts = chat_prompt_ids(tokenizer, [episode.messages[:turn] for turn in turns])
    input_ids = [*prompts[-1], *episode.reply_token_ids[-1]]
    labels = [IGNORE_INDEX] * len(input_ids)
    left_out = 0
    for prompt, sampled in zip(prompts, episode.reply_token_ids, strict=True):
        held = 0
        if input_ids[: len(prompt)] == prompt:
            following = input_ids[len(prompt) : len(prompt) + len(sampled)]
            while held < len(following) and following[held] == sampled[held]:
                held += 1
        labels[len(prompt) : len(prompt) + held] = sampled[:held]
        left_out += len(sampled) - held
    return TokenizedExample(input_ids, labels), left_out


def policy_gradient_step(
    model: Any,
    tokenizer: Any,
    examples: Sequence[TokenizedExample],
    advantages: npt.NDArray[np.float64],
    optimizer: torch.optim.Optimizer,
    cfg: Config,
    micro_batch_size: int,
) -> None:
    """One optimizer step on Σ_i A_i·L_i / N over the examples' supervised tokens, L_i under the logits
    divided by rollout.temperature, in the mode the model sampled in (the caller's: eval)."""
    pad_id = padding_token_id(tokenizer)
    device = next(model.parameters()).device
    optimizer.zero_grad(set_to_none=True)
    for start in range(0, len(examples), micro_batch_size):
        chunk = slice(start, start + micro_batch_size)
        tensors = collate(examples[chunk], advantages[chunk].tolist(), pad_id, device)
        logits = model(input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"]).logits
        logits = logits / cfg.rollout.temperature
        loss = weighted_loss(per_sample_nll(logits, tensors["labels"]), tensors["weights"], float(len(examples)))
        loss.backward()
    if cfg.train.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
    optimizer.step()


def settings_dict(settings: OnlineRLSettings) -> dict[str, Any]:
    return {k: getattr(v, "value", v) for k, v in asdict(settings).items()}
