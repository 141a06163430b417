"""The episode loop against scripted engines: exact turn-by-turn behaviour."""

import pytest

from drift_ray import schema
from drift_ray.builtin_tasks import CandidatesTeacher, candidates_task
from drift_ray.config import EpisodeConfig
from drift_ray.episode import (
    Generation,
    SamplingParams,
    episodes_table,
    first_messages,
    parse_answer,
    play_episodes,
    stable_seed,
)
from drift_ray.prompts import Problem
from drift_ray.verifiers import get_verifier


class ScriptedEngine:
    """Replies from a per-problem script, turn by turn; records every call it gets. A reply that ends in
    "..." reached max_new_tokens."""

    name = "scripted"

    def __init__(self, scripts: dict[str, list[str]]):
        self.scripts = scripts
        self.calls: list[tuple[int, int]] = []

    def generate(self, conversations, params, n):
        self.calls.append((len(conversations), n))
        out = []
        for conv in conversations:
            question = conv[-1]["content"] if len(conv) == 1 else next(m["content"] for m in conv if m["role"] == "user")
            turn = sum(m["role"] == "assistant" for m in conv)
            text = self.scripts[question][turn]
            cut_off = text.endswith("...")
            out.append([Generation(text, len(conv), len(text), cut_off) for _ in range(n)])
        return out


CFG = EpisodeConfig(instruction="{question}", max_turns=4)


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("<answer>42</answer>", "42"),
        ("I think <answer> 7 </answer>", "7"),
        ("<answer>1</answer> no wait <answer>2</answer>", "2"),
        ("<think>maybe 3</think><answer>\n3\n</answer>", "3"),
        ("<answer></answer>", None),
        ("<answer>unclosed", None),
        ("<answer>a, or rather <answer>b</answer>", "b"),
        ("<answer>\n<answer>\n</answer>", None),
        ("the answer is 5", None),
    ],
)
def test_parse_answer(reply, expected):
    assert parse_answer(reply) == expected


class SeedRecordingEngine(ScriptedEngine):
    """A ScriptedEngine that also records the seed of every call."""

    def __init__(self, scripts: dict[str, list[str]]):
        super().__init__(scripts)
        self.seeds: list[int | None] = []

    def generate(self, conversations, params, n):
        self.seeds.append(params.seed)
        return super().generate(conversations, params, n)


def test_every_turn_samples_with_a_seed_of_its_own_from_the_run_s_seed_and_the_batch():
    wrong = {"q1": ["<answer>0</answer>"] * 4, "q2": ["<answer>0</answer>"] * 4}

    def seeds(problems, seed):
        engine = SeedRecordingEngine(wrong)
        play_episodes(problems, engine, get_verifier("exact"), SamplingParams(seed=seed), 2, CFG)
        return engine.seeds

    batch = [Problem("p1", "q1", "5"), Problem("p2", "q2", "9")]
    first = seeds(batch, 0)
    assert len(first) == CFG.max_turns and len(set(first)) == CFG.max_turns  # no turn repeats another's draws
    assert seeds(batch, 0) == first  # a rerun samples alike
    assert set(seeds(batch, 1)).isdisjoint(first) and set(seeds(batch[:1], 0)).isdisjoint(first)
    assert seeds(batch, None) == [None] * CFG.max_turns  # unseeded stays unseeded


def test_first_messages_system_instruction_and_think():
    cfg = EpisodeConfig(system_prompt="Be brief.", think=True)
    messages = first_messages("2+2?", cfg)
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert messages[1]["role"] == "user"
    assert messages[1]["content"].startswith("2+2?") and "<answer>" in messages[1]["content"]
    assert "<think>" in messages[1]["content"]


def test_turn_by_turn_feedback_stop_and_format_failures():
    problems = [Problem("p1", "q1", "5"), Problem("p2", "q2", "9")]
    engine = ScriptedEngine(
        {
            "q1": ["<answer>4</answer>", "no tags here", "<answer> 5 </answer>", "<answer>6</answer>"],
            "q2": ["<answer>1</answer>", "<answer>1</answer>", "<answer>2</answer>", "oops, out of tok..."],
        }
    )
    episodes = play_episodes(problems, engine, get_verifier("exact"), SamplingParams(seed=0), 1, CFG)
    # One call per turn; problem 1 stops at turn 3, so turn 4 has one active episode.
    assert engine.calls == [(2, 1), (2, 1), (2, 1), (1, 1)]
    first, second = (e.to_row(CFG, "m") for e in episodes)
    assert first[schema.ANSWERS] == ["4", None, "5"]
    assert first[schema.CORRECT] == [False, False, True]
    assert first[schema.TURN_REWARDS] == [0.0, 0.0, 1.0]
    assert first[schema.FORMAT_FAILURES] == [False, True, False]
    assert first[schema.FORMAT_PENALTY] == pytest.approx(-0.1)
    assert first[schema.T_STAR] == 3 and first[schema.NUM_TURNS] == 3
    assert first[schema.ANSWER_NORMS] == ["4", "5"]
    roles = [m["role"] for m in first[schema.MESSAGES]]
    assert roles == ["user", "assistant", "user", "assistant", "user", "assistant"]
    assert [m["content"] for m in first[schema.MESSAGES] if m["role"] == "user"][1:] == [CFG.feedback] * 2
    assert second[schema.T_STAR] is None and second[schema.NUM_TURNS] == 4
    assert second[schema.MESSAGES][-1]["role"] == "assistant"  # no feedback after the last turn
    assert second[schema.ANSWER_NORMS] == ["1", "1", "2"]
    assert second[schema.TRAJECTORY_ID] == "p2/0"
    assert first[schema.CUT_OFF] == [False] * 3 and second[schema.CUT_OFF] == [False] * 3 + [True]
    assert episodes_table(episodes, CFG, "m").column(schema.CUT_OFF).to_pylist() == [[False] * 3, [False] * 3 + [True]]


