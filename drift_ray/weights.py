"""The map stage: the return of every trajectory and its importance weight within its prompt's group.

    R   = Σ_t γ^(t-1)·r_t  +  format penalty  −  λ·(1 − n_unique / n_answers)
    w_i = K·softmax(R/β)_i over the K trajectories of one prompt (mode drift), in log space

A pure, vectorised core on Arrow and NumPy (`compute_weights` on one table holding whole prompt groups),
a file entry (`weights_file`) and a thin Ray Data wrapper (`add_weights`) that imports Ray when called.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from drift_ray import schema
from drift_ray.config import WeightMode, WeightsConfig
from drift_ray.trajectories import read_trajectories, write_json_atomic, write_table_atomic

if TYPE_CHECKING:
    import ray.data


def trajectory_returns(
    table: pa.Table, gamma: float, rep_lambda: float, format_penalty: float | None = None
) -> npt.NDArray[np.float64]:
    """R of every row. `format_penalty` None: each row's FORMAT_PENALTY total; else this value per True
    in its FORMAT_FAILURES. Answers that are null or blank do not count for the repetition ratio."""
    n = table.num_rows
    rows, rewards, turn_index = _flatten_turns(table.column(schema.TURN_REWARDS))
    discounts = gamma ** np.arange(turn_index.max(initial=-1) + 1, dtype=np.float64)  # a lookup, not a power per turn
    discounted = rewards.to_numpy() * discounts[turn_index]  # null rewards become NaN and are refused below
    returns = np.bincount(rows, weights=discounted, minlength=n).astype(np.float64)  # int64 when n = 0

    if format_penalty is None:
        returns += table.column(schema.FORMAT_PENALTY).to_numpy().astype(np.float64)
    else:
        returns += format_penalty * _count_format_failures(table, format_penalty)
    returns -= rep_lambda * (1.0 - _unique_answer_ratio(table.column(schema.ANSWER_NORMS)))

    # The Ray Data path reads shards directly, not through read_trajectories' checks, and its rows are
    # numbered within a block: name the trajectory where the table says which.
    no_turns = np.flatnonzero(np.bincount(rows, minlength=n) == 0)
    bad = np.flatnonzero(~np.isfinite(returns))
    for rows_found, problem in ((no_turns, "has no turns"), (bad, "has a return of {}")):
        if rows_found.size:
            row = int(rows_found[0])
            if schema.TRAJECTORY_ID in table.column_names:
                which = f"trajectory {table.column(schema.TRAJECTORY_ID)[row].as_py()!r}"
            else:
                which = f"row {row + 1} (prompt {table.column(schema.PROMPT_ID)[row].as_py()!r})"
            raise ValueError(
                f"{which} {problem.format(returns[row])}; expected a finite reward for each turn in "
                f"{schema.TURN_REWARDS!r}, at least one, and a finite {schema.FORMAT_PENALTY!r}"
            )
    return returns


def group_weights(returns: npt.ArrayLike, prompt_ids: npt.ArrayLike, beta: float) -> npt.NDArray[np.float64]:
    """w_i = K_g·softmax(R/β)_i within each group g of equal prompt ids; every group's weights average to 1."""
    returns = np.asarray(returns, dtype=np.float64).reshape(-1)
    try:  # Arrow, as the weights stage reads the column: the ids 1 and "1" are not silently one prompt
        ids = pa.chunked_array([pa.array(np.asarray(prompt_ids, dtype=object).reshape(-1))])
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        raise ValueError(f"group_weights: prompt ids must all be of one type (all text or all integers): {error}")
    group = _group_codes(ids)
    if group.size != returns.size:
        raise ValueError(f"group_weights got {returns.size} returns but {group.size} prompt ids; expected one each")
    bad = np.flatnonzero(~np.isfinite(returns))
    if bad.size:  # a NaN would make its whole group's weights NaN
        raise ValueError(f"group_weights: return {bad[0]} (0-based) is {returns[bad[0]]}; expected finite returns")
    return _weights_within_groups(returns, group, beta)


def reached_correct(table: pa.Table) -> npt.NDArray[np.bool_]:
    """Per row: the trajectory reached a correct answer (see first_correct_turn)."""
    return first_correct_turn(table) > 0


