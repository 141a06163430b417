"""Hub benchmarks: each loader on a tiny file in its hub's column layout, the hub path (with `datasets` faked),
the offline error, bad files, and the jobs/eval configs. Never touches the network (HF_HUB_OFFLINE)."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from unittest import mock

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from drift_ray.config import TaskConfig, load_config
from drift_ray.hub_tasks import CHOICE_LETTERS, HUB_DATASETS, MATH_SUBJECTS, last_boxed, render_choices
from drift_ray.prompts import TaskError, load_task

EVAL_DIR = Path(__file__).resolve().parents[1] / "jobs" / "eval"


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch, tmp_path):
    """No network and an empty datasets cache, whatever the environment and earlier imports set."""
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets-cache")


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def hub_task(name: str, seed: int = 0, **fields):
    return load_task(TaskConfig(kind="hub", name=name, **fields), seed=seed)


def by_id(problems) -> dict:
    return {p.prompt_id: p for p in problems}


def choice_lines(question: str) -> dict[str, str]:
    return dict(re.findall(r"^([A-J])\) (.*)$", question, flags=re.MULTILINE))


# ------------------------------------------------------------------------------------------ extraction


@pytest.mark.parametrize(
    "solution, gold",
    [
        ("So $x = \\boxed{\\frac{\\sqrt{3}}{2}}$.", "\\frac{\\sqrt{3}}{2}"),
        ("First \\boxed{1}, then finally \\boxed{\\{1, 2\\}}.", "\\{1, 2\\}"),
        ("The sum is $\\boxed{x^{2^{3}}+1}$ indeed", "x^{2^{3}}+1"),
        ("the answer is \\fbox{7}.", "7"),
        ("so $\\boxed 5$.", "5"),
        ("so $\\boxed {5}$.", "5"),
        ("no box here: 12", None),
        ("unbalanced \\boxed{\\frac{1}{2}", None),
    ],
)
def test_last_boxed(solution, gold):
    assert last_boxed(solution) == gold


def test_render_choices_letters_each_choice_and_refuses_too_many():
    question = render_choices("Which?", [" red", "green ", "blue"])
    assert question.startswith("Which?\n\n")
    assert choice_lines(question) == {"A": "red", "B": "green", "C": "blue"}
    with pytest.raises(ValueError, match="11 choices"):
        render_choices("Which?", [str(i) for i in range(11)])


# ---------------------------------------------------------------------------------- local files, per set


def test_metamathqa_keeps_math_rows_and_the_answer_after_the_marker(tmp_path):
    rows = [
        {
            "query": f"Q{i}",
            "response": f"Work {i}.\nThe answer is: \\frac{{{i}}}{{2}}",
            "type": kind,
            "original_question": "o",
        }
        for i, kind in enumerate(["MATH_AnsAug", "GSM_Rephrased", "MATH_SV", "GSM_AnsAug", "MATH_FOBAR"])
    ]
    task = hub_task("metamathqa", train_path=write_jsonl(tmp_path / "train.jsonl", rows))
    assert task.verifier == "math" and task.test == []
    by_id = {p.prompt_id: p for p in task.train}
    assert set(by_id) == {"metamathqa-train-0", "metamathqa-train-2", "metamathqa-train-4"}
    assert (by_id["metamathqa-train-2"].question, by_id["metamathqa-train-2"].gold) == ("Q2", "\\frac{2}{2}")
    assert by_id["metamathqa-train-4"].metadata == {"type": "MATH_FOBAR"}


def test_metamathqa_train_order_is_a_seeded_shuffle(tmp_path):
    rows = [{"query": f"Q{i}", "response": f"The answer is: {i}", "type": "MATH_AnsAug"} for i in range(30)]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    order = [p.prompt_id for p in hub_task("metamathqa", seed=1, train_path=path).train]
    assert order == [p.prompt_id for p in hub_task("metamathqa", seed=1, train_path=path).train]
    assert order != [p.prompt_id for p in hub_task("metamathqa", seed=2, train_path=path).train]
    assert order == [p.prompt_id for p in hub_task("metamathqa", seed=2, train_path=path, options={"seed": 1}).train]
    assert sorted(order) == sorted(f"metamathqa-train-{i}" for i in range(30))
    truncated = hub_task("metamathqa", seed=1, train_path=path, num_train=5).train
    assert [p.prompt_id for p in truncated] == order[:5]


def test_math_reads_parquet_and_takes_the_last_nested_box(tmp_path):
    rows = [
        {
            "problem": "Find x.",
            "level": "Level 3",
            "type": "Algebra",
            "solution": "Try \\boxed{1}. No: $\\boxed{\\frac{\\sqrt{3}}{2}}$.",
        },
        {
            "problem": "Count.",
            "level": "Level 5",
            "type": "Counting & Probability",
            "solution": "It is \\boxed{\\{a, b\\}}",
        },
    ]
    test_path = tmp_path / "test.parquet"
    pq.write_table(pa.Table.from_pylist(rows), test_path)
    task = hub_task("math", test_path=str(test_path))
    assert task.train == [] and task.verifier == "math"
    assert sorted((p.prompt_id, p.question, p.gold) for p in task.test) == [
        ("math-test-0", "Find x.", "\\frac{\\sqrt{3}}{2}"),
        ("math-test-1", "Count.", "\\{a, b\\}"),
    ]
    assert by_id(task.test)["math-test-1"].metadata == {"level": "Level 5", "type": "Counting & Probability"}


def test_math_row_without_a_box_names_file_row_and_column(tmp_path):
    path = write_jsonl(
        tmp_path / "test.jsonl", [{"problem": "P", "solution": "\\boxed{1}"}, {"problem": "P2", "solution": "2"}]
    )
    with pytest.raises(
        TaskError, match=r"test\.jsonl:2 \(prompt id math-test-1\): column 'solution' has no \\boxed"
    ):
        hub_task("math", test_path=path)


def test_math500_and_its_metadata(tmp_path):
    rows = [
        {
            "problem": "P",
            "solution": "S",
            "answer": "\\frac{1}{2}",
            "subject": "Algebra",
            "level": 2,
            "unique_id": "test/algebra/1.json",
        }
    ]
    task = hub_task("math500", test_path=write_jsonl(tmp_path / "test.jsonl", rows))
    (problem,) = task.test
    assert (problem.prompt_id, problem.question, problem.gold, task.verifier) == (
        "math500-test-0",
        "P",
        "\\frac{1}{2}",
        "math",
    )
    assert problem.metadata == {"level": 2, "subject": "Algebra", "unique_id": "test/algebra/1.json"}


def test_numbers_in_a_gold_column_keep_how_they_were_written_and_a_missing_one_is_named(tmp_path):
    # datasets reads a column of 5 and 0.5 as floats: the gold of the first is 5, as the file wrote it
    path = write_jsonl(tmp_path / "test.jsonl", [{"problem": "P1", "answer": 5}, {"problem": "P2", "answer": 0.5}])
    assert sorted(p.gold for p in hub_task("math500", test_path=path).test) == ["0.5", "5"]
    table = pa.table({"problem": ["P1", "P2"], "answer": [1.5, float("nan")]})  # NaN: pandas' missing value
    pq.write_table(table, tmp_path / "test.parquet")
    with pytest.raises(TaskError, match=r"test\.parquet: row 2 \(prompt id math500-test-1\): column 'answer' is empty"):
        hub_task("math500", test_path=str(tmp_path / "test.parquet"))


def test_gsm8k_gold_follows_the_hashes(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"question": "Q1", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"}])
    test = write_jsonl(tmp_path / "test.jsonl", [{"question": "Q2", "answer": "So 1,000 + 234\n#### 1,234"}])
    task = hub_task("gsm8k", train_path=train, test_path=test)
    assert [(p.prompt_id, p.gold) for p in task.train] == [("gsm8k-train-0", "7")]
    assert [(p.prompt_id, p.question, p.gold) for p in task.test] == [("gsm8k-test-0", "Q2", "1,234")]
    assert task.verifier == "numeric"


def test_theoremqa_leaves_out_questions_with_a_picture(tmp_path):
    rows = [
        {"Question": "Is 7 prime?", "Answer": "True", "Answer_type": "bool", "Picture": None},
        {
            "Question": "See the figure.",
            "Answer": "3",
            "Answer_type": "integer",
            "Picture": {"bytes": "abc", "path": "p.png"},
        },
        {"Question": "List the roots.", "Answer": "[1, 2]", "Answer_type": "list of integer", "Picture": None},
    ]
    task = hub_task("theoremqa", test_path=write_jsonl(tmp_path / "test.jsonl", rows))
    assert [(p.prompt_id, p.gold, p.metadata["answer_type"]) for p in task.test] == [
        ("theoremqa-test-0", "True", "bool"),
        ("theoremqa-test-2", "[1, 2]", "list of integer"),
    ]
    assert task.verifier == "math"


GPQA_COLUMNS = [
    "Record ID",
    "Question",
    "Correct Answer",
    "Incorrect Answer 1",
    "Incorrect Answer 2",
    "Incorrect Answer 3",
    "Subdomain",
    "High-level domain",
]


def write_gpqa_csv(path: Path, n: int, reverse: bool = False) -> str:
    rows = [
        [f"rec{i}", f"Question {i}?", f"right {i}", f"wrong {i}a", f"wrong {i}b", f"wrong {i}c", "Optics", "Physics"]
        for i in range(n)
    ]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(GPQA_COLUMNS)
        writer.writerows(reversed(rows) if reverse else rows)
    return str(path)


def test_gpqa_choices_are_shuffled_per_seed_and_the_gold_letter_points_at_the_right_answer(tmp_path):
    path = write_gpqa_csv(tmp_path / "gpqa_diamond.csv", 12)
    task = hub_task("gpqa_diamond", seed=3, test_path=path)
    assert task.verifier == "choice" and task.train == []
    assert sorted(p.prompt_id for p in task.test) == sorted(f"gpqa_diamond-test-rec{i}" for i in range(12))
    for i, problem in sorted((int(p.prompt_id.removeprefix("gpqa_diamond-test-rec")), p) for p in task.test):
        assert problem.question.startswith(f"Question {i}?\n\n")
        choices = choice_lines(problem.question)
        assert sorted(choices.values()) == sorted([f"right {i}", f"wrong {i}a", f"wrong {i}b", f"wrong {i}c"])
        assert choices[problem.gold] == f"right {i}"
        assert problem.metadata == {"domain": "Physics", "subdomain": "Optics"}
    golds = [p.gold for p in task.test]
    assert len(set(golds)) > 1  # the correct answer, first on the hub, does not stay first
    assert task.test == hub_task("gpqa_diamond", seed=3, test_path=path).test
    assert [p.question for p in task.test] == [
        p.question for p in hub_task("gpqa_diamond", seed=3, test_path=path).test
    ]
    reordered = {
        p.prompt_id: p.question
        for p in hub_task("gpqa_diamond", seed=3, test_path=write_gpqa_csv(tmp_path / "r.csv", 12, reverse=True)).test
    }
    assert all(reordered[p.prompt_id] == p.question for p in task.test)
    other_seed = hub_task("gpqa_diamond", seed=4, test_path=path).test
    assert [p.question for p in other_seed] != [p.question for p in task.test]


def test_mmlu_redux_maps_the_answer_index_to_a_letter_and_keeps_error_free_rows(tmp_path):
    rows = [
        {
            "question": "2+2?",
            "choices": ["3", "4", "5", "6"],
            "answer": 1,
            "error_type": "ok",
            "source": "s1",
            "correct_answer": None,
            "potential_reason": None,
        },
        {
            "question": "Bad?",
            "choices": ["a", "b", "c", "d"],
            "answer": 0,
            "error_type": "wrong_groundtruth",
            "source": "s2",
            "correct_answer": "B",
            "potential_reason": "r",
        },
        {
            "question": "Last?",
            "choices": ["w", "x", "y", "z"],
            "answer": 3,
            "error_type": "ok",
            "source": "s3",
            "correct_answer": None,
            "potential_reason": None,
        },
    ]
    task = hub_task("mmlu_redux", test_path=write_jsonl(tmp_path / "test.jsonl", rows))
    assert task.verifier == "choice"
    assert [(p.prompt_id, p.gold) for p in task.test] == [("mmlu_redux-test-0", "B"), ("mmlu_redux-test-2", "D")]
    assert choice_lines(task.test[0].question) == {"A": "3", "B": "4", "C": "5", "D": "6"}
    assert task.test[1].metadata == {"source": "s3"}


def test_a_local_json_file_may_hold_one_array(tmp_path):
    rows = [{"problem": "What is 1?", "answer": "1"}, {"problem": "What is 2?", "answer": "2"}]
    path = tmp_path / "test.json"
    path.write_text(json.dumps(rows, indent=2))
    assert sorted(p.gold for p in hub_task("math500", test_path=str(path)).test) == ["1", "2"]
    path.write_text(json.dumps([rows[0], {"problem": "What is 2?", "answer": ""}], indent=2))
    with pytest.raises(TaskError, match=r"test\.json: item 2 \(prompt id math500-test-1\): column 'answer' is empty"):
        hub_task("math500", test_path=str(path))
    path.write_text('[\n  {"problem": "a", "answer": "1"},\n  {"problem": \n]')
    with pytest.raises(TaskError, match=r"test\.json:4: not valid JSON \(a JSON array of objects\)"):
        hub_task("math500", test_path=str(path))
    path.write_text('[{"problem": "a", "answer": "1"}, ["b", "2"]]')
    with pytest.raises(TaskError, match=r"test\.json: item 2: expected a JSON object, found list"):
        hub_task("math500", test_path=str(path))


def test_local_golds_are_the_text_the_file_writes(tmp_path):
    golds = ["1.10", "007", "12345678901234567890123", "None", "NA"]
    path = tmp_path / "test.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["problem", "answer"])
        writer.writerows([f"What is {i}?", gold] for i, gold in enumerate(golds))
    assert sorted(p.gold for p in hub_task("math500", test_path=str(path)).test) == sorted(golds)
    path.write_text("problem,answer\nWhat is 1?,\n")  # an empty field is no gold
    with pytest.raises(TaskError, match=r"test\.csv: row 1 \(prompt id math500-test-0\): column 'answer' is empty"):
        hub_task("math500", test_path=str(path))
    # JSON integers stay exact beside a fractional number (a common column type would make them floats).
    jsonl = write_jsonl(tmp_path / "test.jsonl", [{"problem": "a", "answer": 9007199254740993}, {"problem": "b", "answer": 0.5}])
    assert sorted(p.gold for p in hub_task("math500", test_path=jsonl).test) == ["0.5", "9007199254740993"]


def test_theoremqa_from_csv_keeps_the_rows_whose_picture_field_is_empty(tmp_path):
    path = tmp_path / "test.csv"
    path.write_text("Question,Answer,Answer_type,Picture\nIs 7 prime?,True,bool,\nSee the figure.,3,integer,p.png\n")
    assert [(p.prompt_id, p.gold) for p in hub_task("theoremqa", test_path=str(path)).test] == [("theoremqa-test-0", "True")]


def test_a_csv_file_for_a_task_with_a_list_column_is_refused(tmp_path):
    path = tmp_path / "test.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["question", "choices", "answer", "error_type"])
        writer.writerow(["Q", '["1", "2", "3"]', 1, "ok"])
    with pytest.raises(TaskError, match=r"test\.csv.*row 1.*column 'choices' holds text .*not a list.*JSONL or Parquet"):
        hub_task("mmlu_redux", test_path=str(path))


def test_mmlu_redux_answer_out_of_range_is_an_error(tmp_path):
    rows = [{"question": "Q", "choices": ["a", "b"], "answer": 2, "error_type": "ok"}]
    with pytest.raises(TaskError, match=r"test\.jsonl:1 .*column 'answer' is 2; expected the index \(0 to 1\)"):
        hub_task("mmlu_redux", test_path=write_jsonl(tmp_path / "test.jsonl", rows))


def test_mmlu_pro_up_to_ten_letters(tmp_path):
    options = [f"option {i}" for i in range(10)]
    rows = [
        {
            "question_id": 70,
            "question": "Pick the last.",
            "options": options,
            "answer": "J",
            "answer_index": 9,
            "cot_content": "",
            "category": "math",
            "src": "ori",
        },
        {
            "question_id": 71,
            "question": "Pick the first.",
            "options": options[:4],
            "answer": "A",
            "answer_index": 0,
            "cot_content": "",
            "category": "law",
            "src": "stem",
        },
    ]
    task = hub_task("mmlu_pro", test_path=write_jsonl(tmp_path / "test.jsonl", rows))
    assert [(p.prompt_id, p.gold) for p in task.test] == [("mmlu_pro-test-70", "J"), ("mmlu_pro-test-71", "A")]
    assert choice_lines(task.test[0].question) == dict(zip(CHOICE_LETTERS, options))
    assert task.test[0].metadata == {"category": "math", "src": "ori"}
    rows[1]["answer"] = "E"
    with pytest.raises(
        TaskError, match=r"bad\.jsonl:2 \(prompt id mmlu_pro-test-71\): column 'answer' is 'E'; expected a letter A to D"
    ):
        hub_task("mmlu_pro", test_path=write_jsonl(tmp_path / "bad.jsonl", rows))
    rows[1]["answer"] = "AB"
    with pytest.raises(TaskError, match=r"column 'answer' is 'AB'; expected a letter A to D"):
        hub_task("mmlu_pro", test_path=write_jsonl(tmp_path / "bad2.jsonl", rows))
    rows[1].update(answer="A", question_id=70)
    with pytest.raises(TaskError, match=r"prompt id 'mmlu_pro-test-70' appears more than once \(\S*twice\.jsonl:1; \S*twice\.jsonl:2\)"):
        hub_task("mmlu_pro", test_path=write_jsonl(tmp_path / "twice.jsonl", rows))


# --------------------------------------------------------------------------------------------- errors


def test_missing_column_names_the_file_and_the_column(tmp_path):
    path = write_jsonl(tmp_path / "test.jsonl", [{"problem": "P", "answer": "1"}])
    with pytest.raises(TaskError, match=r"test\.jsonl: missing column\(s\) \['solution'\] for task 'math'"):
        hub_task("math", test_path=path)


def test_bad_local_files(tmp_path):
    with pytest.raises(TaskError, match=r"nope\.jsonl: no such file"):
        hub_task("gsm8k", test_path=str(tmp_path / "nope.jsonl"))
    with pytest.raises(TaskError, match=r"unknown file type '\.txt'"):
        hub_task("gsm8k", test_path=str(tmp_path / "data.txt"))
    (tmp_path / "split.jsonl").mkdir()
    with pytest.raises(TaskError, match=r"split\.jsonl: a directory; give one file per split, or a directory of Parquet files"):
        hub_task("gsm8k", test_path=str(tmp_path / "split.jsonl"))
    dataset = tmp_path / "test.parquet"  # one Parquet dataset, as Spark and Ray Data write it
    dataset.mkdir()
    pq.write_table(pa.table({"question": ["Q"], "answer": ["#### 3"]}), dataset / "part-0.parquet")
    assert [p.gold for p in hub_task("gsm8k", test_path=str(dataset)).test] == ["3"]
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "Q", "answer": "#### 1"}\n{"question": \n')
    with pytest.raises(TaskError, match=r"broken\.jsonl:2: not valid JSON \(one JSON object per line\)"):
        hub_task("gsm8k", test_path=str(broken))
    empty = tmp_path / "empty.jsonl"
    empty.touch()
    with pytest.raises(TaskError, match=r"empty\.jsonl: no rows \(task 'gsm8k' expects rows with the columns \['question', 'answer'\]\)"):
        hub_task("gsm8k", test_path=str(empty))
    for header_only, content in (("header.csv", "question,answer\n"), ("empty.csv", ""), ("array.json", "[]")):
        (tmp_path / header_only).write_text(content)
        with pytest.raises(TaskError, match=rf"{re.escape(header_only)}: no rows \(task 'gsm8k' expects"):
            hub_task("gsm8k", test_path=str(tmp_path / header_only))
    lacking = tmp_path / "lacking.jsonl"  # a line without a column the others have: that column is empty
    lacking.write_text('{"question": "Q", "answer": "#### 1"}\n{"question": "Q2"}\n')
    with pytest.raises(TaskError, match=r"lacking\.jsonl:2 \(prompt id gsm8k-test-1\): column 'answer' is empty"):
        hub_task("gsm8k", test_path=str(lacking))
    blank_lines = tmp_path / "blank_lines.jsonl"  # the line, counted as an editor does
    blank_lines.write_text('{"question": "Q", "answer": "#### 1"}\n\n\n{"question": "Q2", "answer": ""}\n')
    with pytest.raises(TaskError, match=r"blank_lines\.jsonl:4 \(prompt id gsm8k-test-1\): column 'answer' is empty"):
        hub_task("gsm8k", test_path=str(blank_lines))
    twice = tmp_path / "twice.jsonl"  # a reader that keeps the last would make the gold 4
    twice.write_text('{"problem": "p1", "answer": 1}\n{"problem": "p2", "answer": "3", "answer": "4"}\n')
    with pytest.raises(TaskError, match=r"twice\.jsonl:2: .*'answer'"):
        hub_task("math500", test_path=str(twice))
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"question": "Combien de caf\u00e9s ?", "answer": "#### 2"}\n'.encode("latin-1"))
    with pytest.raises(TaskError, match=r"latin1\.jsonl:1: not UTF-8 text"):
        hub_task("gsm8k", test_path=str(latin1))


def test_values_of_the_wrong_type_are_refused_not_written_as_python_would(tmp_path):
    def refused(name: str, row: dict, message: str) -> None:
        with pytest.raises(TaskError, match=message):
            hub_task(name, test_path=write_jsonl(tmp_path / "test.jsonl", [row]))

    refused("math500", {"problem": ["a", "b"], "answer": "1"}, r"test\.jsonl:1 .*column 'problem' holds \['a', 'b'\]; expected text or a number")
    refused("math500", {"problem": "P", "answer": {"x": 1}}, r"column 'answer' holds \{'x': 1\}; expected text or a number")
    refused("math500", {"problem": "P", "answer": True}, r"column 'answer' holds True; expected text or a number")
    redux = {"question": "Q", "choices": ["a", "b"], "answer": 1, "error_type": "ok"}
    refused("mmlu_redux", {**redux, "answer": True}, r"column 'answer' is True; expected the index \(0 to 1\)")
    refused("mmlu_redux", {**redux, "choices": {"a": 1, "b": 2}}, r"column 'choices' holds \{'a': 1, 'b': 2\}; expected a list of choices")
    refused("mmlu_redux", {**redux, "choices": ["a", None]}, r"column 'choices' holds None as choice 2; expected text or a number")
    refused("gsm8k", {"question": "Q", "answer": 42}, r"column 'answer' has no answer after '####' \(found '42'\)")
    refused("gpqa_diamond", dict(zip(GPQA_COLUMNS, [" ", "Q?", "yes", "no1", "no2", "no3", "G", "B"])), r"column 'Record ID' is empty")
    # Metadata that the rollouts could not write as JSON: refused as the task loads, not after Ray starts.
    dated = tmp_path / "dated.parquet"
    pq.write_table(pa.table({"problem": ["P"], "answer": ["1"], "level": pa.array([0], pa.timestamp("s"))}), dated)
    with pytest.raises(TaskError, match=r"dated\.parquet: row 1: 'level' holds datetime .*which problem metadata \(stored as JSON\) cannot hold"):
        hub_task("math500", test_path=str(dated))
    # Parquet text stored as binary: the text, not Python's b'...'.
    binary = tmp_path / "binary.parquet"
    values = ["recA", "Q?", "yes", "n1", "n2", "n3", "Genetics", "Biology"]
    as_binary = {column: pa.array([value.encode()], pa.binary()) for column, value in zip(GPQA_COLUMNS, values)}
    pq.write_table(pa.table(as_binary), binary)
    [problem] = hub_task("gpqa_diamond", test_path=str(binary)).test
    assert (problem.prompt_id, problem.metadata) == ("gpqa_diamond-test-recA", {"domain": "Biology", "subdomain": "Genetics"})
    assert set(choice_lines(problem.question).values()) == {"yes", "n1", "n2", "n3"}
    # TheoremQA's source JSON holds booleans and lists, which its hub copy writes as Python's text.
    rows = [{"Question": "Is 7 prime?", "Answer": True}, {"Question": "Roots?", "Answer": [1, 2]}]
    assert [p.gold for p in hub_task("theoremqa", test_path=write_jsonl(tmp_path / "theorem.jsonl", rows)).test] == ["True", "[1, 2]"]


def test_a_csv_row_of_one_field_more_than_the_header_is_refused_not_shifted(tmp_path):
    # pandas would take every row's first field as an index: question '1', gold 'x'.
    path = tmp_path / "test.csv"
    path.write_text("problem,answer\np,1,x\nq,2,y\n")
    with pytest.raises(TaskError, match=r"test\.csv: cannot read it as CSV: rows with more fields than the header"):
        hub_task("math500", test_path=str(path))


def test_offline_hub_error_says_which_dataset_and_how_to_supply_files(monkeypatch):
    with pytest.raises(TaskError) as info:
        hub_task("gsm8k")
    message = str(info.value)
    assert "cannot load openai/gsm8k (config 'main', split 'train') from the Hugging Face Hub" in message
    assert "HF_HUB_OFFLINE" not in message  # set already
    # Online, a Hub out of reach: a copy in the cache is read at once offline.
    import datasets

    with monkeypatch.context() as online:
        online.setattr(datasets.config, "HF_HUB_OFFLINE", False)
        online.setattr(datasets, "load_dataset", mock.Mock(side_effect=OSError("the Hub is out of reach")))
        with pytest.raises(TaskError, match=r"; a copy in the datasets cache is read without waiting on the network under HF_HUB_OFFLINE=1\.$"):
            hub_task("gsm8k")
    assert "task.train_path=FILE task.test_path=FILE" in message
    assert "['question', 'answer']" in message
    with pytest.raises(TaskError, match=r"Idavidrein/gpqa .*gated.* pass task\.test_path=FILE, "):
        hub_task("gpqa_diamond")
    # The evaluation's own task: each key its remedy names is under eval.task.
    with pytest.raises(TaskError) as info:
        load_task(TaskConfig(kind="hub", name="math500"), 0, key="eval.task")
    assert str(info.value).startswith("eval.task.name=math500: cannot load ")
    assert "pass eval.task.test_path=FILE, " in str(info.value) and " task.test_path" not in str(info.value)


def test_option_errors(tmp_path):
    with pytest.raises(TaskError, match=r"unknown hub dataset 'mathh'; known: .*math500"):
        hub_task("mathh")
    with pytest.raises(TaskError, match=r"task.options: unknown option\(s\) \['shuffle'\]"):
        hub_task("math", options={"shuffle": True})
    with pytest.raises(TaskError, match=r"^task.options.seed: expected an integer, found True$"):
        hub_task("math", options={"seed": True})
    with pytest.raises(TaskError, match=r"task.options.subsets: unknown subset\(s\) \['calculus'\]"):
        hub_task("math", options={"subsets": ["algebra", "calculus"]})
    for subsets in (5, [], ["algebra", 5], {"algebra": 1}):
        with pytest.raises(TaskError, match=r"task.options.subsets: expected a subset name or a list of them, found"):
            hub_task("math", options={"subsets": subsets})
    with pytest.raises(TaskError, match=r"task.options.subsets: openai/gsm8k has no subsets"):
        hub_task("gsm8k", options={"subsets": ["main"]})
    path = write_jsonl(tmp_path / "t.jsonl", [{"problem": "P", "solution": "\\boxed{1}"}])
    with pytest.raises(TaskError, match=r"task.options.subsets: selects hub configs"):
        hub_task("math", test_path=path, options={"subsets": ["algebra"]})


# ------------------------------------------------------------------------------------- the hub path


@pytest.fixture
def fake_hub(monkeypatch):
    """`datasets.load_dataset` answering from in-memory rows per (hub id, config, split); records calls."""
    import datasets

    tables: dict[tuple, list[dict]] = {}
    calls: list[tuple] = []

    def load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return datasets.Dataset.from_list(tables[(path, name, split)])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return tables, calls


def test_hub_subsets_are_read_one_config_each_and_named_in_ids(fake_hub):
    tables, calls = fake_hub
    for subject in ("algebra", "geometry"):
        for split in ("train", "test"):
            tables[("EleutherAI/hendrycks_math", subject, split)] = [
                {
                    "problem": f"{subject} {split} {i}",
                    "level": "Level 1",
                    "type": subject.title(),
                    "solution": f"\\boxed{{{i}}}",
                }
                for i in range(2)
            ]
    task = hub_task("math", options={"subsets": ["algebra", "geometry", "algebra"]})  # each read once
    assert sorted(calls) == sorted(
        ("EleutherAI/hendrycks_math", s, sp) for s in ("algebra", "geometry") for sp in ("train", "test")
    )
    assert sorted(p.prompt_id for p in task.test) == [
        "math-test-algebra-0",
        "math-test-algebra-1",
        "math-test-geometry-0",
        "math-test-geometry-1",
    ]
    geometry_1 = by_id(task.test)["math-test-geometry-1"]
    assert geometry_1.question == "geometry test 1" and geometry_1.gold == "1"
    assert geometry_1.metadata == {"level": "Level 1", "type": "Geometry", "subset": "geometry"}
    assert sorted(p.prompt_id for p in task.train) == [
        "math-train-algebra-0",
        "math-train-algebra-1",
        "math-train-geometry-0",
        "math-train-geometry-1",
    ]


def test_a_capped_test_split_samples_across_subjects_the_same_for_every_seed(fake_hub):
    tables, _ = fake_hub
    for subject in MATH_SUBJECTS:  # read one subject after another, as the hub has them
        for split in ("train", "test"):
            tables[("EleutherAI/hendrycks_math", subject, split)] = [
                {"problem": f"{subject} {split} {i}", "solution": f"\\boxed{{{i}}}"} for i in range(20)
            ]
    capped = hub_task("math", num_test=21).test
    subjects = [p.metadata["subset"] for p in capped]
    assert subjects.count("algebra") < 10 and len(set(subjects)) >= 5  # not algebra's 20 and one more
    assert capped == hub_task("math", seed=1, num_test=21).test
    assert capped == hub_task("math", seed=0).test[:21]


def test_hub_eval_only_sets_read_their_own_split_names(fake_hub):
    tables, calls = fake_hub
    row = dict(zip(GPQA_COLUMNS, ["recA", "Q?", "yes", "no1", "no2", "no3", "Genetics", "Biology"]))
    tables[("Idavidrein/gpqa", "gpqa_diamond", "train")] = [row]
    task = hub_task("gpqa_diamond")
    assert calls == [("Idavidrein/gpqa", "gpqa_diamond", "train")]
    assert task.train == [] and [p.prompt_id for p in task.test] == ["gpqa_diamond-test-recA"]


def test_the_evaluation_reads_the_test_split_alone_and_a_cache_without_a_split_is_one_line(fake_hub, monkeypatch):
    tables, calls = fake_hub
    tables[("openai/gsm8k", "main", "test")] = [{"question": "Q", "answer": "#### 1"}]
    task = load_task(TaskConfig(kind="hub", name="gsm8k"), 0, splits=("test",))
    assert calls == [("openai/gsm8k", "main", "test")] and len(task.test) == 1
    import datasets

    partial_cache = ValueError('Unknown split "train".\nShould be one of [\'test\'].')
    monkeypatch.setattr(datasets, "load_dataset", mock.Mock(side_effect=partial_cache))
    with pytest.raises(TaskError, match=(
        r"^task.name=gsm8k: cannot load openai/gsm8k \(config 'main', split 'train'\) from the Hugging Face Hub: "
        r"Unknown split \"train\"\. Should be one of \['test'\]\. Without network access"
    )):
        hub_task("gsm8k")


def test_the_readme_names_the_columns_each_hub_task_requires():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = {name: (splits, columns) for name, splits, columns in re.findall(
        r"^\| `(\w+)` \| ((?:train, )?(?:train|test)) \| (.*) \|$", readme, flags=re.MULTILINE
    )}
    assert sorted(rows) == sorted(HUB_DATASETS)
    for name, spec in HUB_DATASETS.items():
        splits, columns = rows[name]
        assert splits.split(", ") == list(spec.splits), name
        assert sorted(re.findall(r"\*\*`([^`]+)`\*\*", columns)) == sorted(spec.columns), name


def test_every_default_verifier_exists():
    from drift_ray.verifiers import get_verifier

    expected = {"metamathqa": "math", "math": "math", "math500": "math", "gsm8k": "numeric", "theoremqa": "math"}
    expected |= {"gpqa_diamond": "choice", "mmlu_redux": "choice", "mmlu_pro": "choice"}
    assert {name: spec.verifier for name, spec in HUB_DATASETS.items()} == expected
    for spec in HUB_DATASETS.values():
        assert get_verifier(spec.verifier).name == spec.verifier


# ------------------------------------------------------------------------------------------- jobs/eval


def test_eval_configs_cover_the_papers_benchmarks():
    assert sorted(p.stem for p in EVAL_DIR.glob("*.yaml")) == sorted(
        ["math", "math500", "theoremqa", "gpqa_diamond", "mmlu_redux", "mmlu_pro"]
    )


@pytest.mark.parametrize("path", sorted(EVAL_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_eval_config_is_valid_and_names_its_benchmark(path):
    cfg = load_config(path)
    assert (cfg.task.kind, cfg.task.name) == ("hub", path.stem)
    assert cfg.task.name in HUB_DATASETS and "test" in HUB_DATASETS[cfg.task.name].splits
    assert cfg.rollout.engine.value == "vllm" and cfg.rollout.gpus_per_actor >= 1
    assert cfg.episode.max_turns == 5
