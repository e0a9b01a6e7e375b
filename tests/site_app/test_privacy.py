"""DP accounting at a site: epsilon composes across rounds and survives process restarts."""

import pytest
import torch
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from torch.utils.data import DataLoader, TensorDataset

from jobs.spec import PrivacySpec
from site_app.privacy import (
    DPState,
    PrivateTraining,
    dp_loader,
    epsilon_spent,
    projected_epsilon,
    resolve_dp_settings,
)
from site_app.training import _noise_only_step, train_epochs

ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


def _independent_rdp_epsilon(noise, sample_rate, steps, delta):
    rdp = compute_rdp(q=sample_rate, noise_multiplier=noise, steps=steps, orders=ORDERS)
    epsilon, _ = get_privacy_spent(orders=ORDERS, rdp=rdp, delta=delta)
    return epsilon


def _tiny_private(settings, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8, 1))
    data = TensorDataset(torch.randn(10, 8), torch.randn(10, 1))
    loader = dp_loader(data, settings, generator=torch.Generator().manual_seed(seed))
    private = PrivateTraining(settings, noise_generator=torch.Generator().manual_seed(seed))
    module, optimizer, loader = private.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader
    )
    return private, module, optimizer, loader


def _settings(**privacy):
    spec = PrivacySpec(**({"noise_multiplier": 1.1} | privacy))
    return resolve_dp_settings(spec, released_patients=10, batch_size=4, local_epochs=2, rounds=3)


def test_sampling_rate_and_steps_follow_the_released_count():
    settings = _settings()
    # ceil(10 / 4) = 3 steps per epoch, q = 1/3, the noised sum divided by 10 / 3.
    assert settings.sample_rate == pytest.approx(1 / 3)
    assert settings.steps_per_round == 2 * 3
    assert settings.expected_batch_size == pytest.approx(10 / 3)


def test_make_private_needs_the_poisson_loader_of_the_released_count():
    settings = _settings()
    private = PrivateTraining(settings, noise_generator=torch.Generator().manual_seed(0))
    model = torch.nn.Linear(8, 1)
    plain = DataLoader(TensorDataset(torch.randn(10, 8), torch.randn(10, 1)), batch_size=4)
    with pytest.raises(TypeError, match="dp_loader"):
        private.make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=plain
        )


def test_epsilon_grows_each_round_and_matches_an_independent_computation():
    settings = _settings()
    private, module, optimizer, loader = _tiny_private(settings)
    loss = torch.nn.MSELoss()
    epsilons, steps = [], 0
    for _ in range(3):
        stats = train_epochs(module, optimizer, loader, epochs=2, loss_fn=loss)
        steps += stats.steps
        epsilons.append(private.epsilon())
    assert epsilons[0] < epsilons[1] < epsilons[2]
    assert steps == 3 * settings.steps_per_round
    expected = _independent_rdp_epsilon(1.1, 1 / 3, steps, settings.delta)
    assert epsilons[-1] == pytest.approx(expected, rel=1e-9)


def test_a_restarted_process_continues_the_same_epsilon(tmp_path):
    """FLARE's simulator may restart a site between rounds: the history must come from disk."""
    settings = _settings()
    private, module, optimizer, loader = _tiny_private(settings)
    train_epochs(module, optimizer, loader, epochs=2, loss_fn=torch.nn.MSELoss())
    DPState(history=private.history, rounds_done=1).save(tmp_path / "dp_state.pt")
    spent_before = private.epsilon()

    restarted, module, optimizer, loader = _tiny_private(settings, seed=1)
    assert restarted.epsilon() == 0.0
    restarted.restore_history(DPState.load(tmp_path / "dp_state.pt").history)
    assert restarted.epsilon() == pytest.approx(spent_before)
    train_epochs(module, optimizer, loader, epochs=2, loss_fn=torch.nn.MSELoss())
    two_rounds = _independent_rdp_epsilon(1.1, 1 / 3, 2 * settings.steps_per_round, settings.delta)
    assert restarted.epsilon() == pytest.approx(two_rounds, rel=1e-9)


def test_make_private_twice_in_one_process_is_refused():
    private, *_ = _tiny_private(_settings())
    with pytest.raises(RuntimeError, match="already called"):
        private.make_private(module=None, optimizer=None, data_loader=None)


def test_projection_is_the_epsilon_after_the_next_round():
    settings = _settings()
    history = [(settings.noise_multiplier, settings.sample_rate, settings.steps_per_round)]
    projected = projected_epsilon(history, settings, settings.steps_per_round)
    spent = epsilon_spent(
        [(settings.noise_multiplier, settings.sample_rate, 2 * settings.steps_per_round)],
        accountant="rdp",
        delta=settings.delta,
    )
    assert projected == pytest.approx(spent)
    assert epsilon_spent([], accountant="rdp", delta=1e-5) == 0.0


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_target_epsilon_is_met_over_the_whole_job_not_per_round(accountant):
    settings = _settings(noise_multiplier=None, target_epsilon=4.0, accountant=accountant)
    # The whole job: the released count first, then every round's DP-SGD steps.
    whole_job = settings.job_history(rounds=3)
    assert whole_job[0] == (settings.count_noise_std, 1.0, 1)
    spent = epsilon_spent(whole_job, accountant=accountant, delta=settings.delta)
    assert spent <= 4.0
    assert spent > 3.96  # calibrated to the target, not over-provisioned


def test_an_empty_poisson_batch_still_adds_noise_and_counts_a_step():
    settings = _settings()
    private, module, optimizer, _ = _tiny_private(settings)
    before = [p.detach().clone() for p in module.parameters()]
    _noise_only_step(optimizer)
    after = list(module.parameters())
    assert any(not torch.equal(b, a) for b, a in zip(before, after, strict=True))
    assert private.history == [(1.1, settings.sample_rate, 1)]


def test_a_planted_state_file_cannot_run_code_at_the_site(tmp_path):
    import os

    marker = tmp_path / "ran"

    class Planted:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "dp_state.pt"
    torch.save({"history": [], "rounds_done": 1, "rng": {"x": Planted()}, "optimizer": None}, path)
    with pytest.raises(ValueError, match="not a fedseg DP state"):
        DPState.load(path)
    assert not marker.exists()
