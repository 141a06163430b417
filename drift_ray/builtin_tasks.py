"""Offline tasks shipped with drift-ray, and the scripted teacher that pre-trains the demo reference.

`candidates`: "x is between 23 and 52 and ends in 6. What is x?" Several numbers fit (2–6); the gold is
one of them, chosen at random. No policy can beat 1/(number of candidates) on the first turn, so doing
better is only possible by using the feedback: after "Incorrect", answer a candidate not yet tried. The
computational skill is finding the candidates (the numbers of the range with that last digit).
"""

from __future__ import annotations

import random
import re
from typing import Sequence

from drift_ray.episode import Conversation, Generation, SamplingParams, parse_answer
from drift_ray.prompts import Problem, Task, builtin_task

_QUESTION = re.compile(r"x is between (\d+) and (\d+) and ends in (\d)\. What is x\?")


def candidate_values(low: int, high: int, last_digit: int) -> list[int]:
    return [x for x in range(low, high + 1) if x % 10 == last_digit]


@builtin_task("candidates")
def candidates_task(
    seed: int, num_train: int | None = None, num_test: int = 200, min_candidates: int = 2, max_candidates: int = 6
) -> Task:
    """Disjoint train/test splits: no (range, digit) question of the test split is in train.

    `num_train=None` takes every question not in the test split (2,350 with the defaults).
    """
    if not 1 <= min_candidates <= max_candidates <= 8:
        raise ValueError(
            f"task.options: need 1 <= min_candidates <= max_candidates <= 8, found {min_candidates}, {max_candidates}"
        )
    # A range of 10·n consecutive numbers holds exactly n numbers with each last digit.
    questions = [
        (low, low + 10 * n - 1, digit)
        for n in range(min_candidates, max_candidates + 1)
        for low in range(10, 101 - 10 * n)
        for digit in range(10)
    ]
    if num_test < 0 or (num_train is not None and num_train < 0):
        raise ValueError(f"task.options: num_train and num_test must be >= 0, found {num_train}, {num_test}")
    asked = num_test + (num_train or 0)
    if asked > len(questions):
        raise ValueError(f"task.options: at most {len(questions)} distinct questions, asked for {asked}")
    if num_train is None:
        num_train = len(questions) - num_test
    rng = random.Random(f"candidates-{seed}")
    rng.shuffle(questions)
    test, train = questions[:num_test], questions[num_test:]
    # Every question's gold is drawn, whatever num_train keeps, so that the test split's golds do not
    # change with the size of the train split. Another num_test draws them in another order: its first
    # questions are the same, their golds not.
    golds = {question: rng.choice(candidate_values(*question)) for question in train + test}

    def make(split: str, chosen: list[tuple[int, int, int]]) -> list[Problem]:
        return [
            Problem(
                f"candidates-{split}-{i:05d}",
                f"x is between {low} and {high} and ends in {digit}. What is x?",
                str(golds[low, high, digit]),
                {"candidates": candidate_values(low, high, digit)},
            )
            for i, (low, high, digit) in enumerate(chosen)
        ]

    return Task("candidates", make("train", train[:num_train]), make("test", test), "exact")


def teacher_reply(answer: int) -> str:
    """The reply the demo reference learns: the answer alone, so every token of a turn is a decision."""
    return f"<answer>{answer}</answer>"


class CandidatesTeacher:
    """A scripted policy for the candidates task, behind the engine interface.

    It always finds the right candidates; on the first turn it answers one at random; after feedback it
    repeats its previous answer with probability `repeat_prob`, else answers a candidate not yet tried.
    A model pre-trained on its conversations shows the failure DRIFT targets: greedy decoding repeats.
    """

    name = "candidates-teacher"

    def __init__(self, repeat_prob: float = 0.6):
        self.repeat_prob = repeat_prob

    def generate(self, conversations: Sequence[Conversation], params: SamplingParams, n: int) -> list[list[Generation]]:
        rng = random.Random(params.seed)
        out = []
        for conversation in conversations:
            first_user = next(m["content"] for m in conversation if m["role"] == "user")
            match = _QUESTION.search(first_user)
            if match is None:
                raise ValueError(f"{self.name}: not a candidates question: {first_user!r}")
            values = candidate_values(*map(int, match.groups()))
            tried = [parse_answer(m["content"]) for m in conversation if m["role"] == "assistant"]
            prompt_chars = sum(len(m["content"]) for m in conversation)
            replies = []
            for _ in range(n):
                if tried and tried[-1] is not None and rng.random() < self.repeat_prob:
                    answer = int(tried[-1])
                else:
                    answer = rng.choice([v for v in values if str(v) not in tried] or values)
                text = teacher_reply(answer)
                replies.append(Generation(text, prompt_chars, len(text)))
            out.append(replies)
        return out
