"""reasoning-gym tasks: real generators end to end (load, score, play an episode), the stored gold and its
verifier (threshold, pickling, another process), and the errors of a bad name, config or generator."""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import subprocess
import sys
import time

import pytest

pytest.importorskip("reasoning_gym")

from drift_ray.config import EpisodeConfig, TaskConfig  # noqa: E402
from drift_ray.episode import Generation, SamplingParams, play_episodes  # noqa: E402
from drift_ray import gym_tasks  # noqa: E402
from drift_ray.gym_tasks import VERIFIER, GymGold, ReasoningGymVerifier, answer_evaluation, may_run_code  # noqa: E402
from drift_ray.prompts import TaskError, load_task  # noqa: E402
from drift_ray.verifiers import get_verifier  # noqa: E402

GENERATORS = ["basic_arithmetic", "chain_sum", "leg_counting"]


def gym_task(name: str, seed: int = 0, **fields):
    return load_task(TaskConfig(kind="reasoning_gym", name=name, **fields), seed=seed)


def reference_answer(problem) -> str:
    return GymGold.from_json(problem.gold).answer


@pytest.mark.parametrize("name", GENERATORS)
def test_generator_end_to_end_gold_is_right_and_a_wrong_answer_is_not(name):
    task = gym_task(name, options={"size": 30}, num_train=20, num_test=10)
    assert (task.name, task.verifier, len(task.train), len(task.test)) == (name, VERIFIER, 20, 10)
    assert [p.prompt_id for p in task.test] == [f"{name}-test-{i}" for i in range(10)]
    assert not {p.question for p in task.train} & {p.question for p in task.test}
    verifier = get_verifier(task.verifier)
    for problem in task.train + task.test:
        answer = reference_answer(problem)
        assert verifier.check(answer, problem.gold)
        assert not verifier.check(str(int(answer) + 1), problem.gold)
        assert not verifier.check("no idea", problem.gold)
        assert problem.metadata["dataset"] == name
    assert task.test == gym_task(name, options={"size": 30}, num_test=10).test
    assert [p.gold for p in task.test] == [p.gold for p in gym_task(name, options={"size": 30}, num_test=10).test]


def test_without_the_package_its_extra_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # as where it is not installed: import fails
    with pytest.raises(TaskError, match=re.escape(
        "task.kind=reasoning_gym needs the reasoning-gym package: pip install -e '.[gym]' in the repository, or pip "
        "install 'reasoning-gym>=0.1.25'"
    )):
        gym_task("chain_sum")


def test_train_and_test_seeds_are_far_apart_and_follow_the_seed_option():
    task = gym_task("chain_sum", options={"size": 50})
    train_config = GymGold.from_json(task.train[0].gold).config
    test_config = GymGold.from_json(task.test[0].gold).config
    # reasoning-gym item i of seed s is item i - 1 of seed s + 1: nearby seeds would share problems
    assert abs(train_config["seed"] - test_config["seed"]) > 1000
    assert gym_task("chain_sum", seed=5, options={"size": 50, "seed": 0}).test == task.test
    # A null seed option is the run's seed, as an unset one is (not the text "None", the same for every seed).
    assert gym_task("chain_sum", options={"size": 50, "seed": None}).test == task.test
    assert gym_task("chain_sum", seed=1, options={"size": 50, "seed": None}).test != task.test
    assert [p.question for p in gym_task("chain_sum", seed=1, options={"size": 50}).test] != [
        p.question for p in task.test
    ]


