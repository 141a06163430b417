"""Problem sources: the built-in task, local files with column mapping, plugins, and their errors."""

import json
import logging
import re
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from drift_ray.builtin_tasks import candidate_values, candidates_task
from drift_ray.config import TaskConfig
from drift_ray.prompts import Problem, Task, TaskError, load_task, read_problems
from drift_ray.verifiers import get_verifier


def test_candidates_task_splits_are_disjoint_and_golds_are_candidates():
    task = candidates_task(seed=3, num_train=500, num_test=100)
    assert len(task.train) == 500 and len(task.test) == 100
    assert not {p.question for p in task.train} & {p.question for p in task.test}
    counts = set()
    for problem in task.train + task.test:
        values = problem.metadata["candidates"]
        assert int(problem.gold) in values and 2 <= len(values) <= 6
        counts.add(len(values))
    assert counts == {2, 3, 4, 5, 6}
    assert candidates_task(seed=3, num_train=5, num_test=5) == candidates_task(seed=3, num_train=5, num_test=5)


def test_candidates_task_num_train_keeps_the_first_train_problems_and_leaves_the_test_split_as_it_is():
    full = candidates_task(seed=3, num_test=50)
    for num_train in (1, 7, 300):
        small = candidates_task(seed=3, num_train=num_train, num_test=50)
        assert small.train == full.train[:num_train]
        assert small.test == full.test


@pytest.mark.parametrize(
    "options, message",
    [
        ({"num_test": 3000}, "at most 2550 distinct questions, asked for 3000"),
        ({"min_candidates": 8, "max_candidates": 8}, "at most 110 distinct questions, asked for 200"),
        ({"num_train": 2400}, "at most 2550 distinct questions, asked for 2600"),
        ({"num_train": -5}, "num_train and num_test must be >= 0, found -5, 200"),
    ],
)
def test_candidates_task_refuses_more_questions_than_it_has(options, message):
    with pytest.raises(ValueError, match=f"^task.options: {message}$"):
        candidates_task(seed=0, **options)


def test_candidate_values():
    assert candidate_values(23, 52, 6) == [26, 36, 46]


def test_load_builtin_truncates_and_names_unknown():
    cfg = TaskConfig(kind="builtin", name="candidates", num_train=7, num_test=3, options={"num_train": 20, "num_test": 5})
    task = load_task(cfg, seed=0)
    assert (len(task.train), len(task.test), task.verifier) == (7, 3, "exact")
    with pytest.raises(TaskError, match="unknown builtin task 'nope'"):
        load_task(TaskConfig(name="nope"), seed=0)


def test_asking_for_more_problems_than_the_task_holds_is_warned_about(caplog):
    cfg = TaskConfig(kind="builtin", name="candidates", num_train=30, num_test=9, options={"num_train": 20, "num_test": 5})
    with caplog.at_level("WARNING", logger="drift_ray"):
        task = load_task(cfg, seed=0, key="eval.task")
    assert (len(task.train), len(task.test)) == (20, 5)
    assert [record.getMessage() for record in caplog.records] == [
        f"eval.task.{name} = {asked}, but task 'candidates' holds only {held} such problems: all of them are used "
        "(its builder's own options, eval.task.options, may make more)"
        for name, asked, held in (("num_train", 30, 20), ("num_test", 9, 5))
    ]


