"""Problems and where they come from: built-in offline tasks, local JSONL/Parquet files, plugins.

A task is a train split and a test split of problems (id, question, gold, metadata) plus the name of the
verifier that checks answers to them and the options it is built with.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Mapping, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import ValidationError, validate_call

from drift_ray import schema
from drift_ray.config import TaskConfig
from drift_ray.verifiers import Verifier, get_verifier, options_mismatch, require_known_verifier

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Problem:
    prompt_id: str
    question: str
    gold: str
    metadata: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def to_row(self) -> dict[str, str]:
        return {
            schema.PROMPT_ID: self.prompt_id,
            schema.QUESTION: self.question,
            schema.GOLD: self.gold,
            schema.METADATA: json.dumps(self.metadata, sort_keys=True),
        }

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "Problem":
        return cls(
            str(row[schema.PROMPT_ID]),
            str(row[schema.QUESTION]),
            str(row[schema.GOLD]),
            json.loads(row.get(schema.METADATA) or "{}"),
        )


@dataclass(frozen=True)
class Task:
    name: str
    train: list[Problem]
    test: list[Problem]
    verifier: str
    verifier_options: Mapping[str, Any] = field(default_factory=dict)

    def new_verifier(self) -> Verifier:
        return get_verifier(self.verifier, **self.verifier_options)


class TaskError(ValueError):
    """Problems could not be loaded; the message names the file, row or config key."""


TaskBuilder = Callable[..., Task]
_BUILTIN: dict[str, TaskBuilder] = {}


def builtin_task(name: str) -> Callable[[TaskBuilder], TaskBuilder]:
    """Register a builder `(seed, **options) -> Task` under `name` for `task.kind: builtin`."""

    def register(builder: TaskBuilder) -> TaskBuilder:
        _BUILTIN[name] = validate_call(builder)  # options are checked against the builder's annotations
        return builder

    return register


# "task." where it begins a config key, not inside a word or a file name (/data/task.jsonl).
_TASK_KEY = re.compile(rf"(?<![\w./-])task\.(?=(?:{'|'.join(TaskConfig.model_fields)})\b)")


def load_task(cfg: TaskConfig, seed: int, key: str = "task", splits: Collection[str] = ("train", "test")) -> Task:
    """The task the config names, truncated to task.num_train / task.num_test problems, with the problems of
    `splits` alone (the other split empty, neither warned of nor checked).

    Errors name the config keys under `key`, the config section `cfg` was read from (eval.task for a
    task of the evaluation's own).
    """
    try:
        task = _build_task(cfg, seed, splits)
        verifier = cfg.verifier or task.verifier
        # A task's own options for its own verifier, unless the config names them.
        verifier_options = dict(cfg.verifier_options if cfg.verifier else {**task.verifier_options, **cfg.verifier_options})
        # Named at load time: else the rollout actors would fail on them, after the model loaded.
        try:
            require_known_verifier(verifier)
        except ValueError as err:
            raise TaskError(f"task.verifier: {err}" if cfg.verifier else f"task.name: task {task.name!r} asks for an {err}") from None
        try:
            get_verifier(verifier, **verifier_options)  # its constructor checks the values
        except (TypeError, ValueError) as err:
            raise TaskError(f"{_verifier_options_source(cfg, task)}: {err}") from None
        if verifier == "reasoning_gym" and cfg.kind in ("file", "hub"):  # golds from data, not from code
            from drift_ray.gym_tasks import refuse_evaluated_golds

            refuse_evaluated_golds([*task.train, *task.test], "task.verifier")
    except TaskError as err:
        if key != "task":  # every key the message names, as its remedy may name others (task.test_path=FILE)
            raise TaskError(_TASK_KEY.sub(key + ".", str(err))) from None
        raise
    for name, asked, split in (("num_train", cfg.num_train, "train"), ("num_test", cfg.num_test, "test")):
        held = len(getattr(task, split))
        if split in splits and asked is not None and asked > held:
            log.warning(
                "%s.%s = %d, but task %r holds only %d such problems: all of them are used%s",
                key, name, asked, task.name, held,
                "" if cfg.kind in ("file", "hub") else f" (its builder's own options, {key}.options, may make more)",
            )
    train = task.train[: cfg.num_train] if "train" in splits else []
    test = task.test[: cfg.num_test] if "test" in splits else []
    kept = Task(task.name, train, test, verifier, verifier_options)
    if verifier in _GOLDS_CHECKED:
        _warn_of_unmet_golds(kept, key)
    return kept


# Verifiers that check in this process at no cost: each gold is checked against itself when the task loads.
# (The math and reasoning-gym verifiers run helper processes.)
_GOLDS_CHECKED = ("numeric", "choice")


def _warn_of_unmet_golds(task: Task, key: str) -> None:
    """Warn of golds that not even themselves meet under the task's verifier: every answer to them is scored
    wrong (a gold "eight" under numeric, "\\frac{1}{2}" under numeric rather than math)."""
    verifier = task.new_verifier()
    unmet = [
        (split, problem)
        for split, problems in (("train", task.train), ("test", task.test))
        for problem in problems
        if not verifier.check(problem.gold, problem.gold)
    ]
    if unmet:
        split, problem = unmet[0]
        log.warning(
            "task %r: %d of its %d golds are not met even by themselves under the %r verifier (e.g. the %s "
            "problem %r, gold %s), so every answer to them is scored wrong; %s.verifier may need to be another",
            task.name, len(unmet), len(task.train) + len(task.test), task.verifier, split, problem.prompt_id,
            schema.short_repr(problem.gold), key,
        )


def task_label(cfg: TaskConfig) -> str:
    """The task's name in messages and reports: task.name, but a file task left with the built-in task's name
    (task.name's default, or a config written for the demo with task.kind changed) is named by its training
    file, else its test file."""
    if cfg.kind == "file" and cfg.name == TaskConfig.model_fields["name"].default:
        return str(cfg.train_path or cfg.test_path)
    return cfg.name


def _verifier_options_source(cfg: TaskConfig, task: Task) -> str:
    """Who gave the verifier options that were refused: the config, or the task itself (a plugin's, which the
    user may not have written)."""
    own = {} if cfg.verifier else dict(task.verifier_options)
    if not own:
        return "task.verifier_options"
    if not cfg.verifier_options:
        return f"task.name: task {task.name!r} gives verifier_options {own}"
    return f"task.verifier_options, over task {task.name!r}'s own {own}"


def _build_task(cfg: TaskConfig, seed: int, splits: Collection[str]) -> Task:
    """The task `cfg` names; a hub task reads `splits` alone (a cache may hold only the split evaluated)."""
    if cfg.kind == "builtin":
        importlib.import_module("drift_ray.builtin_tasks")  # registers the built-in builders
        if cfg.name not in _BUILTIN:
            raise TaskError(f"task.name: unknown builtin task {cfg.name!r}; known: {', '.join(sorted(_BUILTIN))}")
        builder = _BUILTIN[cfg.name]
        try:
            return _call_builder(builder, seed, cfg.options)
        except ValidationError as err:
            if err.title != builder.__name__:  # raised inside the builder, not by validate_call on its options
                raise
            first = err.errors()[0]
            name = ".".join(str(part) for part in first["loc"])
            raise TaskError(f"task.options.{name}: {first['msg']} (found {first['input']!r})") from None
    if cfg.kind == "file":
        if not cfg.train_path and not cfg.test_path:
            raise TaskError("task.train_path / task.test_path: a file task needs at least one of them")
        return Task(
            task_label(cfg),
            read_problems(cfg.train_path, cfg.columns) if cfg.train_path else [],
            read_problems(cfg.test_path, cfg.columns) if cfg.test_path else [],
            cfg.verifier or "exact",
        )
    if cfg.kind == "plugin":
        builder = _load_plugin(cfg.name)
        try:
            task = _call_builder(builder, seed, cfg.options)
        except TaskError:  # its options, or problems it read with drift-ray's readers, which name the file and row
            raise
        except Exception as err:  # the user's code: said to be it, or the error would read as drift-ray's own
            raise TaskError(f"task.name: plugin {cfg.name!r} raised {_error_and_where(err)}") from err
        if not isinstance(task, Task):
            raise TaskError(f"task.name: plugin {cfg.name!r} returned {type(task).__name__}, expected drift_ray.prompts.Task")
        for split, problems in (("train", task.train), ("test", task.test)):
            for number, problem in enumerate(problems, 1):
                _require_problem(problem, f"task.name: plugin {cfg.name!r}, {split} split, problem {number}")
            require_unique_prompt_ids(problems, f"task.name: plugin {cfg.name!r}, {split} split")
            for problem in problems:
                where = f"task.name: plugin {cfg.name!r}, problem {problem.prompt_id!r}: metadata"
                require_json_metadata(problem.metadata, where)
        return task
    if cfg.kind == "hub":
        from drift_ray.hub_tasks import load_hub_task  # not at the top: hub_tasks builds on this module

        return load_hub_task(cfg, seed, splits)
    from drift_ray.gym_tasks import load_gym_task  # reasoning_gym; not at the top: gym_tasks builds on this module

    return load_gym_task(cfg, seed)


def _error_and_where(err: BaseException) -> str:
    return f"{type(err).__name__}: {err} (rerun with --traceback to see where)"


def _require_problem(problem: Any, where: str) -> None:
    """A plugin's problem as the stages read it: a Problem whose id, question and gold are non-empty text
    (rollouts write them as text, and the episodes format and verify them as such)."""
    if not isinstance(problem, Problem):
        raise TaskError(f"{where}: expected a drift_ray.prompts.Problem, found {type(problem).__name__}")
    for name in ("prompt_id", "question", "gold"):
        value = getattr(problem, name)
        if not isinstance(value, str) or not value.strip():
            raise TaskError(f"{where}: {name} is {schema.short_repr(value)}; expected non-empty text (a str)")


def _call_builder(builder: TaskBuilder, seed: int, options: dict[str, Any]) -> Task:
    """`builder(seed=seed, **options)`, an option it does not take named as a config key."""
    mismatch = options_mismatch(builder, options, seed=seed)
    if mismatch:
        raise TaskError(f"task.options: {mismatch}")
    return builder(seed=seed, **options)


def _load_plugin(spec: str) -> TaskBuilder:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise TaskError(f"task.name: plugin must be 'module:function', found {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        # The drift-ray command, unlike `python -m drift_ray`, does not import from the current directory.
        hint = (
            "; put the directory that holds it on PYTHONPATH (e.g. PYTHONPATH=. drift-ray …)"
            if isinstance(err, ModuleNotFoundError) and err.name == module_name.split(".")[0]
            else ""
        )
        raise TaskError(f"task.name: cannot import plugin module {module_name!r}: {err}{hint}") from err
    except Exception as err:  # raised by the module's own code as it ran
        raise TaskError(f"task.name: importing plugin module {module_name!r} raised {_error_and_where(err)}") from err
    builder = getattr(module, attr, None)
    if not callable(builder):
        raise TaskError(f"task.name: {module_name!r} has no callable {attr!r}")
    try:
        signature = inspect.signature(builder)
    except (TypeError, ValueError):  # none to read (a builtin): options_mismatch says so before the call
        return builder
    try:
        signature.bind_partial(seed=0)
    except TypeError:
        raise TaskError(
            f"task.name: {spec} takes no seed keyword; drift-ray calls it as {attr}(seed=<seed>, **task.options), "
            "with the run's seed to sample problems by: give it a seed parameter"
        ) from None
    return builder


PROBLEM_FILE_TYPES = (".jsonl", ".json", ".parquet")


_PANDAS_INDEX = re.compile(r"__index_level_\d+__")

# A .json problem file is JSON Lines too, not one JSON array: say so where a row does not read.
_JSON_LINES = "one JSON object per line"


def read_rows(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """The rows of a JSONL (.jsonl/.json), JSON array (.json) or Parquet file, each with where it is:
    "file:line", "file: item N" or "file: row N".

    JSONL rows stay as written: no common schema is forced on them, so a key that some rows lack and a
    value whose type varies between rows (a gold of 5 here, "1/2" there) come through."""
    path = Path(path)
    if not path.exists():
        raise TaskError(f"{path}: no such file")
    if path.is_dir() and path.suffix.lower() != ".parquet":  # NAME.parquet/part-*.parquet: one Parquet dataset
        raise TaskError(
            f"{path}: a directory; give one file of problems per split ({', '.join(PROBLEM_FILE_TYPES)}), or a "
            "directory of Parquet files named *.parquet"
        )
    if path.suffix.lower() not in PROBLEM_FILE_TYPES:
        raise TaskError(f"{path}: unknown file type {path.suffix!r}; expected one of {', '.join(PROBLEM_FILE_TYPES)}")
    if path.suffix.lower() == ".parquet":
        try:
            table = pq.read_table(path)
        except pa.ArrowException as err:
            raise TaskError(f"{path}: not a readable Parquet file: {err}") from err
        schema.require_utf8(table, str(path), TaskError)
        # pandas' row labels (an index other than 0..n-1, as after a filter), stored as columns: not the problems'.
        table = table.drop_columns([name for name in table.column_names if _PANDAS_INDEX.fullmatch(name)])
        for index, column in enumerate(table.schema):
            if pa.types.is_float32(column.type):
                # As a Python float, a float32 shows its binary rounding (0.1 is 0.10000000149011612); its
                # shortest decimal text is the number the file's writer meant.
                as_double = pc.cast(pc.cast(table.column(index), pa.string()), pa.float64())
                table = table.set_column(index, column.name, as_double)
        return [(f"{path}: row {row_no}", row) for row_no, row in enumerate(table.to_pylist(), 1)]
    if path.suffix.lower() == ".json" and _holds_an_array(path):
        return _read_json_array(path)
    rows = []
    with path.open("rb") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = _loads_json(line, path, line_no, _JSON_LINES)
            if not isinstance(row, dict):
                raise TaskError(f"{path}:{line_no}: expected a JSON object, found {type(row).__name__} ({_JSON_LINES})")
            rows.append((f"{path}:{line_no}", row))
    return rows


def _holds_an_array(path: Path) -> bool:
    with path.open("rb") as f:
        start = f.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()
    return start.startswith(b"[")


def _loads_json(data: bytes, path: Path, line_no: int | None, form: str) -> Any:
    """JSON text from `path` (its line `line_no`, or the whole file), or a TaskError naming where it fails."""
    where = f"{path}:{line_no}" if line_no is not None else str(path)
    try:
        return schema.loads_json(data)
    except json.JSONDecodeError as err:
        line = err.lineno if line_no is None else line_no
        # json's msg ends where it names the place ("Invalid control character at"), which it gives apart.
        problem = f"{err.msg.removesuffix(' at')} at column {err.colno}"
        raise TaskError(f"{path}:{line}: not valid JSON ({form}): {problem}") from None
    except schema.RepeatedKeyError as err:
        raise TaskError(f"{where}: {err}") from None
    except UnicodeDecodeError as err:
        raise TaskError(f"{where}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def _read_json_array(path: Path) -> list[tuple[str, dict[str, Any]]]:
    items = _loads_json(path.read_bytes(), path, None, "a JSON array of objects")
    rows = []
    for item_no, item in enumerate(items, 1):
        if not isinstance(item, dict):
            raise TaskError(f"{path}: item {item_no}: expected a JSON object, found {type(item).__name__}")
        rows.append((f"{path}: item {item_no}", item))
    return rows


def read_problems(path: str | Path, columns: dict[str, str] | None = None) -> list[Problem]:
    """Problems from a JSONL/Parquet file; `columns` maps our names (prompt_id, question, gold) to the file's.

    A row without an id gets the id '<file stem>-<row>' (its 1-based place among the rows). Metadata =
    every other column.
    """
    columns = dict(columns or {})
    unknown = set(columns) - {schema.PROMPT_ID, schema.QUESTION, schema.GOLD}
    if unknown:
        raise TaskError(f"task.columns: unknown key(s) {sorted(unknown)}; expected prompt_id, question, gold")
    rows = read_rows(path)
    if not rows:
        raise TaskError(f"{path}: no problems in the file")
    id_col = columns.get(schema.PROMPT_ID, schema.PROMPT_ID)
    question_col = columns.get(schema.QUESTION, schema.QUESTION)
    gold_col = columns.get(schema.GOLD, schema.GOLD)
    found = list(dict.fromkeys(key for _, row in rows for key in row))
    # A prompt_id column is optional, but one that task.columns names must be there: else a typo in it
    # would give every row a made-up id.
    required = [question_col, gold_col] + ([id_col] if schema.PROMPT_ID in columns else [])
    missing = [c for c in required if c not in found]
    if missing:
        raise TaskError(
            f"{path}: missing column(s) {missing}; found {found}. "
            "Map your columns with task.columns, e.g. {question: problem, gold: answer} (one mapping for both "
            "splits' files: give them the same columns)."
        )
    problems, places, made_up = [], [], 0
    used = {id_col, question_col, gold_col}
    for row_no, (where, row) in enumerate(rows, 1):
        for col in (id_col, question_col, gold_col):
            if col in row:
                try:
                    row[col] = decoded_text(row[col], col)
                except ValueError as err:
                    raise TaskError(f"{where}: {err}") from None
        for col in (question_col, gold_col):
            if row.get(col) is None or str(row[col]).strip() == "":
                raise TaskError(f"{where}: column {col!r} is missing or empty")
            if isinstance(row[col], (list, dict)):
                raise TaskError(f"{where}: column {col!r} holds a {type(row[col]).__name__}; expected text or a number")
            if isinstance(row[col], float) and not math.isfinite(row[col]):  # NaN: a missing value in pandas' files
                raise TaskError(f"{where}: column {col!r} holds {row[col]}; expected text or a finite number")
        prompt_id = row.get(id_col)
        if prompt_id is not None and (
            isinstance(prompt_id, (list, dict))
            or str(prompt_id).strip() == ""
            or (isinstance(prompt_id, float) and not math.isfinite(prompt_id))
        ):
            raise TaskError(f"{where}: column {id_col!r} holds {prompt_id!r}; expected a non-empty text or number")
        metadata = {k: v for k, v in row.items() if k not in used}
        require_json_metadata(metadata, where)
        if prompt_id is None:
            prompt_id = f"{Path(path).stem}-{row_no}"
            made_up += 1
            places.append(f"{where} has no {id_col!r}: the id is made up for it")
        else:
            places.append(f"{where} gives {id_col!r} {prompt_id!r}")
        problems.append(Problem(as_text(prompt_id), str(row[question_col]), as_text(row[gold_col]), metadata))
    require_unique_prompt_ids(problems, str(path), places)
    if 0 < made_up < len(problems):  # ids on some rows only: nulls where the ids were meant to be, as a rule
        log.warning(
            "%s: %d of its %d rows have no %r: their ids are made up ('%s-ROW'); give every row its id, or none",
            path, made_up, len(problems), id_col, Path(path).stem,
        )
    return problems


def decoded_text(value: Any, column: str) -> Any:
    """A Parquet binary value of `column` as its text, not Python's b'...' of it (ValueError where it is not
    UTF-8); any other value as it is."""
    if not isinstance(value, bytes):
        return value
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"column {column!r} holds bytes that are not UTF-8 text ({err.reason} at byte {err.start}); "
            "expected text or a number"
        ) from None


def shared_questions(train: Sequence[Problem], test: Sequence[Problem]) -> int:
    """How many test problems ask a question that a training problem asks too (whitespace aside)."""
    trained = {" ".join(p.question.split()) for p in train}
    return sum(" ".join(p.question.split()) in trained for p in test)


def require_unique_prompt_ids(problems: Sequence[Problem], where: str, places: Sequence[str] = ()) -> None:
    """Refuse a split that holds a prompt id twice: rollouts, weights and evaluation key on it, so two
    problems under one id would be weighted as one prompt's group and refused on a rerun. `places`: where
    each problem comes from (its file's line), named in the error."""
    seen: dict[str, int] = {}
    for index, problem in enumerate(problems):
        first = seen.setdefault(problem.prompt_id, index)
        if first != index:
            both = f" ({places[first]}; {places[index]})" if places else ""
            raise TaskError(f"{where}: prompt id {problem.prompt_id!r} appears more than once{both}; ids must be unique")


def require_json_metadata(metadata: dict[str, Any], where: str) -> None:
    """Metadata travels with the rollouts as JSON (Problem.to_row): what JSON cannot hold is refused when the
    problem is read, not when the rollouts are written."""
    try:
        json.dumps(metadata, sort_keys=True)
    except (TypeError, ValueError):
        for key, value in metadata.items():
            try:
                json.dumps(value, sort_keys=True)
            except (TypeError, ValueError):
                raise TaskError(
                    f"{where}: {key!r} holds {type(value).__name__} {schema.short_repr(value)}, which problem metadata "
                    "(stored as JSON) cannot hold; drop it or convert it to text, numbers, lists or string-keyed mappings"
                ) from None
        raise TaskError(f"{where}: metadata keys {schema.short_repr(list(metadata))} cannot all be JSON keys: make them text") from None


def as_text(value: Any) -> str:
    """A gold or an id as text. A whole number that a float column holds (100000.0: pandas stores integers
    with gaps as floats) is written as the integer it is: the numeric verifier asks for such a gold exactly,
    and the id is the file's."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:  # beyond, floats skip integers
        return str(int(value))
    return str(value)


def problems_table(problems: list[Problem]) -> pa.Table:
    return pa.Table.from_pylist([p.to_row() for p in problems])