def test_train_problems_also_in_test_are_dropped():
    # two one-digit terms: a few hundred distinct questions, so 40 problems per split overlap
    task = gym_task("chain_sum", options={"size": 40, "min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1})
    assert len(task.test) == 40
    assert not {p.question for p in task.train} & {p.question for p in task.test}
    assert len(task.train) < 40


def test_generator_config_passes_through_options(caplog):
    with caplog.at_level(logging.INFO, logger="drift_ray"):
        task = gym_task("chain_sum", options={"size": 10, "min_terms": 5, "max_terms": 5})
    # A large size takes a while to generate and check: the log says what is under way.
    assert "reasoning-gym 'chain_sum': generating 10 train and 10 test problems" in caplog.text
    for problem in task.test:
        gold = GymGold.from_json(problem.gold)
        assert gold.config["min_terms"] == gold.config["max_terms"] == 5
        assert gold.metadata["num_terms"] == 5


def test_threshold_decides_partial_credit():
    problem = gym_task("leg_counting", options={"size": 3}).test[0]
    answer = reference_answer(problem)
    padded = f"{answer} legs"  # leg_counting gives len(answer)/len(padded) when the answer is inside
    score = get_verifier(VERIFIER).score(padded, problem.gold)
    assert 0.0 < score < 1.0
    assert not get_verifier(VERIFIER).check(padded, problem.gold)
    assert get_verifier(VERIFIER, threshold=score).check(padded, problem.gold)
    with pytest.raises(ValueError, match="threshold must be in"):
        get_verifier(VERIFIER, threshold=0.0)


def test_verifier_pickles_as_settings_and_normalizes():
    verifier = pickle.loads(pickle.dumps(get_verifier(VERIFIER, threshold=0.5, timeout_s=2.5, max_processes=3, cache_size=9)))
    assert (verifier.threshold, verifier.timeout_s, verifier.max_processes, verifier.cache_size) == (0.5, 2.5, 3, 9)
    assert verifier.normalize(" 4 2 ") == "42"


def test_a_slow_answer_to_a_scorer_that_evaluates_it_runs_out_of_time_and_is_wrong():
    """simple_integration's scorer simplifies the derivative of the answer: 20 s of sympy for this inert one."""
    problem, other = gym_task("simple_integration", options={"size": 3}).test[:2]
    variable = GymGold.from_json(problem.gold).metadata["variable"]
    slow = "*".join(f"({variable}+{k})**20" for k in range(1, 9))
    assert not may_run_code(slow, sympy=True)
    timeout_s, margin_s = 1.5, 2.0
    verifier = get_verifier(VERIFIER, timeout_s=timeout_s, max_processes=1)
    try:
        assert verifier.check(reference_answer(problem), problem.gold)  # starts the helper: start-up is not timed
        started = time.monotonic()
        assert verifier.score(slow, problem.gold) == 0.0
        assert timeout_s <= time.monotonic() - started < timeout_s + margin_s
        assert verifier.check(reference_answer(other), other.gold)  # a new helper took over
        started = time.monotonic()
        assert verifier.score(slow, problem.gold) == 0.0
        assert time.monotonic() - started < 0.1  # cached: the timeout is paid once
    finally:
        verifier.close()


@pytest.fixture
def gym_verifier():
    verifier = get_verifier(VERIFIER)
    yield verifier
    verifier.close()


def test_an_answer_that_could_run_code_is_not_shown_to_a_scorer_that_evaluates_it(gym_verifier, capfd):
    """string_insertion's scorer evals an answer that is not the reference; countdown's parses it with sympy."""
    problem = gym_task("string_insertion", options={"size": 3}).test[0]
    answer = reference_answer(problem)
    verifier = gym_verifier
    assert verifier.score(answer, problem.gold) == 1.0
    assert verifier.score(str(list(answer)), problem.gold) == 0.1  # evaluated: a list of its characters
    assert verifier.score(f"print('ran') or {list(answer)}", problem.gold) == 0.0
    # A bare name is a word (its answers are), unless eval would read the scorer's variable of that name:
    # `oracle_answer` is the reference answer, worth the partial credit of a list of its characters.
    assert verifier.score("oracle_answer", problem.gold) == 0.0 and not may_run_code("oracle_answer", sympy=False)
    assert verifier.score("ADECB" if answer != "ADECB" else "EDCBA", problem.gold) == 0.0
    assert "ran" not in capfd.readouterr().out
    for code in [
        "__import__('os').getpid()", "exec ('x=1')", "(exec)('x=1')", "[exec][0]('x=1')", "exec\\\n('x=1')",
        "\uff45\uff58\uff45\uff43('x=1')",  # fullwidth letters: Python reads exec
        "#c\r__import__('os').getpid()",  # Python's parser reads \r as a line end, after the comment
        "os.system('true')", "chr(95)", "f'{1}'", "9**9**9", "9**(9**9)", "9**~-10**9", "2**100000",
        "pow(9, pow(9, 9))", "[0]*10**10", "'%0999999999d' % 0", "oracle_answer*10**9",
        " open('x', 'w')", "\topen('x', 'w')",  # eval strips leading spaces and tabs before it parses
    ]:
        assert may_run_code(code, sympy=False) and verifier.score(code, problem.gold) == 0.0, code
    countdown = gym_task("countdown", options={"size": 3}).test[0]
    assert verifier.check(reference_answer(countdown), countdown.gold)  # arithmetic still reaches sympy
    for code in [
        "simplify('x')", "sin('x')", "test()", "nextprime(10**9999)", "factorial(99999999)", "99999999!",
        "1e999999", "1e-999999", "exp(999999999)", "exp(1000*1000*1000)", "exp(exp(exp(5)))", "(x+1)**9999",
        '"open(\'x\', \'w\')"',  # a string: diff of it sympifies it
    ]:
        assert may_run_code(code, sympy=True) and verifier.score(code, countdown.gold) == 0.0, code
    for arithmetic in [
        "x**2 + 3*x", "2*x**(3/2)/3 + C", "sqrt(2)*sin(x)", "abs(-3)", "2**10", "x**(-1)", "exp(3/2)",
        "-Integral(x**2*cos(x), x) + C",
    ]:
        assert not may_run_code(arithmetic, sympy=True), arithmetic
    for inert in ["['E', 'B', 'C']", "[[1, 2], [3, 4]]", "3 9 5\n6 2 7"]:  # the last cannot even parse
        assert not may_run_code(inert, sympy=False), inert
    # Only scorers that may evaluate an answer are guarded: prose elsewhere keeps its brackets and dots.
    assert [answer_evaluation(name) for name in ("string_insertion", "countdown")] == ["python", "sympy"]
    # advanced_geometry imports sympy, but its scorer reads answers with float(): "19.01°" reaches it
    assert answer_evaluation("advanced_geometry") is None
    assert answer_evaluation("leg_counting") is None and answer_evaluation("emoji_mystery") is None


def test_a_gold_from_another_task_is_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="is not a reasoning-gym gold"):
        get_verifier(VERIFIER).check("42", "42")
    named_twice = '{"answer": "1", "answer": "2", "dataset": "chain_sum", "config": {}, "metadata": {}}'
    with pytest.raises(ValueError, match="is not a reasoning-gym gold") as refused:
        get_verifier(VERIFIER).check("1", named_twice)
    assert "key 'answer' is written twice" in str(refused.value.__cause__)


def write_problems(path, problems) -> str:
    path.write_text("".join(json.dumps({"question": p.question, "gold": p.gold}) + "\n" for p in problems))
    return str(path)


def test_golds_from_a_file_are_scored_unless_their_scorer_would_evaluate_them(tmp_path):
    generated = gym_task("chain_sum", options={"size": 5}).test
    from_file = load_task(
        TaskConfig(kind="file", name="sums", test_path=write_problems(tmp_path / "sums.jsonl", generated), verifier=VERIFIER), 0
    )
    assert [p.gold for p in from_file.test] == [p.gold for p in generated]
    assert get_verifier(VERIFIER).check(reference_answer(generated[0]), from_file.test[0].gold)

    # number_sorting's scorer evals its gold's answer: read from data, it would run the data's code
    payload = GymGold("(print('RAN THE GOLD') or [1, 2])", "number_sorting", {}, {}).to_json()
    path = tmp_path / "sorting.jsonl"
    path.write_text(json.dumps({"question": "Sort 2, 1.", "gold": payload}) + "\n")
    config = TaskConfig(kind="file", name="sorting", test_path=str(path), verifier=VERIFIER)
    with pytest.raises(TaskError, match=r"task.verifier: problem 'sorting-1' is one of number_sorting, whose scorer evaluates"):
        load_task(config, 0)
    with pytest.raises(TaskError, match=r"eval.task.verifier: problem 'sorting-1' .* kind: reasoning_gym"):
        load_task(config, 0, key="eval.task")
    unknown = GymGold("1", "no_such_generator", {}, {}).to_json()
    (tmp_path / "unknown.jsonl").write_text(json.dumps({"question": "q", "gold": unknown}) + "\n")
    with pytest.raises(TaskError, match=r"problem 'unknown-1': its gold names no reasoning-gym generator \('no_such_generator'\)"):
        load_task(TaskConfig(kind="file", name="u", test_path=str(tmp_path / "unknown.jsonl"), verifier=VERIFIER), 0)


def test_a_file_gold_whose_generator_cannot_be_built_from_it_is_refused_at_load_naming_the_problem(tmp_path):
    # composite forwards each answer to the scorer of the generator its metadata names (some evaluate text),
    # and its config JSON cannot rebuild: the verifier failed at scoring, with an AttributeError naming no problem.
    composite = GymGold(
        "3", "composite", {"datasets": [{"name": "chain_sum", "weight": 1, "config": {}}]},
        {"source_dataset": "chain_sum", "source_index": 0},
    ).to_json()
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps({"question": "1 + 2?", "gold": composite}) + "\n")
    config = TaskConfig(kind="file", name="mixed", test_path=str(path), verifier=VERIFIER)
    refused = r"^task.verifier: problem 'mixed-1': reasoning_gym verifier: a gold of reasoning-gym's composite, which is not"
    with pytest.raises(TaskError, match=refused):
        load_task(config, 0)
    with pytest.raises(ValueError, match=r"a gold of reasoning-gym's composite"):
        get_verifier(VERIFIER).check("3", composite)

    # A config the generator rejects: named with its problem at load, not as a TypeError at scoring.
    wrong_config = GymGold("3", "chain_sum", {"min_termz": 2}, {}).to_json()
    path.write_text(json.dumps({"question": "1 + 2?", "gold": wrong_config}) + "\n")
    with pytest.raises(
        TaskError,
        match=r"^task.verifier: problem 'mixed-1': reasoning_gym verifier: reasoning-gym 'chain_sum' cannot be built from the "
        r"gold's config \{'min_termz': 2\}: TypeError",
    ):
        load_task(config, 0)
    with pytest.raises(ValueError, match=r"reasoning-gym 'chain_sum' cannot be built from the gold's config \{'min_termz': 2\}"):
        get_verifier(VERIFIER).check("3", wrong_config)