@pytest.mark.parametrize(
    "cfg, message",
    [
        (
            TaskConfig(name="candidates", options={"nmu_test": 5}),
            "task.options: got an unexpected keyword argument 'nmu_test'; "
            "accepted options: num_train, num_test, min_candidates, max_candidates",
        ),
        (
            TaskConfig(name="candidates", options={"seed": 3}),
            "task.options: seed: drift-ray sets it from the config, not from these options; "
            "accepted options: num_train, num_test, min_candidates, max_candidates",
        ),
        (
            TaskConfig(kind="plugin", name="tests.test_prompts:make_plugin_task", options={"sise": 3}),
            "task.options: got an unexpected keyword argument 'sise'; accepted options: size",
        ),
        (
            TaskConfig(name="candidates", options={"num_test": 5.5}),
            "task.options.num_test: Input should be a valid integer, got a number with a fractional part (found 5.5)",
        ),
        (
            TaskConfig(name="candidates", options={"num_test": True}),
            "task.options: num_test: Input should be a number, not true or false (found True)",
        ),
        (
            TaskConfig(kind="plugin", name="tests.test_prompts:make_plugin_task", options={"size": True}),
            "task.options: size: Input should be a number, not true or false (found True)",
        ),
        (
            TaskConfig(name="candidates", options={"num_test": "1_000"}),  # YAML 1.2 text, once a YAML 1.1 number
            "task.options: num_test: expected a number, found the text '1_000'",
        ),
        (
            TaskConfig(name="candidates", verifier="math", verifier_options={"timeout_s": "5"}),
            "task.verifier_options: verifier 'math': timeout_s: expected a number, found the text '5'",
        ),
        (
            TaskConfig(name="candidates", verifier="exactt"),
            "task.verifier: unknown verifier 'exactt'; known: choice, exact, math, numeric, reasoning_gym",
        ),
        (
            TaskConfig(name="candidates", verifier="numeric", verifier_options={"rel_tl": 0.1}),
            "task.verifier_options: verifier 'numeric': got an unexpected keyword argument 'rel_tl'; "
            "accepted options: rel_tol, abs_tol",
        ),
        (
            TaskConfig(name="candidates", verifier_options={"timeout_s": 5}),
            "task.verifier_options: verifier 'exact': got an unexpected keyword argument 'timeout_s'; "
            "accepted options: none",
        ),
        (
            TaskConfig(name="candidates", verifier="math", verifier_options={"timeout_s": False}),
            "task.verifier_options: verifier 'math': timeout_s: Input should be a number, not true or false (found False)",
        ),
        (
            TaskConfig(name="candidates", verifier="numeric", verifier_options={"rel_tol": -1}),
            "task.verifier_options: numeric verifier: tolerances must be finite and >= 0, found rel_tol=-1, abs_tol=None",
        ),
    ],
    ids=[
        "builtin-option", "builtin-seed-option", "plugin-option", "builtin-option-type", "builtin-option-boolean",
        "plugin-option-boolean", "builtin-option-text", "verifier-option-text", "verifier", "verifier-option", "own-verifier-option", "verifier-option-boolean",
        "verifier-value",
    ],
)
def test_a_bad_task_key_is_named_at_load_time_under_the_section_it_came_from(cfg, message):
    with pytest.raises(TaskError, match="^" + re.escape(message) + "$"):
        load_task(cfg, seed=0)
    with pytest.raises(TaskError, match="^eval\\." + re.escape(message) + "$"):
        load_task(cfg, seed=0, key="eval.task")


def test_read_jsonl_with_column_mapping(tmp_path):
    path = tmp_path / "probs.jsonl"
    path.write_text("\n".join(json.dumps({"problem": f"q{i}", "answer": str(i), "level": i}) for i in range(3)) + "\n")
    problems = read_problems(path, {"question": "problem", "gold": "answer"})
    assert [p.prompt_id for p in problems] == ["probs-1", "probs-2", "probs-3"]
    assert problems[2] == Problem("probs-3", "q2", "2") and problems[2].metadata == {"level": 2}


def test_a_json_file_is_json_lines_or_one_array(tmp_path):
    rows = [{"question": "q1", "gold": "1"}, {"question": "q2", "gold": "2"}]
    lines, array = tmp_path / "lines.json", tmp_path / "array.json"
    lines.write_text("".join(json.dumps(row) + "\n" for row in rows))
    array.write_bytes(b"\xef\xbb\xbf\n" + json.dumps(rows, indent=2).encode())  # a BOM and a blank line first
    assert [(p.question, p.gold) for p in read_problems(lines)] == [(p.question, p.gold) for p in read_problems(array)]
    assert [p.prompt_id for p in read_problems(array)] == ["array-1", "array-2"]


