"""Building the run report (pure): a RunHistory, the spec and the signed manifest in, a typed
``Report`` (``server_app.report_schema``, report.json's schema) out. No files, no text."""

from __future__ import annotations

from collections import defaultdict

from jobs import keys
from server_app.history import RunHistory, SiteRound
from server_app.report_schema import (
    Accounting,
    CrossSite,
    CrossSiteCell,
    GapEnd,
    Mechanism,
    ModelSummary,
    PooledCell,
    Refusal,
    Report,
    RoundRef,
    SiteSummary,
    SubgroupCell,
    SubgroupGap,
    Subgroups,
)

__all__ = ["WEAK_EPSILON", "build_report", "largest_gaps", "pool_subgroups", "site_accounting"]

WEAK_EPSILON = 10.0
"""Above this epsilon the report warns that the guarantee is weak (a common rule of thumb)."""


def _status(refused: str | None, missing: bool) -> str:
    return "refused" if refused else "missing" if missing else "ok"


def site_accounting(records: list[SiteRound]) -> Accounting | None:
    """A site's DP mechanisms in this job, from what it sent (pure): the released patient count
    (one Gaussian step at rate 1, sent with its first answer) and DP-SGD (its noise and rate,
    steps summed over the rounds it trained). None when the site sent no DP answer."""
    dp = [r for r in sorted(records, key=lambda r: r.round) if r.noise_multiplier is not None]
    if not dp:
        return None
    first, last = dp[0], dp[-1]
    trained = [r for r in dp if not r.refused and not r.missing]
    mechanisms = [
        Mechanism(
            mechanism="released patient count (Gaussian, sensitivity 1)",
            noise_multiplier=first.count_noise_std,
            sample_rate=1.0,
            steps=1,
        )
    ]
    steps = sum(r.num_steps or 0 for r in trained)
    if steps:
        mechanisms.append(
            Mechanism(
                mechanism="DP-SGD (Poisson-sampled Gaussian, per-patient clipping)",
                noise_multiplier=first.noise_multiplier,
                sample_rate=first.sample_rate,
                steps=steps,
            )
        )
    epsilon = next((r.epsilon for r in reversed(dp) if r.epsilon is not None), None)
    return Accounting(
        accountant=last.accountant, delta=last.delta, epsilon=epsilon, mechanisms=mechanisms
    )


def _cross_site(history: RunHistory) -> CrossSite:
    cells = [
        CrossSiteCell(
            model=keys.GLOBAL_MODEL,
            model_round=history.rounds_completed,
            site=r.site,
            dice=r.val_dice,
            hd95_mm=r.val_hd95_mm,
            hd95_missing=r.val_hd95_missing,
            val_patients=r.val_patients,
            status=_status(r.refused, r.missing),
        )
        for r in history.final
    ]
    cells += [
        CrossSiteCell(
            model=c.model,
            model_round=c.model_round,
            site=c.site,
            dice=c.val_dice,
            hd95_mm=c.val_hd95_mm,
            hd95_missing=c.val_hd95_missing,
            val_patients=c.val_patients,
            status=_status(c.refused, c.missing),
        )
        for c in history.cross_site
    ]
    owners = sorted({c.model for c in history.cross_site})
    return CrossSite(
        models=[keys.GLOBAL_MODEL, *owners],
        sites=history.sites,
        cells=cells,
        not_shared=dict(sorted(history.cross_site_not_shared.items())),
    )


def _weighted(pairs: list[tuple[float | None, int | None]]) -> tuple[float | None, int]:
    known = [(v, w) for v, w in pairs if v is not None and w]
    total = sum(w for _, w in known)
    return (sum(v * w for v, w in known) / total if total else None), total


def pool_subgroups(per_site: list[SubgroupCell]) -> list[PooledCell]:
    """Cells pooled across sites per (attribute, value), weighted by each site's ``n``
    (``n_hd95`` for HD95). Only sites that sent the cell take part."""
    groups: dict[tuple[str, str], list[SubgroupCell]] = defaultdict(list)
    for cell in per_site:
        groups[(cell.attribute, cell.value)].append(cell)
    pooled = []
    for (attribute, value), cells in sorted(groups.items()):
        dice, n = _weighted([(c.dice, c.n) for c in cells])
        hd95, n_hd95 = _weighted([(c.hd95_mm, c.n_hd95) for c in cells])
        pooled.append(
            PooledCell(
                attribute=attribute,
                value=value,
                n=n,
                sites=sorted(c.site for c in cells),
                dice=dice,
                hd95_mm=hd95,
                n_hd95=n_hd95 or None,
            )
        )
    return pooled