def test_a_generator_that_depends_on_string_hashing_is_scored_right_in_another_process():
    # isomorphic_strings builds different puzzles under different hash seeds: the gold must carry the entry
    problem = gym_task("isomorphic_strings", options={"size": 5}).test[0]
    script = (
        "import json, sys; import drift_ray.gym_tasks; from drift_ray.verifiers import get_verifier; "
        "gold, answer = json.load(sys.stdin); print(get_verifier('reasoning_gym').check(answer, gold))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    result = subprocess.run(
        [sys.executable, "-c", script],
        input=json.dumps([problem.gold, reference_answer(problem)]),
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )
    assert result.stdout.strip() == "True"


def test_every_process_generates_the_same_problems_whatever_its_hash_seed():
    """isomorphic_strings builds other puzzles under other hash seeds: a resumed run or a separate
    `drift-ray eval` must still get the problems of the first process."""
    script = (
        "import hashlib, json; from drift_ray.config import TaskConfig; from drift_ray.prompts import load_task; "
        "task = load_task(TaskConfig(kind='reasoning_gym', name='isomorphic_strings', options={'size': 8}), seed=0); "
        "print(json.dumps([[p.prompt_id, p.question, p.gold] for p in task.train + task.test]))"
    )
    problems = {
        subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300,
            env={**os.environ, "PYTHONHASHSEED": hash_seed},
        ).stdout
        for hash_seed in ("0", "1", "2")
    }
    assert len(problems) == 1
    task = gym_task("isomorphic_strings", options={"size": 8})
    assert json.loads(problems.pop()) == [[p.prompt_id, p.question, p.gold] for p in task.train + task.test]


