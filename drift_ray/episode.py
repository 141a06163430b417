"""The multi-turn correction episode, shared by rollouts and evaluation (pure: no Ray, no torch).

An episode: the user asks a problem; each turn the assistant replies; the answer is the text inside the
last <answer>…</answer>. A correct answer earns r_t = 1 and ends the episode; otherwise r_t = 0 and, if
turns remain, the user sends the unary feedback. A reply without a parsable answer is a format failure:
it counts as wrong, costs the format penalty, and is not an answer for the repetition ratio.

All episodes of a batch advance together: one engine call per turn, the first of which asks for K
samples of each prompt so the engine can share the prompt between them.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field, replace
from typing import Callable, Protocol, Sequence

import pyarrow as pa

from drift_ray import schema
from drift_ray.config import EpisodeConfig
from drift_ray.prompts import Problem
from drift_ray.verifiers import Verifier

Message = dict[str, str]
Conversation = list[Message]

ANSWER_STOP = "</answer>"
# The text after the last <answer> before a </answer>: "<answer>a <answer>b</answer>" answers b.
_ANSWER = re.compile(r"<answer>((?:(?!<answer>).)*?)</answer>", re.DOTALL)
_THINK_SENTENCE = "Think step by step inside <think> and </think> before answering."


@dataclass(frozen=True)
class SamplingParams:
    """How an engine samples one turn. temperature 0 means greedy decoding."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 512
    stop: tuple[str, ...] = (ANSWER_STOP,)
    seed: int | None = None


@dataclass(frozen=True)
class Generation:
    """One sampled reply. `text` ends with the stop string when generation stopped on one. `cut_off`: the
    reply reached max_new_tokens before it ended (on its end-of-turn token or a stop string). `token_ids`:
    the tokens sampled, its end of turn included where one was, from an engine that says (None otherwise)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    cut_off: bool = False
    token_ids: Sequence[int] | None = None


class EngineServerError(RuntimeError):
    """The server an engine sends its requests to failed one (after any retries of its own). The rollout stage
    reports it as its command's error, in one line, rather than as the crash of an actor: its message, not the
    traceback of the code that met it, says what to do."""


class Engine(Protocol):
    """What rollouts and evaluation need from a generation backend (transformers, vLLM, …)."""

    name: str

    def generate(
        self, conversations: Sequence[Conversation], params: SamplingParams, n: int
    ) -> list[list[Generation]]:
        """For each conversation, `n` replies of the assistant (the chat template applied by the engine).

        `params.seed` seeds the whole call. An engine that seeds each request gives every sample its own
        seed (see sample_seed): two conversations with the same history must still sample independently.
        """
        ...


def sample_seed(seed: int | None, conversation: int, sample: int, n: int) -> int | None:
    """The seed of sample `sample` of the `conversation`-th conversation in a call for `n` samples each.

    Consecutive and distinct over the call: a server that samples n choices from one request's seed
    s gives choice j the seed s + j (vLLM does), so a request for all n choices of a conversation and
    n single requests draw alike.
    """
    return None if seed is None else (seed + conversation * n + sample) % 2**63


def first_messages(question: str, cfg: EpisodeConfig) -> Conversation:
    """The conversation before the first assistant turn."""
    content = cfg.instruction.format(question=question)
    if cfg.think:
        content = f"{content}\n{_THINK_SENTENCE}"
    messages: Conversation = []
    if cfg.system_prompt:
        messages.append({"role": "system", "content": cfg.system_prompt})
    messages.append({"role": "user", "content": content})
    return messages


def parse_answer(reply: str) -> str | None:
    """The stripped text inside the last <answer>…</answer>, or None when there is none (or it is empty)."""
    found = _ANSWER.findall(reply)
    if not found:
        return None
    answer = found[-1].strip()
    return answer or None


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from any printable parts, identical across processes and runs."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


@dataclass
class Episode:
    problem: Problem
    sample_index: int
    messages: Conversation
    answers: list[str | None] = field(default_factory=list)
    answer_norms: list[str] = field(default_factory=list)
    correct: list[bool] = field(default_factory=list)
    format_failures: list[bool] = field(default_factory=list)
    cut_off: list[bool] = field(default_factory=list)
    reply_token_ids: list[Sequence[int] | None] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    done: bool = False

    def take_turn(self, reply: Generation, verifier: Verifier, cfg: EpisodeConfig) -> None:
        """Record the assistant's reply, verify it, and either end the episode or send the feedback."""
        self.messages.append({"role": "assistant", "content": reply.text})
        self.prompt_tokens += reply.prompt_tokens
        self.completion_tokens += reply.completion_tokens
        answer = parse_answer(reply.text)
        is_correct = answer is not None and verifier.check(answer, self.problem.gold)
        self.answers.append(answer)
        self.format_failures.append(answer is None)
        self.cut_off.append(reply.cut_off)
        self.reply_token_ids.append(reply.token_ids)
        self.correct.append(is_correct)
        if answer is not None:
            self.answer_norms.append(verifier.normalize(answer))
        if is_correct or len(self.correct) >= cfg.max_turns:
            self.done = True
        else:
            self.messages.append({"role": "user", "content": cfg.feedback})

    @property
    def trajectory_id(self) -> str:
        return schema.trajectory_id(self.problem.prompt_id, self.sample_index)

    @property
    def t_star(self) -> int | None:
        return self.correct.index(True) + 1 if True in self.correct else None

    def to_row(self, cfg: EpisodeConfig, model: str) -> dict:
        """The trajectory row (columns from `schema`)."""
        return {
            schema.PROMPT_ID: self.problem.prompt_id,
            schema.TRAJECTORY_ID: self.trajectory_id,
            schema.SAMPLE_INDEX: self.sample_index,
            schema.GOLD: self.problem.gold,
            schema.MESSAGES: self.messages,
            schema.ANSWERS: self.answers,
            schema.ANSWER_NORMS: self.answer_norms,
            schema.CORRECT: self.correct,
            schema.TURN_REWARDS: [float(c) for c in self.correct],
            schema.FORMAT_FAILURES: self.format_failures,
            schema.FORMAT_PENALTY: cfg.format_penalty * sum(self.format_failures),
            schema.CUT_OFF: self.cut_off,
            schema.T_STAR: self.t_star,
            schema.NUM_TURNS: len(self.correct),
            schema.PROMPT_TOKENS: self.prompt_tokens,
            schema.COMPLETION_TOKENS: self.completion_tokens,
            schema.MODEL: model,
        }