def test_jsonl_rows_keep_keys_the_first_row_lacks_and_golds_of_any_type(tmp_path):
    path = tmp_path / "probs.jsonl"
    rows = [{"question": "q1", "gold": 5}, {"question": "q2", "gold": "1/2", "prompt_id": "b"}, {"question": "q3", "gold": 0.5}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    problems = read_problems(path)
    assert [(p.prompt_id, p.gold) for p in problems] == [("probs-1", "5"), ("b", "1/2"), ("probs-3", "0.5")]
    # A whole number in a float column is the integer it is: the numeric verifier then asks for it exactly.
    path.write_text(json.dumps({"question": "q", "gold": 100000.0}) + "\n")
    (problem,) = read_problems(path)
    assert problem.gold == "100000"
    numeric = get_verifier("numeric")
    assert not numeric.check("100010", problem.gold) and numeric.check("1e5", problem.gold)
    # Beyond 2**53 a float is not the integer it was written as: kept as the float reads.
    path.write_text(json.dumps({"question": "q", "gold": 12345678901234567.0}) + "\n")
    assert read_problems(path)[0].gold == str(12345678901234567.0)


def test_pandas_row_labels_are_no_metadata_and_ids_on_some_rows_only_are_warned_of(tmp_path, caplog):
    path = tmp_path / "t.parquet"
    table = pa.table({"prompt_id": ["x", None], "question": ["a", "b"], "gold": ["1", "2"], "__index_level_0__": [3, 7]})
    pq.write_table(table, path)
    with caplog.at_level(logging.WARNING, logger="drift_ray"):
        problems = read_problems(path)
    assert [(p.prompt_id, p.metadata) for p in problems] == [("x", {}), ("t-2", {})]
    assert f"{path}: 1 of its 2 rows have no 'prompt_id': their ids are made up ('t-ROW')" in caplog.text


def test_parquet_bytes_are_read_as_their_text(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"prompt_id": [b"x"], "question": [b"What is 2+2?"], "gold": [b"4"]}), path)
    assert read_problems(path) == [Problem("x", "What is 2+2?", "4")]
    pq.write_table(pa.table({"question": [b"q", b"q\xff"], "gold": [b"4", b"5"]}), path)
    with pytest.raises(TaskError, match=r"t\.parquet: row 2: column 'question' holds bytes that are not UTF-8 text"):
        read_problems(path)


def test_read_parquet_file_task(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"prompt_id": ["x", "y"], "question": ["a", "b"], "gold": ["1", "2"]}), path)
    task = load_task(TaskConfig(kind="file", name="mine", test_path=str(path), verifier="exact"), seed=0)
    assert task.train == [] and [p.prompt_id for p in task.test] == ["x", "y"]
    assert task.name == "mine"
    # Unnamed, told by its file, not by the built-in task that task.name defaults to.
    assert load_task(TaskConfig(kind="file", test_path=str(path)), seed=0).name == str(path)
    # Integer ids beside a null are stored as floats by pandas: still the file's ids, not "7.0".
    pq.write_table(pa.table({"prompt_id": [7.0, 8.0], "question": ["a", "b"], "gold": ["1", "2"]}), path)
    assert [p.prompt_id for p in read_problems(path)] == ["7", "8"]
    pq.write_table(pa.table({"prompt_id": [7.0, float("nan")], "question": ["a", "b"], "gold": ["1", "2"]}), path)
    with pytest.raises(TaskError, match=r"t\.parquet: row 2: column 'prompt_id' holds nan"):
        read_problems(path)
    # A float32 gold is the number written, not its binary rounding (0.10000000149011612).
    pq.write_table(pa.table({"question": ["a", "b"], "gold": pa.array([0.1, 2.0], pa.float32())}), path)
    assert [p.gold for p in read_problems(path)] == ["0.1", "2"]


