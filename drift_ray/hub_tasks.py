"""Benchmarks and training sets read through Hugging Face `datasets` (`task.kind: hub`).

`task.name` picks an entry of HUB_DATASETS: where the benchmark lives on the hub, which of its splits
are our train/test splits, the columns every row needs, one function that turns a row into a problem,
and the benchmark's default verifier. With `task.train_path` / `task.test_path` the same conversion
reads local JSONL, CSV or Parquet files in the hub's column layout (not CSV where a column is a list:
MMLU's choices) and the hub is not contacted at all (splits without a file are empty); without them
each split is read with `datasets.load_dataset`, from its cache when offline.

task.options:
- seed: the seed of the choice order (gpqa_diamond) and of the train split's order (default: the run's
  seed). The train split is shuffled so that `task.num_train` takes a random sample (MetaMathQA is sorted
  by type). The test split is shuffled too, the same way for every seed, so that `task.num_test` takes
  one random sample across subjects (math and mmlu_redux read theirs one subject after another), the
  same one for every run.
- subsets: the hub configs to read where a benchmark has several (math: its 7 subjects; mmlu_redux: its
  57 subjects). Default: all.

Prompt ids: `<name>-<split>-[<subset>-]<the row's hub id, else its index>`.

Choices on the benchmarks:
- metamathqa keeps the MATH_* rows (the paper trains on those); the gold follows "The answer is:".
- math: the gold is the last \\boxed{...} (or \\fbox{...}) of the solution, braces matched.
- theoremqa is checked with `math`, not `numeric`: a third of its answers are not numbers (True/False,
  lists such as [1, 2], options such as (b)). Questions that come with a picture are left out (the
  model sees text only).
- Multiple choice (gpqa_diamond, mmlu_redux, mmlu_pro) renders "A) ..." lines under the question and asks
  for the letter; the gold is the letter and the `choice` verifier reads the letter of an answer (A–J,
  so at most 10 choices). gpqa_diamond lists the correct answer first on the hub: its choices are
  shuffled with a generator seeded by (seed, question), so the order does not depend on row order.
- mmlu_redux keeps the rows its annotators marked error_type "ok" (the rest have a wrong or missing
  gold answer, several right answers or an unclear question).
"""

from __future__ import annotations

import logging
import math
import random
import string
import warnings
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from drift_ray import schema
from drift_ray.config import TaskConfig
from drift_ray.prompts import (
    Problem,
    Task,
    TaskError,
    as_text,
    decoded_text,
    read_rows,
    require_json_metadata,
    require_unique_prompt_ids,
)

log = logging.getLogger(__name__)

# What a row becomes: question, gold, metadata; None leaves the row out.
Converted = tuple[str, str, dict[str, Any]]
RowConverter = Callable[[dict[str, Any], int], "Converted | None"]

CHOICE_LETTERS = string.ascii_uppercase[:10]  # what the choice verifier reads: A–J
CHOICE_INSTRUCTION = "Answer with the letter of the correct choice."
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass(frozen=True)
class HubDataset:
    """How one benchmark is read: where it lives on the hub and how a row becomes a problem."""

    hub_id: str
    splits: dict[str, str]  # our split (train, test) → the hub's split name
    columns: tuple[str, ...]  # every row needs these
    convert: RowConverter
    verifier: str
    configs: tuple[str | None, ...] = (None,)  # hub configs; more than one are subsets, read and joined
    id_column: str | None = None  # the row's own id, used in prompt ids instead of its index
    access_note: str = ""  # added to the error when the hub cannot be read

    @property
    def has_subsets(self) -> bool:
        return len(self.configs) > 1


