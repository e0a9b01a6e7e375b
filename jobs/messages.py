"""The FLARE message metadata (``FLModel.meta``) as typed records, one per direction.

``TaskMeta`` is what the server sends with a task; ``SiteResultMeta`` (with its ``SubgroupCell``
items) is what a site sends with a train/validate result. Each key is one of ``jobs.keys``
(the fields' aliases); ``to_meta`` gives the plain dict that goes over the wire and
``from_meta`` validates one received, once.

A key is on the wire exactly when its field was given (explicitly, ``None`` included): a DP
job never sends ``train_loss`` at all, while a site without a budget sends
``budget_left: None``. ``to_meta`` keeps that distinction, and the order the fields were given
in (as the dicts it replaced did), so the serialised message stays byte for byte the same.

The server treats a site's metadata as untrusted input: ``SiteResultMeta.from_meta`` raises
``MessageError`` (one line, naming each field, what was expected and what was found) for a
value of the wrong type or a malformed subgroup cell. Keys the record does not know are
ignored, as FLARE adds its own (e.g. ``jobs.keys.RESULT_SITE``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from jobs import keys
from jobs.validation_errors import format_validation_error

__all__ = ["MessageError", "SiteResultMeta", "SubgroupCell", "TaskMeta", "result_site"]


class MessageError(ValueError):
    """A message's metadata does not fit its record; the text is one line naming each field."""


class _Meta(BaseModel):
    model_config = ConfigDict(
        frozen=True, validate_by_name=True, validate_by_alias=True, serialize_by_alias=True
    )

    _order: tuple[str, ...] = PrivateAttr(default=())
    """The fields in the order they were given, so the wire dict keeps it (as a dict would)."""

    @model_validator(mode="wrap")
    @classmethod
    def _keep_order(cls, data: Any, handler: Any) -> Any:
        record = handler(data)
        if isinstance(data, Mapping) and isinstance(record, _Meta):
            names = {field.alias or name: name for name, field in cls.model_fields.items()}
            names |= {name: name for name in cls.model_fields}
            record._order = tuple(dict.fromkeys(names[key] for key in data if key in names))
        return record

    def to_meta(self) -> dict[str, Any]:
        """The plain dict sent over the wire: the fields that were given, by their key, in the
        order they were given (then any others in field order)."""
        dumped = self.model_dump(exclude_unset=True)
        order = [self.model_fields[name].alias or name for name in self._order]
        return {key: dumped[key] for key in dict.fromkeys([*order, *dumped]) if key in dumped}

    @classmethod
    def _parse(cls, meta: Mapping[str, Any], source: str):
        try:
            return cls.model_validate(dict(meta), by_alias=True, by_name=False)
        except ValidationError as error:
            text = format_validation_error(
                error,
                source,
                document=f"the message metadata ({cls.__name__})",
                unknown_key="unknown key (not part of fedseg's message)",
                fix="the sender runs another fedseg version, or sent a malformed message",
            )
            raise MessageError(" ".join(line.strip() for line in text.splitlines())) from None


class SubgroupCell(_Meta):
    """One subgroup cell of a site's final validation (an item of ``keys.SUBGROUPS``): only
    cells with at least the job's ``evaluation.min_subgroup_size`` patients leave a site."""

    model_config = ConfigDict(extra="forbid")  # wholly the site's: nothing unlisted is stored

    attribute: str = Field(alias=keys.CELL_ATTRIBUTE)
    value: str = Field(alias=keys.CELL_VALUE)
    n: int = Field(alias=keys.CELL_PATIENTS)
    dice: float = Field(alias=keys.CELL_DICE)
    hd95_mm: float | None = Field(alias=keys.CELL_HD95_MM)
    n_hd95: int | None = Field(alias=keys.CELL_HD95_PATIENTS)