def first_correct_turn(table: pa.Table) -> npt.NDArray[np.int64]:
    """Per row: the 1-based turn of the first correct answer, 0 when there is none. T_STAR where the table
    has it, else the first turn CORRECT marks, else the first turn with a positive reward: a reward may
    also pay for format (the authors' math script adds such rewards to wrong answers too)."""
    if schema.T_STAR in table.column_names:
        return table.column(schema.T_STAR).fill_null(0).to_numpy().astype(np.int64)
    if schema.CORRECT in table.column_names:
        return schema.first_true_turns(table.column(schema.CORRECT))
    rewards = table.column(schema.TURN_REWARDS)
    hits = pc.fill_null(pc.greater(_flatten(rewards, pa.float64())[1], 0), False).to_numpy(zero_copy_only=False)
    return schema.first_true_positions(hits, pc.list_value_length(rewards).fill_null(0).to_numpy())


def compute_weights(table: pa.Table, cfg: WeightsConfig, group_size: int | None = None) -> pa.Table:
    """Every input column plus RETURN and WEIGHT (float64). The table must hold whole prompt groups.

    group_size: the K every prompt's group has, checked, so that a table holding part of a group fails
    instead of normalising the weights over that part."""
    schema.require_columns(table.column_names, schema.WEIGHTS_INPUT, stage="weights", source="weights input")
    # One encoding of the prompt ids serves the check and DRIFT's normalisation.
    needs_groups = group_size is not None or cfg.mode == WeightMode.drift
    groups = _group_codes(table.column(schema.PROMPT_ID)) if needs_groups else None
    if group_size is not None:
        _require_group_size(table, groups, group_size)
    returns = trajectory_returns(table, cfg.gamma, cfg.rep_lambda, cfg.format_penalty)
    if cfg.mode == WeightMode.drift:
        weights = _weights_within_groups(returns, groups, cfg.beta)
    elif cfg.mode == WeightMode.uniform:
        weights = np.ones(table.num_rows)
    elif cfg.mode == WeightMode.success_only:
        weights = reached_correct(table).astype(np.float64)
    else:
        raise ValueError(f"weights.mode: unknown mode {cfg.mode!r}; expected one of {[m.value for m in WeightMode]}")
    out = table.drop_columns([c for c in (schema.RETURN, schema.WEIGHT) if c in table.column_names])
    return out.append_column(schema.RETURN, pa.array(returns)).append_column(schema.WEIGHT, pa.array(weights))


def weight_diagnostics(table: pa.Table) -> dict[str, Any]:
    """Weight range, effective sample size per group (Σw)²/Σw², how much weight success gets, the share of
    the weight by the turn of the first correct answer ("1", "2", …, "unsolved"): what the fine-tuning
    will mostly learn from; and the share of the prompts whose trajectories are one conversation repeated.
    Where the table records CUT_OFF: the share of the replies (of those known) that reached
    max_new_tokens, and of the weight on trajectories whose last reply did; else None."""
    if table.num_rows == 0:
        raise ValueError("weight diagnostics: no trajectories")
    weights = table.column(schema.WEIGHT).to_numpy().astype(np.float64)
    group = _group_codes(table.column(schema.PROMPT_ID))
    num_groups = int(group.max()) + 1
    weight_sum = np.bincount(group, weights=weights, minlength=num_groups)
    square_sum = np.bincount(group, weights=weights**2, minlength=num_groups)
    ess = np.divide(weight_sum**2, square_sum, out=np.zeros(num_groups), where=square_sum > 0)
    success = reached_correct(table)
    group_solved = np.bincount(group, weights=success, minlength=num_groups) > 0
    total = float(weights.sum())
    turns = first_correct_turn(table)
    share_by_turn = {
        ("unsolved" if turn == 0 else str(turn)): float(weights[turns == turn].sum() / total) if total > 0 else 0.0
        for turn in sorted(set(turns.tolist()) - {0}) + [0]
    }
    return {
        "num_trajectories": table.num_rows,
        "num_groups": num_groups,
        "weight_min": float(weights.min()),
        "weight_max": float(weights.max()),
        "weight_mean": float(weights.mean()),
        "ess_mean": float(ess.mean()),
        "ess_p10": float(np.percentile(ess, 10)),
        "groups_without_success_share": float(1.0 - group_solved.mean()),
        "success_weight_share": float(weights[success].sum() / total) if total > 0 else 0.0,
        "weight_share_by_first_correct_turn": share_by_turn,
        "repeated_groups_share": _repeated_groups_share(table, group, num_groups),
        **_cut_off_shares(table, weights, total),
    }


