"""The JobSpec: one YAML file that drives the simulator, a POC and production unchanged.

Validated once at load; unknown keys and bad values are rejected with an error that names the
field, what was expected, what was found and where to fix it.
"""

from __future__ import annotations

import math
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from jobs.validation_errors import format_validation_error

__all__ = [
    "JobSpec",
    "JobSpecError",
    "ModelInit",
    "ModelSpec",
    "Network",
    "Optimizer",
    "PrivacySpec",
    "TrackingSpec",
    "load_spec",
    "parse_spec",
]

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]


class JobSpecError(ValueError):
    """A job spec that cannot be used; the message lists every problem with its field path."""


class Network(StrEnum):
    UNET = "unet"
    SEGRESNET = "segresnet"


class Norm(StrEnum):
    # BatchNorm is deliberately absent: it mixes samples in a batch, which per-sample DP forbids.
    INSTANCE = "instance"


class Optimizer(StrEnum):
    SGD = "sgd"
    ADAM = "adam"


class LrSchedule(StrEnum):
    CONSTANT = "constant"
    COSINE = "cosine"


class Accountant(StrEnum):
    RDP = "rdp"
    PRV = "prv"


class GradSampleMode(StrEnum):
    HOOKS = "hooks"
    FUNCTORCH = "functorch"
    GROUPED = "grouped"
    """Opacus's hooks with fedseg's grouped-convolution samplers (site_app.dp_samplers.GROUPED)."""


class TransferDtype(StrEnum):
    """Precision of the weights a site sends to the server (the server averages in float64)."""

    FLOAT32 = "float32"
    FLOAT16 = "float16"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


MODEL_FILE_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$"
"""A weights file's name: one plain file name, no folder, no ``..``, no FLARE ``{...}``."""


class ModelInit(_Strict):
    """Saved weights the job starts from (e.g. a model pretrained on public data), instead of a
    random initialisation. Read by whoever starts the job: the server (from its model store,
    ``<server workspace>/local/models/``), or the simulator and baselines (from the spec's
    folder); never by a site, which always trains from the global model it receives."""

    file: Annotated[str, Field(pattern=MODEL_FILE_PATTERN)]
    """File name in the model store: a torch state dict (``torch.save``) of this network."""
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    """sha256 of the file (lower-case hex): a file with another hash is refused."""


class ModelSpec(_Strict):
    """The 3D segmentation network; built identically on server and sites by jobs.model."""

    network: Network = Network.UNET
    channels: tuple[PositiveInt, ...] = (8, 16, 32, 64)
    strides: tuple[PositiveInt, ...] = (2, 2, 2)
    num_res_units: Annotated[int, Field(ge=0)] = 1
    norm: Norm = Norm.INSTANCE
    roi_size: tuple[PositiveInt, PositiveInt, PositiveInt] = (32, 32, 32)
    """Training crop and sliding-window size in voxels (rows, cols, slices)."""
    init: ModelInit | None = None
    """Start from these weights; null = random weights from ``training.seed``."""

    @model_validator(mode="after")
    def _check_unet_shape(self) -> Self:
        if self.network == Network.UNET and len(self.strides) != len(self.channels) - 1:
            raise ValueError(
                f"model.strides: expected {len(self.channels) - 1} strides for "
                f"{len(self.channels)} channels, got {len(self.strides)}"
            )
        factor = (
            math.prod(self.strides)
            if self.network == Network.UNET
            else 2 ** (len(self.channels) - 1)
        )
        for size in self.roi_size:
            if size % factor:
                raise ValueError(
                    f"model.roi_size: every size must be divisible by {factor} (the network's "
                    f"total downsampling), got {list(self.roi_size)}"
                )
        return self