class SiteResultMeta(_Meta):
    """What a site sends with a train or validate result (docs/privacy.md lists each key and
    its protection). Every field is optional: see the module docstring for absent vs None.

    Fields in the order a training round gives them: a validation's metrics, then training's
    count and accounting, then a refusal, steps and epsilon, then the ledger and the un-noised
    values of a non-DP job.
    """

    model_config = ConfigDict(extra="ignore")  # FLARE adds its own keys to every result

    val_dice: float | None = Field(None, alias=keys.VAL_DICE)
    val_hd95_mm: float | None = Field(None, alias=keys.VAL_HD95_MM)
    val_hd95_missing: int | None = Field(None, alias=keys.VAL_HD95_MISSING)
    val_lesion_volumes: int | None = Field(None, alias=keys.VAL_LESION_VOLUMES)
    val_patients: int | None = Field(None, alias=keys.VAL_PATIENTS)
    subgroups: list[SubgroupCell] | None = Field(None, alias=keys.SUBGROUPS)
    model_owner: str | None = Field(None, alias=keys.MODEL_OWNER)
    num_patients: int | None = Field(None, alias=keys.NUM_PATIENTS)
    delta: float | None = Field(None, alias=keys.DELTA)
    local_model_shareable: bool | None = Field(None, alias=keys.LOCAL_MODEL_SHAREABLE)
    noise_multiplier: float | None = Field(None, alias=keys.NOISE_MULTIPLIER)
    sample_rate: float | None = Field(None, alias=keys.SAMPLE_RATE)
    count_noise_std: float | None = Field(None, alias=keys.COUNT_NOISE_STD)
    accountant: str | None = Field(None, alias=keys.ACCOUNTANT)
    refused: str | None = Field(None, alias=keys.REFUSED)
    num_steps: int | None = Field(None, alias=keys.NUM_STEPS)
    epsilon: float | None = Field(None, alias=keys.EPSILON)
    budget_left: float | None = Field(None, alias=keys.BUDGET_LEFT)
    ledger_entries: int | None = Field(None, alias=keys.LEDGER_ENTRIES)
    ledger_head: str | None = Field(None, alias=keys.LEDGER_HEAD)
    train_loss: float | None = Field(None, alias=keys.TRAIN_LOSS)
    elapsed_s: float | None = Field(None, alias=keys.ELAPSED_S)

    @property
    def owner(self) -> str | None:
        """Whose model the result is about; the global model when the site did not say."""
        return _owner(self)

    def updated(self, **fields: Any) -> SiteResultMeta:
        """A copy with ``fields`` given (validated; they are sent even when None), like
        ``dict.update``: a field given before keeps its place, a new one goes last."""
        given = {name: getattr(self, name) for name in self._order}
        given |= {name: getattr(self, name) for name in self.model_fields_set - set(given)}
        return type(self).model_validate({**given, **fields}, by_name=True)

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], *, source: str = "a site") -> SiteResultMeta:
        """Validate a received result's metadata; ``MessageError`` if a value is malformed."""
        return cls._parse(meta, f"{source}'s result")


class TaskMeta(_Meta):
    """What the server sends with a task: the 0-based round (== rounds for the final
    validation) and, for a validate task, whose model it is (``keys.GLOBAL_MODEL`` or a site)."""

    model_config = ConfigDict(extra="ignore")  # FLARE adds its own keys to every task

    round: int | None = Field(None, alias=keys.ROUND)
    model_owner: str | None = Field(None, alias=keys.MODEL_OWNER)

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> TaskMeta:
        """Validate a received task's metadata; ``MessageError`` if a value is malformed."""
        return cls._parse(meta, "the server's task")

    @property
    def owner(self) -> str | None:
        """Whose model a validate task carries; the global model when the server did not say."""
        return _owner(self)


def _owner(record: SiteResultMeta | TaskMeta) -> str | None:
    if "model_owner" in record.model_fields_set:
        return record.model_owner
    return keys.GLOBAL_MODEL


def result_site(meta: Mapping[str, Any]) -> str | None:
    """The participant that sent a result, as FLARE itself records it (the site cannot forge
    it); None when absent."""
    return meta.get(keys.RESULT_SITE)