def render_choices(question: str, choices: Sequence[str]) -> str:
    """The question with one "A) choice" line per choice, and the request to answer with a letter."""
    if not 2 <= len(choices) <= len(CHOICE_LETTERS):
        raise ValueError(f"has {len(choices)} choices; expected 2 to {len(CHOICE_LETTERS)}")
    lines = [f"{letter}) {str(choice).strip()}" for letter, choice in zip(CHOICE_LETTERS, choices)]
    return f"{question}\n\n" + "\n".join(lines) + f"\n\n{CHOICE_INSTRUCTION}"


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} or \\fbox{...} of `text` (nested braces matched), or None.

    Also reads the brace-less form "\\boxed 5". Written here because math-verify's helper for this
    (latex2sympy2_extended) joins neighbouring boxes with commas and returns the whole text when there
    is no box, and a MATH gold is exactly the last box.
    """
    start, command = max((text.rfind(command), command) for command in ("\\boxed", "\\fbox"))
    if start < 0:
        return None
    rest = text[start + len(command) :]
    if rest.lstrip().startswith("{"):  # "\boxed {5}" is "\boxed{5}" to LaTeX
        rest = rest.lstrip()
    if not rest.startswith("{"):
        bare = rest.strip().split("$")[0].split()  # "\boxed 5$" → "5"
        return bare[0] if rest[:1].isspace() and bare else None
    depth = 0
    for i, char in enumerate(rest):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth == 0:
            return rest[1:i].strip() or None
    return None


def _text(row: dict[str, Any], column: str, python_text: bool = False) -> str:
    """The text of a row's value. `python_text`: a boolean or list is written as Python writes it (the hub's
    TheoremQA holds True and [1, 2] so, which a copy from its source JSON holds as JSON), not refused."""
    value = decoded_text(row[column], column)
    if isinstance(value, dict) or (isinstance(value, (bool, list)) and not python_text):
        # Else written as Python's "True", "['a', 'b']", "{'x': 1}".
        raise ValueError(f"column {column!r} holds {schema.short_repr(value)}; expected text or a number")
    if value is None or (isinstance(value, float) and math.isnan(value)) or not str(value).strip():
        raise ValueError(f"column {column!r} is empty")
    return as_text(value).strip()  # a column of numbers some of them fractional holds 5 as 5.0


def _present(**fields: Any) -> dict[str, Any]:
    """The metadata given, binary Parquet text as text."""
    return {key: decoded_text(value, key) for key, value in fields.items() if value is not None}


def _after(text: str, marker: str, column: str) -> str:
    _, found, answer = text.rpartition(marker)
    if not found or not answer.strip():
        raise ValueError(f"column {column!r} has no answer after {marker!r} (found {schema.short_repr(text)})")
    return answer.strip()


def _metamathqa(row: dict[str, Any], seed: int) -> Converted | None:
    if not str(row["type"]).startswith("MATH_"):
        return None
    return _text(row, "query"), _after(_text(row, "response"), "The answer is:", "response"), {"type": row["type"]}


def _math(row: dict[str, Any], seed: int) -> Converted:
    gold = last_boxed(_text(row, "solution"))
    if gold is None:
        raise ValueError("column 'solution' has no \\boxed{...} answer")
    return _text(row, "problem"), gold, _present(level=row.get("level"), type=row.get("type"))


def _math500(row: dict[str, Any], seed: int) -> Converted:
    metadata = _present(level=row.get("level"), subject=row.get("subject"), unique_id=row.get("unique_id"))
    return _text(row, "problem"), _text(row, "answer"), metadata


def _gsm8k(row: dict[str, Any], seed: int) -> Converted:
    return _text(row, "question"), _after(_text(row, "answer"), "####", "answer"), {}


def _theoremqa(row: dict[str, Any], seed: int) -> Converted | None:
    if row.get("Picture") not in (None, ""):  # a CSV file writes no picture as an empty field
        return None
    return _text(row, "Question"), _text(row, "Answer", python_text=True), _present(answer_type=row.get("Answer_type"))


def _gpqa(row: dict[str, Any], seed: int) -> Converted:
    question = _text(row, "Question")
    correct = _text(row, "Correct Answer")
    answers = [correct] + [_text(row, f"Incorrect Answer {i}") for i in (1, 2, 3)]
    # Seeded by the question, not the row's position: truncation or reordering keeps every order. The
    # positions are shuffled, not the texts: a wrong answer may read like the correct one.
    order = list(range(len(answers)))
    random.Random(f"gpqa-{seed}-{question}").shuffle(order)
    choices = [answers[i] for i in order]
    gold = CHOICE_LETTERS[order.index(0)]
    metadata = _present(domain=row.get("High-level domain"), subdomain=row.get("Subdomain"))
    return render_choices(question, choices), gold, metadata


def _mmlu_redux(row: dict[str, Any], seed: int) -> Converted | None:
    if row.get("error_type") not in (None, "ok"):
        return None
    choices = _list_column(row, "choices")
    answer = row["answer"]
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):  # true is no index
        raise ValueError(f"column 'answer' is {answer!r}; expected the index (0 to {len(choices) - 1}) of a choice")
    return render_choices(_text(row, "question"), choices), CHOICE_LETTERS[answer], _present(source=row.get("source"))


def _mmlu_pro(row: dict[str, Any], seed: int) -> Converted:
    options = _list_column(row, "options")
    answer = _text(row, "answer")
    if answer not in list(CHOICE_LETTERS[: len(options)]):
        raise ValueError(f"column 'answer' is {answer!r}; expected a letter A to {CHOICE_LETTERS[len(options) - 1]}")
    metadata = _present(category=row.get("category"), src=row.get("src"))
    return render_choices(_text(row, "question"), options), answer, metadata


def _list_column(row: dict[str, Any], column: str) -> list[str]:
    """The choices a row lists, each as text."""
    value = row[column]
    if isinstance(value, str):
        raise ValueError(
            f"column {column!r} holds text ({value[:60]!r}), not a list (a CSV file cannot hold one); give this "
            "task's local files as JSONL or Parquet"
        )
    if not isinstance(value, (list, tuple)):  # a mapping would list its keys
        raise ValueError(f"column {column!r} holds {schema.short_repr(value)}; expected a list of choices")
    for i, choice in enumerate(value):
        if choice is None or isinstance(choice, (bool, list, dict)):  # else "None", "True", "['a']" as a choice
            raise ValueError(f"column {column!r} holds {schema.short_repr(choice)} as choice {i + 1}; expected text or a number")
    return [as_text(decoded_text(choice, column)) for choice in value]


MATH_SUBJECTS = (
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
)
MMLU_SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology",
    "college_chemistry", "college_computer_science", "college_mathematics", "college_medicine", "college_physics",
    "computer_security", "conceptual_physics", "econometrics", "electrical_engineering", "elementary_mathematics",
    "formal_logic", "global_facts", "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_european_history", "high_school_geography", "high_school_government_and_politics",
    "high_school_macroeconomics", "high_school_mathematics", "high_school_microeconomics", "high_school_physics",
    "high_school_psychology", "high_school_statistics", "high_school_us_history", "high_school_world_history",
    "human_aging", "human_sexuality", "international_law", "jurisprudence", "logical_fallacies", "machine_learning",
    "management", "marketing", "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition",
    "philosophy", "prehistory", "professional_accounting", "professional_law", "professional_medicine",
    "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy", "virology",
    "world_religions",
)  # fmt: skip

HUB_DATASETS: dict[str, HubDataset] = {
    "metamathqa": HubDataset(
        "meta-math/MetaMathQA", {"train": "train"}, ("query", "response", "type"), _metamathqa, "math"
    ),
    "math": HubDataset(
        "EleutherAI/hendrycks_math",
        {"train": "train", "test": "test"},
        ("problem", "solution"),
        _math,
        "math",
        configs=MATH_SUBJECTS,
    ),
    "math500": HubDataset("HuggingFaceH4/MATH-500", {"test": "test"}, ("problem", "answer"), _math500, "math"),
    "gsm8k": HubDataset(
        "openai/gsm8k", {"train": "train", "test": "test"}, ("question", "answer"), _gsm8k, "numeric", configs=("main",)
    ),
    "theoremqa": HubDataset("TIGER-Lab/TheoremQA", {"test": "test"}, ("Question", "Answer"), _theoremqa, "math"),
    "gpqa_diamond": HubDataset(
        "Idavidrein/gpqa",
        {"test": "train"},  # the hub has one split, named train
        ("Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3"),
        _gpqa,
        "choice",
        configs=("gpqa_diamond",),
        id_column="Record ID",
        access_note="Idavidrein/gpqa is gated: accept its terms on its hub page, then log in (`hf auth login`) "
        "or set HF_TOKEN.",
    ),
    "mmlu_redux": HubDataset(
        "edinburgh-dawg/mmlu-redux-2.0",
        {"test": "test"},
        ("question", "choices", "answer"),
        _mmlu_redux,
        "choice",
        configs=MMLU_SUBJECTS,
    ),
    "mmlu_pro": HubDataset(
        "TIGER-Lab/MMLU-Pro",
        {"test": "test"},
        ("question", "options", "answer"),
        _mmlu_pro,
        "choice",
        id_column="question_id",
    ),
}


@dataclass(frozen=True)
class _Part:
    """Rows of one file, or of one hub config and split, each with where it is ("file:line", "source: row N")."""

    source: str  # for errors: a file path or "hub_id (config, split)"
    subset: str | None
    columns: list[str]
    rows: Iterable[tuple[str, dict[str, Any]]]


def load_hub_task(cfg: TaskConfig, seed: int, splits: Collection[str] = ("train", "test")) -> Task:
    """The benchmark `cfg.name` from local files (task.train_path / task.test_path) or the hub, which is read
    for `splits` alone."""
    spec = HUB_DATASETS.get(cfg.name)
    if spec is None:
        raise TaskError(f"task.name: unknown hub dataset {cfg.name!r}; known: {', '.join(sorted(HUB_DATASETS))}")
    options = dict(cfg.options)
    seed = options.pop("seed", seed)
    subsets = options.pop("subsets", None)
    if options:
        raise TaskError(f"task.options: unknown option(s) {sorted(options)} for task.kind=hub; accepted options: seed, subsets")
    if isinstance(seed, bool) or not isinstance(seed, int):  # Python would read true as 1
        raise TaskError(f"task.options.seed: expected an integer, found {seed!r}")
    local = {"train": cfg.train_path, "test": cfg.test_path}
    if any(local.values()):
        if subsets is not None:
            raise TaskError(
                "task.options.subsets: selects hub configs; with task.train_path / task.test_path "
                "every row of the files is used"
            )
        parts = {split: [_read_file(path, cfg.name, spec)] for split, path in local.items() if path}
    else:
        configs = _chosen_configs(spec, subsets)
        parts = {
            split: [_read_hub(cfg.name, spec, config, hub_split) for config in configs]
            for split, hub_split in spec.splits.items()
            if split in splits
        }
    train = _problems(cfg.name, "train", spec, parts.get("train", []), seed)
    random.Random(f"{cfg.name}-train-{seed}").shuffle(train)
    test = _problems(cfg.name, "test", spec, parts.get("test", []), seed)
    random.Random(f"{cfg.name}-test").shuffle(test)
    return Task(cfg.name, train, test, spec.verifier)


def _chosen_configs(spec: HubDataset, subsets: Any) -> tuple[str | None, ...]:
    if subsets is None:
        return spec.configs
    if not spec.has_subsets:
        raise TaskError(f"task.options.subsets: {spec.hub_id} has no subsets to choose from")
    chosen = [subsets] if isinstance(subsets, str) else subsets
    if not isinstance(chosen, list) or not chosen or not all(isinstance(s, str) for s in chosen):
        raise TaskError(
            f"task.options.subsets: expected a subset name or a list of them, found {schema.short_repr(subsets)}; "
            f"subsets of {spec.hub_id}: {', '.join(spec.configs)}"
        )
    unknown = [s for s in chosen if s not in spec.configs]
    if unknown:
        raise TaskError(
            f"task.options.subsets: unknown subset(s) {unknown}; expected some of {', '.join(spec.configs)}"
        )
    return tuple(dict.fromkeys(chosen))  # a subset named twice is read once


def _read_file(path: str, name: str, spec: HubDataset) -> _Part:
    """The rows of a local copy, their values as the file writes them: JSONL and Parquet through
    read_rows (line numbers, keys written twice refused, integers exact), CSV as text."""
    file = Path(path)
    builder = LOCAL_FORMATS.get(file.suffix.lower())
    if builder is None:
        raise TaskError(f"{path}: unknown file type {file.suffix!r}; expected one of {', '.join(LOCAL_FORMATS)}")
    if not file.exists():
        raise TaskError(f"{path}: no such file (task {name!r} expects columns {list(spec.columns)})")
    if file.is_dir() and builder != "parquet":  # NAME.parquet/part-*.parquet is one Parquet dataset
        raise TaskError(f"{path}: a directory; give one file per split, or a directory of Parquet files named *.parquet")
    if file.is_file() and not file.stat().st_size:
        rows = []  # pandas would fail on it with "No columns to parse"
    else:
        rows = _read_csv(file) if builder == "csv" else read_rows(file)
    if not rows:
        raise TaskError(f"{path}: no rows (task {name!r} expects rows with the columns {list(spec.columns)})")
    columns = list(dict.fromkeys(key for _, row in rows for key in row))
    # Every row with every column: a JSON line that lacks one has it empty, as a CSV or Parquet row would.
    return _Part(path, None, columns, [(where, {c: row.get(c) for c in columns}) for where, row in rows])


def _read_csv(file: Path) -> list[tuple[str, dict[str, Any]]]:
    import pandas as pd  # heavy: only when a CSV file is read

    try:
        # Every field as text, and none read as missing but empty ones: pandas would make the gold 1.10
        # the float 1.1, 007 the integer 7, and the answer "None" or "NA" a missing value.
        # index_col=False: else rows of one field more than the header take their first field as an index,
        # and every column shifts left without a word; with it, pandas drops their last field, with a warning.
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)
            frame = pd.read_csv(file, dtype=str, keep_default_na=False, encoding="utf-8-sig", index_col=False)
    except UnicodeDecodeError as err:
        raise TaskError(f"{file}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except pd.errors.ParserWarning:
        raise TaskError(
            f"{file}: cannot read it as CSV: rows with more fields than the header (quote a field that holds a comma)"
        ) from None
    except (ValueError, pd.errors.ParserError) as err:
        raise TaskError(f"{file}: cannot read it as CSV: {err}") from None
    return [(f"{file}: row {row_no}", row) for row_no, row in enumerate(frame.to_dict("records"), 1)]


def _read_hub(name: str, spec: HubDataset, config: str | None, split: str) -> _Part:
    import datasets  # heavy: only when a hub task is loaded

    source = f"{spec.hub_id} (config {config!r}, split {split!r})"
    try:
        dataset = datasets.load_dataset(spec.hub_id, config, split=split)
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as err:  # ValueError: a cache without the split
        files = " ".join(f"task.{s}_path=FILE" for s in spec.splits)
        joined = " (all subsets in one file)" if spec.has_subsets else ""
        problem = " ".join(str(err).split()).rstrip(".")  # on one line
        raise TaskError(
            f"task.name={name}: cannot load {source} from the Hugging Face Hub: {problem}. "
            + (f"{spec.access_note} " if spec.access_note else "")
            + f"Without network access, save the dataset elsewhere as JSONL, CSV or Parquet and pass {files}{joined}, "
            f"with the hub's columns {list(spec.columns)}"
            + (
                "." if datasets.config.HF_HUB_OFFLINE
                else "; a copy in the datasets cache is read without waiting on the network under HF_HUB_OFFLINE=1."
            )
        ) from err
    rows = ((f"{source}: row {row_no}", row) for row_no, row in enumerate(dataset, 1))
    return _Part(source, config if spec.has_subsets else None, dataset.column_names, rows)


def _problems(name: str, split: str, spec: HubDataset, parts: list[_Part], seed: int) -> list[Problem]:
    problems, places = [], []
    for part in parts:
        missing = [c for c in spec.columns if c not in part.columns]
        if missing:
            raise TaskError(
                f"{part.source}: missing column(s) {missing} for task {name!r}; found {part.columns}; "
                f"expected the hub layout of {spec.hub_id}: {list(spec.columns)}"
            )
        prefix = f"{name}-{split}-" + (f"{part.subset}-" if part.subset else "")
        for index, (where, row) in enumerate(part.rows):
            row_id = row.get(spec.id_column) if spec.id_column else None
            try:
                row_id = decoded_text(row_id, spec.id_column)
            except ValueError as err:
                raise TaskError(f"{where}: {err}") from None
            if row_id is not None and not str(row_id).strip():
                raise TaskError(f"{where}: column {spec.id_column!r} is empty; give every row its id, or drop the column")
            prompt_id = prefix + str(index if row_id is None else row_id)
            try:
                converted = spec.convert(row, seed)
            except ValueError as err:
                raise TaskError(f"{where} (prompt id {prompt_id}): {err}") from None
            if converted is None:
                continue
            question, gold, metadata = converted
            if part.subset:
                metadata = {**metadata, "subset": part.subset}
            require_json_metadata(metadata, where)
            problems.append(Problem(prompt_id, question, gold, metadata))
            places.append(where)
    require_unique_prompt_ids(problems, f"task {name!r}, {split} split", places)
    if parts and not problems:
        log.warning("task %r: the %s split has no problems (every row was left out)", name, split)
    return problems