class DataSpec(_Strict):
    """How each site turns its DICOM into training tensors (same for every site)."""

    target_spacing_mm: tuple[PositiveFloat, PositiveFloat, PositiveFloat] = (5.0, 5.0, 5.0)
    """Voxel spacing after resampling, mm (rows, cols, slices)."""
    hu_window: tuple[float, float] = (-200.0, 300.0)
    """Hounsfield units mapped to [0, 1]; values outside are clipped."""
    val_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.25
    """Share of each site's patients held out for validation (split by patient)."""
    lesion_crop_fraction: Annotated[float, Field(ge=0, le=1)] = 0.75
    """Share of training crops centred on a lesion voxel (when the volume has one)."""

    @model_validator(mode="after")
    def _check_window(self) -> Self:
        low, high = self.hu_window
        if low >= high:
            raise ValueError(
                f"data.hu_window: expected [low, high] with low < high, got {[low, high]}"
            )
        return self


class TrainingSpec(_Strict):
    rounds: PositiveInt = 3
    local_epochs: PositiveInt = 1
    """Passes over the site's patients per round; one pass = ceil(patients / batch_size) steps."""
    batch_size: PositiveInt = 4
    """Patients per step; with DP, the expected number: Poisson-sampled at rate
    1 / ceil(released count / batch_size), the released count being the site's DP-noised one."""
    lr: PositiveFloat = 1e-3
    lr_schedule: LrSchedule = LrSchedule.CONSTANT
    """constant, or cosine: the learning rate falls from ``lr`` towards 0 over the job's
    ``rounds x local_epochs`` epochs (set per epoch, from the round number every site knows)."""
    optimizer: Optimizer = Optimizer.ADAM
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    """SGD momentum (ignored by Adam)."""
    seed: int | None = 0
    """Seeds data splits, crops and (simulation only) DP noise. null = unseeded."""
    trainable: tuple[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.*?\[\]-]+$")], ...] = ("*",)
    """Which parameters train, as patterns over their names (``fnmatch``, e.g. ``"*.bias"`` or
    ``"model.2.*"``; ``fedseg spec check`` lists the names). The others stay as received: with
    DP they get no noise and do not count towards the noise a site must add. ``["*"]`` = all."""
    crops_per_patient: Annotated[int, Field(ge=1, le=16)] = 1
    """Random crops of each sampled patient per step (augmentation multiplicity). With DP their
    gradients are averaged *before* the one per-patient clip, so the patient stays the unit and
    its contribution stays bounded by ``privacy.max_grad_norm``."""


class PrivacySpec(_Strict):
    """Differential privacy, measured per patient, accounted across all rounds of the job."""

    enabled: bool = True
    noise_multiplier: PositiveFloat | None = None
    target_epsilon: PositiveFloat | None = None
    """Epsilon for the whole job (all rounds x local epochs); the noise is derived from it once."""
    max_grad_norm: PositiveFloat = 1.0
    """Per-patient gradient clipping bound (L2)."""
    count_noise_std: Annotated[float, Field(ge=1.0)] = 10.0
    """Std (patients) of the Gaussian noise on the patient count a site publishes (the FedAvg
    weight, and what its sampling rate and steps are derived from); accounted in the job's
    epsilon. The exact count never leaves the site."""
    delta: Annotated[float, Field(gt=0, lt=1)] = 1e-5
    accountant: Accountant = Accountant.RDP
    grad_sample_mode: GradSampleMode = GradSampleMode.GROUPED
    """How Opacus computes per-patient gradients; all modes clip and add noise identically
    (grouped measured fastest: docs/performance.md)."""

    @model_validator(mode="after")
    def _one_noise_source(self) -> Self:
        if not self.enabled:
            return self
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError(
                "privacy: set exactly one of noise_multiplier or target_epsilon when "
                "privacy.enabled is true "
                f"(got noise_multiplier={self.noise_multiplier}, "
                f"target_epsilon={self.target_epsilon})"
            )
        return self