def largest_gaps(pooled: list[PooledCell]) -> list[SubgroupGap]:
    """Per attribute, the best and worst pooled Dice among known values (``unknown`` excluded:
    it is not a group of patients) and their difference; attributes with fewer than two such
    cells have no gap."""
    by_attribute: dict[str, list[PooledCell]] = defaultdict(list)
    for cell in pooled:
        if cell.value != keys.UNKNOWN and cell.dice is not None:
            by_attribute[cell.attribute].append(cell)
    gaps = []
    for attribute, cells in sorted(by_attribute.items()):
        if len(cells) < 2:
            continue
        best = max(cells, key=lambda c: (c.dice, c.value))
        worst = min(cells, key=lambda c: (c.dice, c.value))
        gaps.append(
            SubgroupGap(
                attribute=attribute,
                metric="dice",
                best=GapEnd(value=best.value, dice=best.dice, hd95_mm=best.hd95_mm, n=best.n),
                worst=GapEnd(value=worst.value, dice=worst.dice, hd95_mm=worst.hd95_mm, n=worst.n),
                gap=best.dice - worst.dice,
            )
        )
    return gaps


def _subgroups(history: RunHistory, spec: dict) -> Subgroups:
    per_site = [
        SubgroupCell(
            site=record.site,
            attribute=cell[keys.CELL_ATTRIBUTE],
            value=cell[keys.CELL_VALUE],
            n=cell[keys.CELL_PATIENTS],
            dice=cell[keys.CELL_DICE],
            hd95_mm=cell[keys.CELL_HD95_MM],
            n_hd95=cell[keys.CELL_HD95_PATIENTS],
        )
        for record in sorted(history.final, key=lambda r: r.site)
        for cell in record.subgroups or []
    ]
    seen: dict[str, set[str]] = defaultdict(set)
    for cell in per_site:
        seen[cell.attribute].add(cell.value)
    attributes = {}
    for attribute, fixed in keys.SUBGROUP_VALUES.items():
        known = [v for v in fixed if v != keys.UNKNOWN]
        extra = sorted(seen[attribute] - set(known) - {keys.UNKNOWN})
        unknown = [keys.UNKNOWN] if keys.UNKNOWN in seen[attribute] else []
        attributes[attribute] = known + extra + unknown
    pooled = pool_subgroups(per_site)
    minimum = (spec.get("evaluation") or {}).get("min_subgroup_size", 5)
    return Subgroups(
        min_cell_size=minimum,
        attributes=attributes,
        per_site=per_site,
        pooled=pooled,
        largest_gap=largest_gaps(pooled),
    )


def _model_summary(manifest: dict | None) -> ModelSummary | None:
    if not manifest:
        return None
    signer = manifest.get("signer") or {}
    return ModelSummary(
        file=manifest.get("model_file"),
        sha256=manifest.get("model_sha256"),
        signer_kind=signer.get("kind"),
        signer_subject=signer.get("subject"),
        created_utc=manifest.get("created_utc"),
        fedseg_version=manifest.get("fedseg_version"),
        contributing_sites=manifest.get("contributing_sites"),
    )


def build_report(
    history: RunHistory,
    *,
    spec: dict,
    wall_s: float | None = None,
    manifest: dict | None = None,
) -> Report:
    """Everything a researcher needs from one run (fields: ``server_app.report_schema``); its
    ``plots`` are left for the writer to name."""
    privacy = spec.get("privacy") or {}
    untrained = {r.site: r.val_dice for r in history.rounds if r.round == 0}
    final = {r.site: r for r in history.final}
    last_epsilon = history.last_epsilon()
    budget_left: dict[str, float | None] = {}
    train_patients: dict[str, int] = {}
    for record in sorted(history.rounds, key=lambda r: r.round):
        if record.budget_left is not None:
            budget_left[record.site] = record.budget_left
        if record.num_patients is not None:
            train_patients[record.site] = record.num_patients
    per_site = []
    for site in history.sites:
        final_record = final.get(site)
        per_site.append(
            SiteSummary(
                site=site,
                train_patients=train_patients.get(site),
                val_patients=final_record.val_patients if final_record else None,
                untrained_dice=untrained.get(site),
                final_dice=final_record.val_dice if final_record else None,
                final_hd95_mm=final_record.val_hd95_mm if final_record else None,
                final_hd95_missing=final_record.val_hd95_missing if final_record else None,
                final_lesion_volumes=final_record.val_lesion_volumes if final_record else None,
                epsilon=last_epsilon.get(site),
                budget_left=budget_left.get(site),
                delta=privacy.get("delta") if privacy.get("enabled") else None,
                accounting=site_accounting([r for r in history.rounds if r.site == site]),
            )
        )
    return Report(
        job=history.job_name,
        sites=history.sites,
        rounds_planned=history.rounds_planned,
        rounds_completed=history.rounds_completed,
        stopped_reason=history.stopped_reason,
        best_round=history.best_round,
        privacy=spec.get("privacy"),
        wall_time_s=None if wall_s is None else round(wall_s, 1),
        per_site=per_site,
        rounds=history.rounds,
        cross_site=_cross_site(history),
        subgroups=_subgroups(history, spec),
        model=_model_summary(manifest),
        refusals=[
            Refusal(site=r.site, round=r.round, reason=r.refused)
            for r in history.rounds
            if r.refused
        ],
        missing=[RoundRef(site=r.site, round=r.round) for r in history.rounds if r.missing],
        spec=spec,
    )