def _repeated_groups_share(table: pa.Table, group: npt.NDArray[np.int64], num_groups: int) -> float | None:
    """Of the prompts with more than one trajectory, the share whose trajectories are one conversation
    repeated; None without a MESSAGES column of the rollouts' type, or without such prompts. Each row is
    compared, message by message, with its group's first row."""
    found = schema.message_codes(table.column(schema.MESSAGES)) if schema.MESSAGES in table.column_names else None
    sizes = np.bincount(group, minlength=num_groups)
    if found is None or not (sizes > 1).any():
        return None
    codes, lengths = found
    starts = np.cumsum(lengths) - lengths
    first = np.full(num_groups, table.num_rows)
    np.minimum.at(first, group, np.arange(table.num_rows))
    model = first[group]  # each row's group's first row
    same_length = lengths == lengths[model]
    rows = np.repeat(np.arange(table.num_rows), lengths)
    compared = np.flatnonzero(same_length[rows])
    position = compared - starts[rows[compared]]
    differs = codes[compared] != codes[starts[model[rows[compared]]] + position]
    other = ~same_length
    other[rows[compared][differs]] = True
    repeated = np.bincount(group, weights=other, minlength=num_groups) == 0
    return float((repeated & (sizes > 1)).sum() / (sizes > 1).sum())


def weight_warnings(diagnostics: dict[str, Any]) -> list[str]:
    """What weight_diagnostics' `diagnostics` show that leaves weighted SFT little or nothing to learn."""
    warnings = []
    if diagnostics["groups_without_success_share"] == 1.0:
        warnings.append(
            "no trajectory of any prompt reached a correct answer: weights.mode=success_only leaves weighted SFT "
            "nothing to train on, and drift or uniform train on failures alone. Check that the verifier reads the "
            "replies' answers and the gold ones, or give the reference an easier task"
        )
    if diagnostics["repeated_groups_share"] == 1.0:
        warnings.append(
            "every prompt's trajectories are one conversation repeated, so the weights tell no episode from "
            "another: the engine probably did not sample (a temperature or top_p near 0, or a server that ignores "
            "the temperature: transformers serve samples only for a model whose generation_config.json sets "
            "do_sample: true)"
        )
    return warnings


def _cut_off_shares(table: pa.Table, weights: npt.NDArray[np.float64], total: float) -> dict[str, float | None]:
    shares: dict[str, float | None] = {"cut_off_reply_share": None, "cut_off_last_reply_weight_share": None}
    column = schema.cut_off_column(table)
    if column is None:
        return shares
    _, cut = _flatten(column, pa.bool_())
    if cut.null_count == len(cut):
        return shares
    shares["cut_off_reply_share"] = pc.mean(cut.cast(pa.float64())).as_py()  # of the known ones
    ends = np.cumsum(pc.list_value_length(column).fill_null(0).to_numpy())
    has_turns = np.diff(ends, prepend=0) > 0
    last_cut = np.zeros(table.num_rows, dtype=bool)
    last_cut[has_turns] = pc.fill_null(cut, False).to_numpy(zero_copy_only=False)[ends[has_turns] - 1]
    shares["cut_off_last_reply_weight_share"] = float(weights[last_cut].sum() / total) if total > 0 else 0.0
    return shares


def invalid_weights(table: pa.Table) -> pa.Table:
    """The TRAJECTORY_ID and WEIGHT of every row whose (numeric) weight is null, NaN, infinite or negative:
    weighted SFT multiplies losses by it, and such a weight would poison the update or silently drop the row."""
    weight = table.column(schema.WEIGHT).cast(pa.float64())
    bad = pc.fill_null(pc.or_(pc.invert(pc.is_finite(weight)), pc.less(weight, 0.0)), True)
    return table.select([schema.TRAJECTORY_ID, schema.WEIGHT]).filter(bad)


def invalid_conversations(table: pa.Table) -> pa.Table:
    """The TRAJECTORY_ID of every row whose MESSAGES (and CUT_OFF, where present) weighted SFT cannot
    train on, with the reason (schema.invalid_conversation_rows): found before training starts, not at the
    row's step."""
    found = schema.invalid_conversation_rows(table.column(schema.MESSAGES), schema.cut_off_column(table))
    return pa.table(
        {
            schema.TRAJECTORY_ID: table.column(schema.TRAJECTORY_ID).take(pa.array([row for row, _ in found], pa.int64())),
            "problem": pa.array([problem for _, problem in found], pa.string()),
        }
    )


