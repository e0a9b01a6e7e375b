"""The planner's numbers are the ones training runs with; the DP loader runs exactly the steps
that were projected; the epsilon a job ends with never exceeds its target."""

import pytest
import torch
from torch.utils.data import TensorDataset

from jobs.model import initial_weights
from jobs.spec import PrivacySpec, load_spec, parse_spec
from site_app.privacy import (
    PrivateTraining,
    dp_loader,
    epsilon_spent,
    release_patient_count,
    resolve_dp_settings,
)
from site_app.privacy_plan import plan_privacy
from site_app.training import train_epochs
from tests.conftest import site_job, tiny_spec


def _settings(patients: int, batch: int, *, epochs: int = 1, rounds: int = 1, **privacy):
    spec = PrivacySpec(**({"noise_multiplier": 1.0} | privacy))
    return resolve_dp_settings(
        spec, released_patients=patients, batch_size=batch, local_epochs=epochs, rounds=rounds
    )


@pytest.mark.parametrize("batch", [1, 4, 12, 38])
def test_the_dp_loader_runs_exactly_the_projected_steps_for_every_size(batch):
    for patients in range(1, 700):
        settings = _settings(patients, batch)
        loader = dp_loader(TensorDataset(torch.zeros(patients, 1)), settings, generator=None)
        assert len(loader) == settings.steps_per_epoch, (patients, batch)
        # What Opacus records for each step: 1 / len(loader), exactly the projected rate.
        assert 1 / len(loader) == settings.sample_rate, (patients, batch)


def test_a_whole_job_runs_and_accounts_what_was_projected():
    """The issue's case: 372 patients, batch 4 (93 steps an epoch, where Opacus's own loader
    would run 92), 10 rounds at target 8. A real Opacus run on a tiny model."""
    privacy = PrivacySpec(target_epsilon=8.0)
    settings = resolve_dp_settings(
        privacy, released_patients=372, batch_size=4, local_epochs=1, rounds=10
    )
    assert settings.steps_per_epoch == 93
    model = torch.nn.Linear(1, 1)
    training = PrivateTraining(settings, noise_generator=torch.Generator().manual_seed(0))
    data = TensorDataset(torch.rand(372, 1), torch.rand(372, 1))
    model, optimizer, loader = training.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=dp_loader(data, settings, generator=torch.Generator().manual_seed(1)),
    )
    training.restore_history([settings.count_release])
    loss = torch.nn.MSELoss()
    stats = train_epochs(model, optimizer, loader, epochs=10, loss_fn=loss)
    assert stats.steps == 930
    assert training.history == settings.job_history(10)
    assert training.epsilon() <= 8.0
    assert training.epsilon() == pytest.approx(8.0, rel=2e-3)


JOBS = [  # patients, batch, epochs, rounds, target
    (9, 4, 10, 30, 8.0),
    (24, 12, 10, 30, 8.0),
    (150, 32, 2, 10, 8.0),
    (150, 32, 2, 10, 3.0),
    (150, 32, 2, 10, 1.0),
    (372, 4, 1, 10, 8.0),
    (800, 64, 3, 10, 8.0),
]


@pytest.mark.parametrize(("accountant", "jobs"), [("rdp", JOBS), ("prv", JOBS[2:5])])
def test_the_job_epsilon_never_exceeds_the_target(accountant, jobs):
    for patients, batch, epochs, rounds, target in jobs:
        settings = _settings(
            patients,
            batch,
            epochs=epochs,
            rounds=rounds,
            noise_multiplier=None,
            target_epsilon=target,
            accountant=accountant,
        )
        epsilon = epsilon_spent(
            settings.job_history(rounds), accountant=accountant, delta=settings.delta
        )
        assert epsilon <= target, (patients, batch, target, epsilon)
        assert epsilon >= 0.99 * target, (patients, batch, target, epsilon)


def test_the_released_count_is_the_count_plus_gaussian_noise_and_at_least_one():
    generator = torch.Generator().manual_seed(0)
    draws = [release_patient_count(150, noise_std=10.0, generator=generator) for _ in range(400)]
    mean = sum(draws) / len(draws)
    spread = (sum((d - mean) ** 2 for d in draws) / len(draws)) ** 0.5
    assert abs(mean - 150) < 2.5 and 8 < spread < 12
    assert (
        min(release_patient_count(1, noise_std=50.0, generator=generator) for _ in range(50)) == 1
    )


def test_the_plan_is_what_a_site_then_runs(tiny_federation, tmp_path):
    spec = tiny_spec(
        privacy={
            "noise_multiplier": None,
            "target_epsilon": 50.0,
            "count_noise_std": 2.0,
            "grad_sample_mode": "grouped",
        },
        training={"rounds": 2},
    )
    job = site_job(spec, tiny_federation / "site-1", tmp_path)
    released = job.dp_settings.released_patients
    plan = plan_privacy(spec, patients=[released])
    assert plan.sites[0].settings == job.dp_settings
    weights = initial_weights(spec.model, 0)
    for round_index in range(spec.training.rounds):
        weights, meta = job.train_round(weights, round_index)
    assert meta["num_patients"] == released  # the count the site publishes is the noised one
    assert job.epsilon() == pytest.approx(plan.sites[0].epsilon, rel=1e-9)
    assert job.epsilon() <= 50.0


@pytest.mark.parametrize(("server_lr", "quoted"), [(2.0, "server step 2"), (1.0, "server step 1")])
def test_the_plan_quotes_the_measurement_made_with_the_specs_server_step(server_lr, quoted):
    plain = load_spec("jobs/specs/demo.yaml").to_plain()
    plain["federation"]["server_lr"] = server_lr
    plan = plan_privacy(parse_spec(plain), patients=[150])
    (measured,) = [note for note in plan.notes if note.startswith("measured on the simulator")]
    assert quoted in measured