class FederationSpec(_Strict):
    min_clients: PositiveInt = 2
    """Rounds with fewer site updates than this stop the job."""
    round_timeout_s: Annotated[int, Field(ge=0)] = 0
    """Seconds to wait for site updates each round; 0 waits indefinitely."""
    transfer_dtype: TransferDtype = TransferDtype.FLOAT32
    """float16 halves the bytes a site sends per round, at a small cost in Dice
    (docs/performance.md); the global model always travels in float32."""
    server_lr: Annotated[float, Field(gt=0, le=5)] = 1.0
    """Server step size on the round's average update (FedAvgM): the global model moves
    ``server_lr`` times the way from itself to the sites' average. 1 is plain FedAvg; with the
    demo recipe 2 gave the best DP model of 1 to 3, 2.5 fell back and 3 diverged
    (docs/researcher.md)."""
    server_momentum: Annotated[float, Field(ge=0, lt=1)] = 0.0
    """Server momentum on those average updates (FedAvgM); 0 is none."""


class EvaluationSpec(_Strict):
    min_subgroup_size: Annotated[int, Field(ge=5)] = 5
    """Subgroup cells (sex, age band, vendor, slice thickness) with fewer held-out patients than
    this are never sent by a site. 5 is the floor: a job may only raise it."""
    cross_site: bool = True
    """Evaluate every site's last local model at every site after training (sites x sites
    validation tasks: the larger part of a many-site simulation's wall time, see
    docs/performance.md); false keeps only the final global model's evaluation."""


class TrackingSpec(_Strict):
    """Experiment tracking, recorded at the server from the aggregate metrics the sites already
    send (validation Dice and HD95, epsilon). TensorBoard files are always written. Where a
    store lives is the server's choice (``server_app.mlflow_tracking``), never the job's."""

    mlflow: bool = False
    """Also record the job in the server's MLflow store: one run per site (its metrics per
    round), a federation run (mean Dice per round, the spec as parameters, the signed final
    model as an artifact)."""

    @model_validator(mode="before")
    @classmethod
    def _a_mapping(cls, data: object) -> object:
        if data == "mlflow":  # the short form: `tracking: mlflow`
            return {"mlflow": True}
        if not isinstance(data, dict | TrackingSpec):
            raise ValueError(
                "tracking: expected `mlflow` or a mapping of trackers to switch on, e.g. "
                f"`tracking: {{mlflow: true}}`, got {data!r}"
            )
        return data


class JobSpec(_Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
    model: ModelSpec = ModelSpec()
    data: DataSpec = DataSpec()
    training: TrainingSpec = TrainingSpec()
    privacy: PrivacySpec = PrivacySpec(noise_multiplier=1.0)
    federation: FederationSpec = FederationSpec()
    evaluation: EvaluationSpec = EvaluationSpec()
    tracking: TrackingSpec = TrackingSpec()

    def to_plain(self) -> dict:
        """The spec as plain JSON-able data (what travels inside a FLARE job config)."""
        return self.model_dump(mode="json")


_UNKNOWN_KEY = "unknown key (check the spelling; see jobs/specs/demo.yaml for every key)"


def parse_spec(data: object, *, source: str = "job spec") -> JobSpec:
    """Validate plain data (e.g. parsed YAML) into a JobSpec; raise JobSpecError naming fields."""
    if not isinstance(data, dict):
        raise JobSpecError(
            f"{source}: expected a mapping of sections (name, model, training, ...), "
            f"got {type(data).__name__}"
        )
    try:
        return JobSpec.model_validate(data)
    except ValidationError as error:
        raise JobSpecError(
            format_validation_error(
                error,
                source,
                document="the job spec",
                unknown_key=_UNKNOWN_KEY,
            )
        ) from None


def load_spec(path: Path | str) -> JobSpec:
    """Read and validate a JobSpec YAML file."""
    path = Path(path)
    if not path.is_file():
        raise JobSpecError(
            f"{path}: job spec not found; pass the path to a YAML spec, e.g. jobs/specs/demo.yaml"
        )
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise JobSpecError(f"{path}: not valid YAML ({error}); fix the syntax") from None
    return parse_spec(data, source=str(path))
