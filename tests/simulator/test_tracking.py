"""TensorBoard through FLARE's experiment tracking: what each site sends, and the event files."""

import math

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from jobs import keys
from site_app.tracking import round_scalars

TRAIN_META = {
    keys.VAL_DICE: 0.25,
    keys.VAL_HD95_MM: 12.5,
    keys.TRAIN_LOSS: 0.8,
    keys.EPSILON: 3.0,
    keys.NUM_STEPS: 4,
}


@pytest.mark.parametrize(
    ("task", "round_index", "meta", "expected"),
    [
        (  # metrics of the received model at its round; training results one round later
            keys.TASK_TRAIN,
            2,
            TRAIN_META,
            [
                (keys.VAL_DICE, 0.25, 2),
                (keys.VAL_HD95_MM, 12.5, 2),
                (keys.TRAIN_LOSS, 0.8, 3),
                (keys.EPSILON, 3.0, 3),
            ],
        ),
        (  # a refused round trained nothing: only the validation of what it received
            keys.TASK_TRAIN,
            1,
            {**TRAIN_META, keys.REFUSED: "over budget"},
            [(keys.VAL_DICE, 0.25, 1), (keys.VAL_HD95_MM, 12.5, 1)],
        ),
        (  # the final validation of the global model
            keys.TASK_VALIDATE,
            5,
            {keys.VAL_DICE: 0.5, keys.VAL_HD95_MM: None, keys.EPSILON: 9.0},
            [(keys.VAL_DICE, 0.5, 5)],
        ),
        (  # another site's local model (cross-site evaluation) is not the global model
            keys.TASK_VALIDATE,
            5,
            {keys.VAL_DICE: 0.5, keys.MODEL_OWNER: "site-2"},
            [],
        ),
        (  # no lesion held out, DP off, every batch empty: nothing to plot
            keys.TASK_TRAIN,
            0,
            {keys.VAL_DICE: None, keys.TRAIN_LOSS: math.nan, keys.EPSILON: None},
            [],
        ),
    ],
)
def test_round_scalars(task, round_index, meta, expected):
    assert round_scalars(task, round_index, meta) == expected


def _scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    return {
        tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["scalars"]
    }


@pytest.mark.slow
def test_a_simulation_writes_tensorboard_runs_for_server_sites_and_federation(tiny_run):
    history = tiny_run.history
    board = tiny_run.out_dir / "tensorboard"
    for site in ("site-1", "site-2"):
        records = {r.round: r for r in history.rounds if r.site == site}
        final = next(r for r in history.final if r.site == site)
        expected_dice = [(k, pytest.approx(records[k].val_dice)) for k in (0, 1)]
        expected_dice.append((2, pytest.approx(final.val_dice)))
        expected_epsilon = [(k + 1, pytest.approx(records[k].epsilon)) for k in (0, 1)]
        # What the server received through FLARE (fed events) and what the site wrote itself.
        for run in (board / "server" / site, board / "sites" / site):
            scalars = _scalars(run)
            assert {keys.VAL_DICE, keys.EPSILON} <= set(scalars), run
            # A DP job sends nothing computed on training patients without noise.
            assert keys.TRAIN_LOSS not in scalars, run
            assert scalars[keys.VAL_DICE] == expected_dice
            assert scalars[keys.EPSILON] == expected_epsilon
    federation = _scalars(board / "federation")
    first = [r.val_dice for r in history.rounds if r.round == 0]
    assert federation["federation/mean_val_dice"][0] == (0, pytest.approx(sum(first) / 2))
    assert [step for step, _ in federation["federation/mean_val_dice"]] == [0, 1, 2]
    assert federation["federation/site_updates"] == [(1, 2.0), (2, 2.0)]
