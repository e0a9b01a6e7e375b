"""A site's privacy policy and the check of a job against it, done before any data is touched.

The policy lives in the site's own config (never sent by, or to, the server); a job that breaks
it is refused with reasons a researcher can act on.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from jobs.spec import Accountant, JobSpec

__all__ = ["PrivacyPolicy", "SiteRefusal", "default_max_delta", "job_policy_problems"]


class SiteRefusal(Exception):
    """The site declines a job or a round; the message is the reason the researcher sees."""


class PrivacyPolicy(BaseModel):
    """What this site allows. The defaults are the provisioning template's: a site that sets
    no policy is as strict as a site that kept the template's.

    ``null`` for a cap means no cap, which a site admin must write on purpose.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    dp_required: bool = True
    """Refuse jobs with privacy.enabled: false."""
    max_epsilon_per_job: Annotated[float, Field(gt=0)] | None = 8.0
    """Refuse a job whose whole-job epsilon would pass this (checked at its start and before
    every round)."""
    total_epsilon_budget: Annotated[float, Field(gt=0)] | None = 20.0
    """Refuse a job that would take the dataset's epsilon, summed over all jobs in the site's
    ledger and the jobs under way (basic composition, an upper bound), above this."""
    min_noise_multiplier: Annotated[float, Field(ge=0)] = 0.5
    """Refuse jobs whose noise multiplier is below this (checked once the noise is known)."""
    max_delta: Annotated[float, Field(gt=0, lt=1)] | None = None
    """Largest delta of all jobs together (deltas add up under basic composition, as
    epsilons do); None = 1 / N^1.1, N the training patients at this site."""
    allowed_accountants: tuple[Accountant, ...] = (Accountant.RDP, Accountant.PRV)

    @classmethod
    def for_simulated_data(cls, **overrides) -> PrivacyPolicy:
        """What fedseg's simulator gives its sites: the researcher's own synthetic data, so no
        caps (baselines run without DP, any noise may be tried); never a hospital's policy."""
        lenient = {
            "dp_required": False,
            "max_epsilon_per_job": None,
            "total_epsilon_budget": None,
            "min_noise_multiplier": 0.0,
            "max_delta": 0.5,
        }
        return cls.model_validate({**lenient, **overrides})


def default_max_delta(training_patients: int) -> float:
    """1 / N^1.1: a delta that is "cryptographically small" against the site's N patients (a
    mechanism leaking one whole record with probability delta would expose fewer than one)."""
    return 1.0 / max(1, training_patients) ** 1.1


def job_policy_problems(spec: JobSpec, policy: PrivacyPolicy) -> list[str]:
    """Every way ``spec`` breaks ``policy`` that is visible before the data is read.

    The noise multiplier of a target_epsilon job and the delta bound that depends on the number
    of patients are checked later, once the site knows its patient count. A seeded spec is
    accepted everywhere: outside simulation the seed only fixes the patient split and crops;
    Poisson sampling and DP noise are always drawn from the OS (``site_app.local_job``).
    """
    problems = []
    privacy = spec.privacy
    if not privacy.enabled:
        if policy.dp_required:
            problems.append("privacy.enabled is false, but this site requires DP for every job")
        return problems
    if privacy.accountant not in policy.allowed_accountants:
        allowed = ", ".join(a.value for a in policy.allowed_accountants)
        problems.append(
            f"privacy.accountant is {privacy.accountant.value}; this site accepts: {allowed}"
        )
    if (
        privacy.noise_multiplier is not None
        and privacy.noise_multiplier < policy.min_noise_multiplier
    ):
        problems.append(
            f"privacy.noise_multiplier is {privacy.noise_multiplier:g}, below this site's "
            f"minimum of {policy.min_noise_multiplier:g}"
        )
    if (
        privacy.target_epsilon is not None
        and policy.max_epsilon_per_job is not None
        and privacy.target_epsilon > policy.max_epsilon_per_job
    ):
        problems.append(
            f"privacy.target_epsilon is {privacy.target_epsilon:g}, above this site's "
            f"max_epsilon_per_job of {policy.max_epsilon_per_job:g}"
        )
    if policy.max_delta is not None and privacy.delta > policy.max_delta:
        problems.append(
            f"privacy.delta is {privacy.delta:g}, above this site's max_delta of "
            f"{policy.max_delta:g}"
        )
    return problems