def test_the_child_that_generates_problems_replies_on_stdout_whatever_else_writes_there():
    """Its helper processes inherit file descriptor 1, so the reply must not share it with anything."""
    script = (
        "import os; import drift_ray.gym_tasks as gym; generate = gym._generate\n"
        "def noisy(*args):\n    print('noise'); os.write(1, b'more noise'); return generate(*args)\n"
        "gym._generate = noisy; gym.serve_splits()"
    )
    request = {"name": "string_insertion", "options": {"size": 2}, "seed": 0, "verifier_options": {}}
    done = subprocess.run(
        [sys.executable, "-c", script], input=json.dumps(request), capture_output=True, text=True, check=True, timeout=120
    )
    reply = json.loads(done.stdout)
    assert [len(reply["train"]), len(reply["test"])] == [2, 2] and "more noise" in done.stderr


def test_a_reference_answer_the_scorer_runs_out_of_time_on_is_refused_at_load_naming_the_timeout(monkeypatch):
    """Reference answers are checked with the task's verifier options, so that a run does not score its own
    problems' right answers 0."""
    given_up = []
    monkeypatch.setattr(
        ReasoningGymVerifier, "score_unless_given_up", lambda self, answer, gold: given_up.append(self.timeout_s)
    )
    # In this process, where the patch holds (countdown's problems do not depend on the hash seed)
    monkeypatch.setattr(
        gym_tasks, "_splits_in_fixed_hash_process",
        lambda name, options, seed, verifier_options: gym_tasks._splits(name, json.loads(options), seed, json.loads(verifier_options)),
    )
    with pytest.raises(TaskError, match=r"countdown-test-0: .* longer than the reasoning_gym verifier's option timeout_s \(2.5 s\)"):
        gym_task("countdown", options={"size": 2}, verifier_options={"timeout_s": 2.5})
    assert given_up == [2.5]