@pytest.mark.parametrize(
    "content, columns, fragment",
    [
        ('{"question": "a", "gold": "1"}\n{not json}\n', {}, ":2: not valid JSON (one JSON object per line): Expecting property name enclosed in double quotes at column 2"),
        ('{"question": "a\tb", "gold": "1"}\n', {}, ":1: not valid JSON (one JSON object per line): Invalid control character at column 16"),
        ('{"question": "a"}\n', {}, "missing column(s) ['gold']"),
        ('{"question": "a", "gold": ""}\n', {}, "bad.jsonl:1: column 'gold' is missing or empty"),
        ('{"question": "a", "gold": "1"}\n\n{"question": "b"}\n', {}, "bad.jsonl:3: column 'gold' is missing or empty"),
        ('[1, 2]\n', {}, ":1: expected a JSON object, found list (one JSON object per line)"),
        ('[\n  {"question": "a", "gold": "1"}\n]\n', {}, ":1: not valid JSON (one JSON object per line)"),
        ('{"question": "a", "gold": NaN}\n', {}, "bad.jsonl:1: column 'gold' holds nan; expected text or a finite number"),
        ('{"question": -Infinity, "gold": "1"}\n', {}, "bad.jsonl:1: column 'question' holds -inf; expected text"),
        ('{"question": "a", "gold": "1", "gold": "2"}\n', {}, "bad.jsonl:1: key 'gold' is written twice in one object"),
        ('{"prompt_id": "a", "question": "q", "gold": "1"}\n' * 2, {}, "prompt id 'a' appears more than once"),
        # The id made up for a row without one (<stem>-<row>) is one that another row gives: both lines named.
        (
            '{"prompt_id": "bad-2", "question": "q1", "gold": "1"}\n{"question": "q2", "gold": "2"}\n',
            {},
            "prompt id 'bad-2' appears more than once (PATH:1 gives 'prompt_id' 'bad-2'; PATH:2 has no 'prompt_id': "
            "the id is made up for it)",
        ),
        (
            '{"prompt_id": 1.0, "question": "q1", "gold": "1"}\n{"prompt_id": 1, "question": "q2", "gold": "2"}\n',
            {},
            "prompt id '1' appears more than once (PATH:1 gives 'prompt_id' 1.0; PATH:2 gives 'prompt_id' 1)",
        ),
        ("", {}, "no problems"),
        ('{"question": "a", "gold": "1"}\n', {"answer": "gold"}, "task.columns: unknown key"),
        (b'{"question": "a", "gold": "1"}\n{"question": "caf\xe9", "gold": "2"}\n', {}, "bad.jsonl:2: not UTF-8 text"),
        ('{"question": ["a", "b"], "gold": "1"}\n', {}, "bad.jsonl:1: column 'question' holds a list; expected text"),
        ('{"question": "a", "gold": {"x": 1}}\n', {}, "bad.jsonl:1: column 'gold' holds a dict; expected text"),
        ('{"prompt_id": " ", "question": "a", "gold": "1"}\n', {}, "bad.jsonl:1: column 'prompt_id' holds ' '"),
        # A mapped id column that is not there is a typo, not a file without ids.
        (
            '{"idx": "a", "question": "q", "gold": "1"}\n',
            {"prompt_id": "id"},
            "missing column(s) ['id']; found ['idx', 'question', 'gold']. Map your columns with task.columns, e.g. "
            "{question: problem, gold: answer} (one mapping for both splits' files: give them the same columns)",
        ),
    ],
)
def test_bad_problem_files(tmp_path, content, columns, fragment):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(TaskError) as err:
        read_problems(path, columns)
    assert fragment.replace("PATH", str(path)) in str(err.value)


def test_a_problem_file_is_jsonl_or_parquet_whose_metadata_json_can_hold(tmp_path):
    csv = tmp_path / "problems.csv"
    csv.write_text("question,gold\na,1\n")
    with pytest.raises(TaskError, match=r"problems\.csv: unknown file type '\.csv'; expected one of \.jsonl, \.json, \.parquet$"):
        read_problems(csv)
    with pytest.raises(TaskError, match=r": a directory; give one file of problems per split \(\.jsonl, \.json, \.parquet\)"):
        read_problems(tmp_path)
    # One Parquet dataset written as a directory of parts (Spark, Ray Data): read whole.
    (tmp_path / "dataset.parquet").mkdir()
    for part in range(2):
        pq.write_table(pa.table({"question": [f"q{part}"], "gold": [str(part)]}), tmp_path / "dataset.parquet" / f"part-{part}.parquet")
    assert sorted(p.gold for p in read_problems(tmp_path / "dataset.parquet")) == ["0", "1"]
    shouted = tmp_path / "PROBLEMS.JSONL"
    shouted.write_text('{"question": "a", "gold": "1"}\n')
    assert [p.question for p in read_problems(shouted)] == ["a"]
    # Read as Parquet holds it; refused when read, not when the rollouts write the metadata as JSON.
    images = tmp_path / "images.parquet"
    pq.write_table(pa.table({"question": ["a", "b"], "gold": ["1", "2"], "image": pa.array([None, b"\x89PNG"])}), images)
    with pytest.raises(TaskError, match=r"images\.parquet: row 2: 'image' holds bytes b'\\x89PNG', which problem metadata \(stored as JSON\)"):
        read_problems(images)
    # Parquet's reader does not check text: bytes that are not UTF-8 would fail when a row is read.
    latin1 = tmp_path / "latin1.parquet"
    not_utf8 = pa.Array.from_buffers(pa.string(), 1, pa.array(["caf\u00e9".encode("latin-1")], pa.binary()).buffers())
    pq.write_table(pa.table({"question": not_utf8, "gold": ["1"]}), latin1)
    with pytest.raises(TaskError, match=r"latin1\.parquet: not UTF-8 text"):
        read_problems(latin1)