def diagnostics_path(output_path: str | Path) -> Path:
    """Where weights_file puts the diagnostics of `output_path`: `<stem>.diagnostics.json` beside it."""
    output_path = Path(output_path)
    return output_path.with_name(f"{output_path.stem}.diagnostics.json")


def weights_file(input_path: str | Path, output_path: str | Path, cfg: WeightsConfig) -> dict[str, Any]:
    """Weigh a trajectory file (ours or the authors') into Parquet at `output_path`; returns the diagnostics.

    Nothing is written unless every step succeeds; the table is written last, so its presence means done.
    An earlier table at `output_path` is removed before the new diagnostics are written, so a run killed
    between the two writes cannot leave them beside it.
    """
    for role, path in (("input", input_path), ("output", output_path)):
        if not str(path).strip():  # Path("") is the working directory
            raise ValueError(f"the {role} path is empty")
    if Path(output_path).is_dir() or str(output_path).endswith(("/", os.sep)):
        raise ValueError(f"{output_path}: the output names a directory; give a Parquet file's path, ending in .parquet")
    if Path(output_path).suffix.lower() != ".parquet":
        raise ValueError(f"{output_path}: the output is a Parquet file; give a path ending in .parquet")
    source = Path(input_path).resolve()
    for what, written in (("the output", Path(output_path)), ("the diagnostics beside it", diagnostics_path(output_path))):
        written = written.resolve()
        if written.is_relative_to(source) or (written.exists() and source.exists() and written.samefile(source)):
            # Replaced before the new table is whole, a failed write would lose the input; in its directory,
            # the output would be read as one of its shards next time.
            raise ValueError(f"{written}: {what} would replace or join the input it is computed from; write it elsewhere")
    weighted = compute_weights(read_trajectories(input_path), cfg)
    diagnostics = weight_diagnostics(weighted)
    Path(output_path).unlink(missing_ok=True)
    write_json_atomic(diagnostics, diagnostics_path(output_path))
    try:
        write_table_atomic(weighted, output_path)
    except BaseException:
        diagnostics_path(output_path).unlink(missing_ok=True)
        raise
    return diagnostics


def add_weights(
    ds: ray.data.Dataset,
    cfg: WeightsConfig,
    whole_groups: bool,
    group_size: int | None = None,
    num_blocks: int | None = None,
) -> ray.data.Dataset:
    """compute_weights as a Ray Data map stage over blocks that each hold whole prompt groups.

    whole_groups: every block already holds whole groups (rollout output: all K episodes of a prompt
    come from one actor call). Otherwise rows are first hash-partitioned by prompt id into `num_blocks`
    blocks (default: the cluster's CPUs), which puts all rows of a prompt in one block. That a block is
    never split afterwards is Ray Data's behaviour, not its contract (its default shuffle strategy keeps
    blocks whole, and others may not): give `group_size` to have every block checked.
    """
    if not whole_groups:
        if num_blocks is None:
            import ray

            num_blocks = max(1, int(ray.cluster_resources().get("CPU", 1)))
        ds = ds.repartition(num_blocks, keys=[schema.PROMPT_ID])
    return ds.map_batches(
        compute_weights, fn_kwargs={"cfg": cfg, "group_size": group_size}, batch_format="pyarrow", batch_size=None
    )


def _flatten(column: pa.ChunkedArray, value_type: pa.DataType) -> tuple[npt.NDArray[np.int64], pa.ChunkedArray]:
    """(row of every list element, the elements as `value_type`) of a list column; null lists hold none.

    Rows come out in table order (non-decreasing). The cast also covers lists Arrow inferred as
    list<null> because every one of them was empty."""
    return schema.list_element_rows(column), pc.list_flatten(column).cast(value_type)


def _flatten_turns(
    column: pa.ChunkedArray, value_type: pa.DataType = pa.float64()
) -> tuple[npt.NDArray[np.int64], pa.ChunkedArray, npt.NDArray[np.int64]]:
    """`_flatten` of a per-turn list column, plus every element's 0-based turn index (t − 1)."""
    rows, values = _flatten(column, value_type)
    lengths = pc.list_value_length(column).fill_null(0).to_numpy()
    return rows, values, np.arange(rows.size) - (np.cumsum(lengths) - lengths)[rows]