def test_first_turn_asks_k_samples_per_prompt_once():
    problems = [Problem("a", "qa", "1"), Problem("b", "qb", "2")]
    engine = ScriptedEngine({"qa": ["<answer>1</answer>"], "qb": ["<answer>0</answer>"] * 4})
    episodes = play_episodes(problems, engine, get_verifier("exact"), SamplingParams(), 3, CFG)
    assert engine.calls[0] == (2, 3)  # two distinct prompts, three samples each
    assert engine.calls[1:] == [(3, 1)] * 3  # only b's three episodes continue
    assert [e.sample_index for e in episodes] == [0, 1, 2, 0, 1, 2]
    assert all(e.t_star == 1 for e in episodes[:3]) and all(e.t_star is None for e in episodes[3:])


class UnevenEngine(ScriptedEngine):
    """One reply too many for the first conversation and one too few for the second."""

    def generate(self, conversations, params, n):
        out = super().generate(conversations, params, n)
        out[1].pop()
        out[0].append(out[0][0])
        return out


def test_replies_are_checked_per_conversation():
    problems = [Problem("a", "qa", "1"), Problem("b", "qb", "2")]
    engine = UnevenEngine({"qa": ["<answer>1</answer>"], "qb": ["<answer>2</answer>"]})
    expected = r"^engine 'scripted' returned 4 for conversation 0 \(prompt 'a', turn 1\); expected 3 replies for each of 2 conversations$"
    with pytest.raises(RuntimeError, match=expected):
        play_episodes(problems, engine, get_verifier("exact"), SamplingParams(), 3, CFG)


class ShortOnTurn2Engine(ScriptedEngine):
    """No reply for the second conversation of turn 2: from turn 2 on, conversations are the unfinished episodes."""

    def generate(self, conversations, params, n):
        out = super().generate(conversations, params, n)
        if len(conversations) > 1 and len(conversations[0]) > 1:
            out[1].pop()
        return out


def test_a_missing_reply_after_turn_1_names_its_trajectory_and_turn():
    problems = [Problem("a", "qa", "1"), Problem("b", "qb", "2")]
    engine = ShortOnTurn2Engine({"qa": ["<answer>0</answer>"] * 2, "qb": ["<answer>0</answer>"] * 2})
    expected = r"returned 0 for conversation 1 \(trajectory 'a/1', turn 2\); expected 1 replies for each of 4 conversations$"
    with pytest.raises(RuntimeError, match=expected):
        play_episodes(problems, engine, get_verifier("exact"), SamplingParams(), 2, CFG)


def test_custom_feedback_and_max_turns():
    cfg = EpisodeConfig(instruction="{question}", max_turns=2, feedback="Wrong, try again.")
    engine = ScriptedEngine({"q": ["<answer>1</answer>", "<answer>1</answer>"]})
    (episode,) = play_episodes([Problem("p", "q", "2")], engine, get_verifier("exact"), SamplingParams(), 1, cfg)
    assert [m["content"] for m in episode.messages] == ["q", "<answer>1</answer>", "Wrong, try again.", "<answer>1</answer>"]


STABLE_SEED_OF_1_A = 475944544596965755  # pinned: the seeds of recorded runs replay only while it holds


def test_seeds_are_stable_and_distinct():
    # A constant, not a second call: Python's own hash of a string changes from process to process.
    assert stable_seed(1, "a") == STABLE_SEED_OF_1_A
    assert stable_seed(1, "a") != stable_seed(2, "a")
    assert 0 <= stable_seed("x") < 2**63


def test_teacher_on_candidates_task_is_reproducible_and_uses_feedback():
    task = candidates_task(seed=0, num_train=50, num_test=10)
    run = lambda seed: play_episodes(  # noqa: E731
        task.train, CandidatesTeacher(repeat_prob=0.0), get_verifier("exact"), SamplingParams(seed=seed), 2,
        EpisodeConfig(instruction="{question}", max_turns=6),
    )
    a, b = run(1), run(1)
    assert [e.messages for e in a] == [e.messages for e in b]
    # Never repeating and up to 6 candidates in 6 turns: every episode is solved, with distinct answers.
    assert all(e.t_star is not None for e in a)
    assert all(len(set(e.answer_norms)) == len(e.answer_norms) for e in a)