def make_plugin_task(seed, size: int = 2):
    return Task("plugin", [Problem(f"p{i}", "q", "a") for i in range(size)], [], "exact")


if TYPE_CHECKING:  # as a plugin's module may import what only its annotations name
    from numbers import Integral


# Annotations that fail when evaluated: a name imported for type checkers only (NameError), a union with
# a forward reference in it (TypeError).
def make_plugin_task_typed_for_checkers_only(seed, size: "Integral" = 2, strict: bool = False):
    return make_plugin_task(seed, size)


def make_plugin_task_with_a_name_in_a_union(seed, size: "int | 'Integral'" = 2, strict: bool = False):
    return make_plugin_task(seed, size)


def make_seedless_plugin_task():
    return make_plugin_task(0)


def make_plugin_task_with_repeated_ids(seed):
    # Ids from an index that restarts per source: two different problems under "src-0".
    return Task("plugin", [], [Problem(f"src-{i}", f"q{n}", "a") for n in range(2) for i in range(2)], "exact")


def make_plugin_task_with_mixed_keys_in_metadata(seed):
    # json.dumps writes it, but not with sorted keys, as Problem.to_row does.
    return Task("plugin", [Problem("p", "q", "1", {"levels": {1: "easy", "b": "hard"}})], [], "exact")


def make_tolerant_plugin_task(seed):
    return Task("plugin", [Problem("p", "q", "100")], [], "numeric", {"rel_tol": 0.1, "abs_tol": 1.0})


@pytest.mark.parametrize(
    "verifier, options, tolerance",
    [
        (None, {}, (0.1, 1.0)),  # the task's own verifier with the task's own options
        (None, {"abs_tol": 0.0}, (0.1, 0.0)),  # the config's options over the task's
        ("numeric", {}, (1e-4, 1e-6)),  # a verifier the config names gets the config's options only
    ],
)
def test_verifier_options_reach_the_verifier(verifier, options, tolerance):
    cfg = TaskConfig(kind="plugin", name="tests.test_prompts:make_tolerant_plugin_task", verifier=verifier,
                     verifier_options=options)
    check = load_task(cfg, seed=0).new_verifier()
    assert (check.rel_tol, check.abs_tol) == tolerance
    assert check.check("109", "100") == (tolerance[0] == 0.1)


def make_plugin_task_with_numbers_for_text(seed):
    return Task("plugin", [Problem("p1", "q", "1"), Problem(2, "q", "2")], [], "exact")


def make_plugin_task_that_raises(seed):
    raise RuntimeError("the dataset server is down")


def make_plugin_task_with_bad_verifier_options(seed):
    return Task("plugin", [Problem("p", "q", "100")], [], "numeric", {"rel_toll": 0.1})


def plugin_error(name: str) -> str:
    """The message load_task refuses the plugin task `name` with."""
    with pytest.raises(TaskError) as err:
        load_task(TaskConfig(kind="plugin", name=name), seed=0)
    return str(err.value)


def test_a_plugin_module_that_fails_as_it_imports_is_named(tmp_path, monkeypatch):
    (tmp_path / "plugin_that_fails_to_import.py").write_text("raise OSError('no data here')\n")
    monkeypatch.syspath_prepend(tmp_path)
    assert plugin_error("plugin_that_fails_to_import:f") == (
        "task.name: importing plugin module 'plugin_that_fails_to_import' raised OSError: no data here (rerun with "
        "--traceback to see where)"
    )


