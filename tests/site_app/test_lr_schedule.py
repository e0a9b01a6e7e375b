"""The learning-rate schedule every trainer of a job shares (sites, local-only, pooled)."""

import itertools
import math

import pytest
import torch

from jobs.model import initial_weights
from jobs.spec import JobSpecError, TrainingSpec
from site_app.training import round_learning_rates, scheduled_lr, train_epochs
from tests.conftest import site_job, tiny_spec


def test_cosine_starts_at_the_base_rate_halves_midway_and_nears_zero_at_the_end():
    assert scheduled_lr(0.004, "cosine", epoch=0, total_epochs=100) == 0.004
    assert scheduled_lr(0.004, "cosine", epoch=50, total_epochs=100) == pytest.approx(0.002)
    last = scheduled_lr(0.004, "cosine", epoch=99, total_epochs=100)
    assert 0 < last < 0.004 * 1e-3
    rates = [scheduled_lr(1.0, "cosine", epoch=e, total_epochs=10) for e in range(10)]
    assert all(a > b for a, b in itertools.pairwise(rates))


def test_constant_keeps_the_base_rate():
    assert {scheduled_lr(0.01, "constant", epoch=e, total_epochs=7) for e in range(7)} == {0.01}


@pytest.mark.parametrize("epoch", [-1, 5])
def test_an_epoch_outside_the_job_is_refused(epoch):
    with pytest.raises(ValueError, match=r"outside 0\.\.4"):
        scheduled_lr(0.01, "cosine", epoch=epoch, total_epochs=5)


def test_rounds_cover_the_job_epoch_by_epoch():
    training = TrainingSpec(rounds=3, local_epochs=2, lr=0.01, lr_schedule="cosine")
    rates = [lr for r in range(3) for lr in round_learning_rates(training, r)]
    expected = [0.01 * 0.5 * (1 + math.cos(math.pi * e / 6)) for e in range(6)]
    assert rates == pytest.approx(expected, rel=1e-12)


def test_an_unknown_schedule_is_refused_by_the_spec():
    with pytest.raises(JobSpecError, match="lr_schedule"):
        tiny_spec(training={"lr_schedule": "step"})


def test_train_epochs_sets_each_pass_rate():
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    loader = [(torch.ones(1, 2), torch.ones(1, 1))]
    seen = []

    class Recording(torch.nn.MSELoss):
        def forward(self, prediction, target):
            seen.append(optimizer.param_groups[0]["lr"])
            return super().forward(prediction, target)

    train_epochs(model, optimizer, loader, epochs=3, loss_fn=Recording(), lr_per_epoch=[3, 2, 1])
    assert seen == [3, 2, 1]
    with pytest.raises(ValueError, match="2 learning rates for 3 epochs"):
        train_epochs(model, optimizer, loader, epochs=3, loss_fn=Recording(), lr_per_epoch=[1, 2])


def test_a_site_round_trains_at_the_scheduled_rate(tiny_federation, tmp_path):
    spec = tiny_spec(training={"rounds": 4, "local_epochs": 1, "lr": 0.01, "lr_schedule": "cosine"})
    job = site_job(spec, tiny_federation / "site-1", tmp_path)
    weights = initial_weights(spec.model, 0)
    for round_index in range(3):
        weights, _ = job.train_round(weights, round_index)
        lr = job.optimizer.param_groups[0]["lr"]
        assert lr == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * round_index / 4)))