class GymScriptedEngine:
    """Answers wrong on the first turn and with the reference answer after feedback."""

    name = "gym-scripted"

    def __init__(self, answers: dict[str, str]):
        self.answers = answers

    def generate(self, conversations, params, n):
        out = []
        for conversation in conversations:
            question = conversation[0]["content"]
            turn = sum(m["role"] == "assistant" for m in conversation)
            text = f"<answer>{'wrong' if turn == 0 else self.answers[question]}</answer>"
            out.append([Generation(text, 1, len(text)) for _ in range(n)])
        return out


def test_episode_with_a_gym_task_is_corrected_on_turn_two():
    task = gym_task("basic_arithmetic", options={"size": 4})
    cfg = EpisodeConfig(instruction="{question}", max_turns=3)
    engine = GymScriptedEngine({p.question: reference_answer(p) for p in task.test})
    episodes = play_episodes(task.test, engine, get_verifier(task.verifier), SamplingParams(seed=0), 2, cfg)
    assert len(episodes) == 8
    for episode in episodes:
        assert episode.correct == [False, True] and episode.t_star == 2
        assert [m["role"] for m in episode.messages] == ["user", "assistant", "user", "assistant"]
        assert episode.answer_norms == ["wrong", reference_answer(episode.problem)]


def test_errors_name_the_problem():
    with pytest.raises(TaskError, match=r"unknown reasoning-gym generator 'chain_sums'; did you mean chain_sum"):
        gym_task("chain_sums")
    with pytest.raises(TaskError, match=r"^task.options: got an unexpected keyword argument 'min_termz'; accepted options: min_terms,"):
        gym_task("chain_sum", options={"min_termz": 3})
    with pytest.raises(TaskError, match=r"^task.options: size: Input should be a number, not true or false \(found True\)$"):
        gym_task("chain_sum", options={"size": True})
    # YAML 1.2 reads `allow_negation: no` as the word, which the generator's unchecked dataclass would take as true.
    with pytest.raises(TaskError, match=r"^task.options: allow_negation: expected true or false, found the text 'no'$"):
        gym_task("chain_sum", options={"allow_negation": "no"})
    with pytest.raises(
        TaskError, match=r"reasoning-gym 'chain_sum' rejects the config .*'min_terms': 0.*its fields: \[.*'min_terms'"
    ):
        gym_task("chain_sum", options={"min_terms": 0})
    # The generator's config takes any value: a float where it counts items fails only as it generates.
    for options in ({"size": 2.5}, {"size": 3, "min_terms": 2.5}):
        with pytest.raises(TaskError, match=r"^task.options: reasoning-gym 'chain_sum' rejects the config .*its fields"):
            gym_task("chain_sum", options=options)
    # Its golds are reasoning-gym entries: another verifier would find every answer wrong.
    with pytest.raises(TaskError, match=r"^task.verifier: 'numeric' cannot read a reasoning-gym gold .* unset"):
        gym_task("chain_sum", options={"size": 3}, verifier="numeric")
    with pytest.raises(TaskError, match=r"composite is not supported"):
        gym_task("composite")
    # Degree 12 polynomials multiplied: exponents up to 36, beyond what an answer may hold.
    with pytest.raises(TaskError, match=r"polynomial_multiplication-test-\d+: .* which its scorer would evaluate"):
        gym_task("polynomial_multiplication", options={"size": 5, "min_degree": 12, "max_degree": 12})
    with pytest.raises(
        TaskError, match=r"arc_agi-test-0: reasoning-gym 'arc_agi' scores its own answer .* not supported"
    ):
        gym_task("arc_agi", options={"size": 2})
    with pytest.raises(TaskError, match=r"task.verifier_options: .*'timeout'.*accepted options: threshold, timeout_s"):
        gym_task("chain_sum", verifier_options={"timeout": 5})
