"""Names of everything that crosses the wire between sites and server, in one place.

Both sides import these; no key is spelled as a string literal anywhere else. The metadata
itself is built and read through the typed records of ``jobs.messages``.
"""

TASK_TRAIN = "train"
TASK_VALIDATE = "validate"

# Set on every result by FLARE's own BaseModelController (not by the site, which cannot forge it):
# the name of the participant that sent it. FLARE spells it as a literal too.
RESULT_SITE = "client_name"

# FLModel.meta keys sent by a site with its result (plain numbers and strings, no patient data).
NUM_PATIENTS = "num_patients"  # aggregation weight: training patients (DP: the noised count)
NUM_STEPS = "num_steps"  # optimizer steps taken this round
TRAIN_LOSS = "train_loss"  # only without DP (computed on training patients, un-noised)
VAL_DICE = "val_dice"  # Dice of the model the site *received*, on its held-out patients
VAL_PATIENTS = "val_patients"
VAL_HD95_MM = "val_hd95_mm"  # mean 95th-percentile Hausdorff distance (mm) where it is defined
VAL_HD95_MISSING = "val_hd95_missing"  # lesion volumes with an empty prediction (HD95 undefined)
VAL_LESION_VOLUMES = "val_lesion_volumes"  # held-out volumes with a lesion (what Dice averages)
SUBGROUPS = "subgroups"  # final global model only: list of subgroup cells, small ones never sent
EPSILON = "epsilon"  # privacy spent so far in this job, after this round (None when DP is off)
DELTA = "delta"
NOISE_MULTIPLIER = "noise_multiplier"  # DP-SGD's, for the whole job
SAMPLE_RATE = "sample_rate"  # DP-SGD's Poisson rate (1 / steps per epoch)
COUNT_NOISE_STD = "count_noise_std"  # noise of the released patient count (NUM_PATIENTS)
ACCOUNTANT = "accountant"  # rdp or prv: how EPSILON was computed
LEDGER_ENTRIES = "ledger_entries"  # entries in the site's epsilon ledger after this round
LEDGER_HEAD = "ledger_head"  # first 16 hex digits of its last entry's hash
BUDGET_LEFT = "budget_left"  # the site's total epsilon budget minus all jobs' spend (if it has one)
REFUSED = "refused"  # present (a plain-language reason) when the site declines the round
ELAPSED_S = "elapsed_s"  # only without DP (a step's time grows with its batch)
LOCAL_MODEL_SHAREABLE = "local_model_shareable"  # the site allows its update to go to other sites

# FLModel.meta keys sent by the server with a task.
ROUND = "round"  # 0-based round index; == rounds for the final validation
MODEL_OWNER = "model_owner"  # validate task: GLOBAL_MODEL or the site whose local model this is
GLOBAL_MODEL = "global"

# One subgroup cell (an item of SUBGROUPS): only cells with at least the job's
# evaluation.min_subgroup_size patients leave a site.
CELL_ATTRIBUTE = "attribute"
CELL_VALUE = "value"
CELL_PATIENTS = "n"  # held-out patients with a lesion in the cell (those Dice is computed over)
CELL_DICE = "dice"
CELL_HD95_MM = "hd95_mm"  # None when fewer than the minimum patients have a defined HD95
CELL_HD95_PATIENTS = "n_hd95"

SEX = "sex"
AGE_BAND = "age_band"
VENDOR = "vendor"
SLICE_THICKNESS_BAND = "slice_thickness_band"
UNKNOWN = "unknown"  # the header did not say
SUBGROUP_VALUES: dict[str, tuple[str, ...]] = {
    SEX: ("female", "male", "other", UNKNOWN),
    AGE_BAND: ("<40", "40-59", "60-79", "80+", UNKNOWN),
    SLICE_THICKNESS_BAND: ("<=1.5 mm", "1.5-3 mm", "3-5 mm", ">5 mm", UNKNOWN),
    VENDOR: (),  # open set: normalised Manufacturer names (see site_app.subgroups.vendor_group)
}
"""Every subgroup attribute with its fixed values, so the report can show a cell a site did not
send (too few patients) as suppressed."""

STATUS_COMMAND = "fedseg.status"
"""FLARE app command a running job's server controller answers with its history so far."""