def _unique_answer_ratio(column: pa.ChunkedArray) -> npt.NDArray[np.float64]:
    """n_unique / n_answers per row, 1 for a row without answers; null and blank answers do not count."""
    rows, answers = _flatten(column, pa.string())
    # One hash pass over all answers; blankness is then decided once per distinct answer, not per answer.
    encoded = answers.dictionary_encode(null_encoding="encode").combine_chunks()
    blank = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(encoded.dictionary)), 0)
    blank = pc.fill_null(blank, True).to_numpy(zero_copy_only=False)
    codes = encoded.indices.to_numpy()
    counted = ~blank[codes]
    rows, codes = rows[counted], codes[counted]
    # One key per (row, answer). Rows are already sorted, so sorting the keys only orders answers within
    # a row, keeps rows[i] the row of keys[i], and puts equal answers of a row next to each other.
    keys = np.sort(rows * len(encoded.dictionary) + codes)
    first_of_its_kind = np.empty(keys.size, dtype=bool)
    first_of_its_kind[:1] = True
    np.not_equal(keys[1:], keys[:-1], out=first_of_its_kind[1:])
    n_unique = np.bincount(rows[first_of_its_kind], minlength=len(column))
    n_answers = np.bincount(rows, minlength=len(column))
    return np.divide(n_unique, n_answers, out=np.ones(len(column)), where=n_answers > 0)


def _weights_within_groups(
    returns: npt.NDArray[np.float64], group: npt.NDArray[np.int64], beta: float
) -> npt.NDArray[np.float64]:
    """group_weights for group codes 0..G−1 that are all used."""
    if not 0 < beta < np.inf:  # an infinite β would divide infinite return gaps into NaN
        raise ValueError(f"weights.beta must be > 0 and finite, found {beta}")
    sizes = np.bincount(group)
    group_max = np.full(sizes.size, -np.inf)
    np.maximum.at(group_max, group, returns)
    # ≤ 0, and 0 for a group's best: exp never overflows. Shifted before dividing, so a tiny β cannot
    # turn returns into inf − inf.
    with np.errstate(over="ignore"):  # to -inf, whose exp is 0
        shifted = (returns - group_max[group]) / beta
    log_sum = np.log(np.bincount(group, weights=np.exp(shifted), minlength=sizes.size))
    return np.exp(np.log(sizes)[group] + shifted - log_sum[group])


def _count_format_failures(table: pa.Table, format_penalty: float) -> npt.NDArray[np.float64]:
    column = table.column(schema.FORMAT_FAILURES) if schema.FORMAT_FAILURES in table.column_names else None
    if column is None or column.null_count:
        rows_without = table.num_rows if column is None else column.null_count
        raise ValueError(
            f"weights.format_penalty = {format_penalty} re-prices format failures, which needs column "
            f"{schema.FORMAT_FAILURES!r} on every trajectory; {rows_without} of {table.num_rows} rows have none "
            "(an authors' line carries it only where its reward_details give every turn's format_penalty). "
            f"Unset weights.format_penalty to use each trajectory's {schema.FORMAT_PENALTY!r} total."
        )
    rows, failures = _flatten(column, pa.bool_())
    hits = pc.fill_null(failures, False).to_numpy(zero_copy_only=False).astype(np.float64)
    return np.bincount(rows, weights=hits, minlength=table.num_rows)


def _require_group_size(table: pa.Table, groups: npt.NDArray[np.int64], group_size: int) -> None:
    """`groups`: _group_codes of the table's prompt ids."""
    rows_in_group = np.bincount(groups)[groups]
    wrong = np.flatnonzero(rows_in_group != group_size)
    if len(wrong):
        row = int(wrong[0])
        prompt_id, count = table.column(schema.PROMPT_ID)[row].as_py(), int(rows_in_group[row])
        raise RuntimeError(
            f"weights: {count} trajectories of prompt {prompt_id!r} in one block, expected {group_size} "
            "(rollout.samples_per_prompt): a block must hold every prompt's group whole, or the weights are "
            "normalised over the wrong trajectories. Ray Data's default shuffle strategy keeps hash-partitioned "
            "blocks whole: is RAY_DATA_DEFAULT_SHUFFLE_STRATEGY set to another?"
        )


def _group_codes(ids: pa.ChunkedArray) -> npt.NDArray[np.int64]:
    """0..G−1 per row, one code per distinct prompt id of the column `ids`."""
    if not len(ids):  # no ids to type: Arrow cannot dictionary-encode their null type
        return np.zeros(0, dtype=np.int64)
    if ids.null_count:
        raise ValueError(f"{schema.PROMPT_ID!r}: {ids.null_count} rows have no prompt id; every trajectory needs one")
    return ids.dictionary_encode().combine_chunks().indices.to_numpy().astype(np.int64)