def test_golds_that_the_verifier_cannot_meet_are_warned_of(tmp_path, caplog):
    path = tmp_path / "golds.jsonl"
    path.write_text("".join(json.dumps({"question": "q", "gold": gold}) + "\n" for gold in ("8", "eight", "\\frac{1}{2}")))
    with caplog.at_level(logging.WARNING, logger="drift_ray"):
        load_task(TaskConfig(kind="file", train_path=str(path), verifier="numeric"), seed=0)
    assert (
        f"task {str(path)!r}: 2 of its 3 golds are not met even by themselves under the 'numeric' verifier (e.g. the "
        "train problem 'golds-2', gold 'eight'), so every answer to them is scored wrong; task.verifier may need to be "
        "another"
    ) in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="drift_ray"):
        load_task(TaskConfig(kind="file", train_path=str(path), verifier="exact"), seed=0)
    assert "golds" not in caplog.text


def test_plugin_task_and_errors():
    task = load_task(TaskConfig(kind="plugin", name="tests.test_prompts:make_plugin_task", options={"size": 3}), seed=0)
    assert len(task.train) == 3
    # An annotation only a type checker resolves does not keep the plugin from loading.
    for plugin in ("make_plugin_task_typed_for_checkers_only", "make_plugin_task_with_a_name_in_a_union"):
        typed = TaskConfig(kind="plugin", name=f"tests.test_prompts:{plugin}", options={"size": 3, "strict": True})
        assert len(load_task(typed, seed=0).train) == 3
    with pytest.raises(TaskError, match="module:function"):
        load_task(TaskConfig(kind="plugin", name="no_colon"), seed=0)
    # The drift-ray command does not import from the current directory, as `python -m drift_ray` does.
    assert plugin_error("no_such_module_xyz:f") == (
        "task.name: cannot import plugin module 'no_such_module_xyz': No module named 'no_such_module_xyz'; put the "
        "directory that holds it on PYTHONPATH (e.g. PYTHONPATH=. drift-ray …)"
    )
    # A builder without a seed is named, not the task.options it was called with.
    assert plugin_error("tests.test_prompts:make_seedless_plugin_task") == (
        "task.name: tests.test_prompts:make_seedless_plugin_task takes no seed keyword; drift-ray calls it as "
        "make_seedless_plugin_task(seed=<seed>, **task.options), with the run's seed to sample problems by: give it "
        "a seed parameter"
    )
    assert plugin_error("tests.test_prompts:make_plugin_task_with_repeated_ids") == (
        "task.name: plugin 'tests.test_prompts:make_plugin_task_with_repeated_ids', test split: "
        "prompt id 'src-0' appears more than once; ids must be unique"
    )
    # Errors of the plugin's own code are said to be its own, and what it returns is checked as the stages read it.
    assert plugin_error("tests.test_prompts:make_plugin_task_that_raises") == (
        "task.name: plugin 'tests.test_prompts:make_plugin_task_that_raises' raised RuntimeError: the dataset server is "
        "down (rerun with --traceback to see where)"
    )
    assert plugin_error("tests.test_prompts:make_plugin_task_with_numbers_for_text") == (
        "task.name: plugin 'tests.test_prompts:make_plugin_task_with_numbers_for_text', train split, problem 2: "
        "prompt_id is 2; expected non-empty text (a str)"
    )
    assert plugin_error("tests.test_prompts:make_plugin_task_with_bad_verifier_options") == (
        "task.name: task 'plugin' gives verifier_options {'rel_toll': 0.1}: verifier 'numeric': got an unexpected "
        "keyword argument 'rel_toll'; accepted options: rel_tol, abs_tol"
    )
    assert plugin_error("tests.test_prompts:make_plugin_task_with_mixed_keys_in_metadata").startswith(
        "task.name: plugin 'tests.test_prompts:make_plugin_task_with_mixed_keys_in_metadata', problem 'p': metadata: "
        "'levels' holds dict {1: 'easy', 'b': 'hard'}, which problem metadata (stored as JSON) cannot hold"
    )