def play_episodes(
    problems: Sequence[Problem],
    engine: Engine,
    verifier: Verifier,
    params: SamplingParams,
    samples_per_prompt: int,
    cfg: EpisodeConfig,
) -> list[Episode]:
    """Play `samples_per_prompt` episodes of every problem, all advancing turn by turn together.

    Each turn's sampling seed is derived from `params.seed`, the turn and the batch's prompt ids, so a
    batch replays identically whichever actor runs it.
    """
    episodes = [
        Episode(problem, k, first_messages(problem.question, cfg))
        for problem in problems
        for k in range(samples_per_prompt)
    ]
    batch_key = ",".join(p.prompt_id for p in problems)
    for turn in range(1, cfg.max_turns + 1):
        active = [e for e in episodes if not e.done]
        if not active:
            break
        turn_params = params
        if params.seed is not None:
            turn_params = replace(params, seed=stable_seed(params.seed, turn, batch_key))
        if turn == 1:
            # All K episodes of a problem share their first prompt: ask for K samples of it once.
            shared = [episodes[i * samples_per_prompt].messages for i in range(len(problems))]
            replies = _replies(
                engine, shared, lambda i: f"prompt {problems[i].prompt_id!r}, turn 1", turn_params, samples_per_prompt
            )
        else:
            replies = _replies(
                engine, [e.messages for e in active], lambda i: f"trajectory {active[i].trajectory_id!r}, turn {turn}",
                turn_params, 1,
            )
        for episode, reply in zip(active, replies):
            episode.take_turn(reply, verifier, cfg)
    return episodes


def _replies(
    engine: Engine, conversations: list[Conversation], name_of: Callable[[int], str], params: SamplingParams, n: int
) -> list[Generation]:
    """The engine's n replies to each conversation, in order; checked per conversation, as one surplus
    and one shortfall would otherwise hand replies to another problem's episodes. `name_of(i)` says whose
    conversation i is, for the error (built only then)."""
    groups = engine.generate(conversations, params, n)
    expected = f"expected {n} replies for each of {len(conversations)} conversations"
    if len(groups) != len(conversations):
        raise RuntimeError(f"engine {engine.name!r} returned reply lists for {len(groups)} conversations; {expected}")
    wrong = next((i for i, group in enumerate(groups) if len(group) != n), None)
    if wrong is not None:
        raise RuntimeError(
            f"engine {engine.name!r} returned {len(groups[wrong])} for conversation {wrong} ({name_of(wrong)}); {expected}"
        )
    return [reply for group in groups for reply in group]


def episodes_table(episodes: Sequence[Episode], cfg: EpisodeConfig, model: str) -> pa.Table:
    """Episodes as trajectory rows (schema.TRAJECTORY_SCHEMA), `model` naming the policy that played them."""
    return pa.Table.from_pylist([e.to_row(cfg, model) for e in episodes], schema=schema.TRAJECTORY_SCHEMA)
