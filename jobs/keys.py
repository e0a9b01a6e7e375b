"""Names of everything that crosses the wire between sites and server, in one place.

Both sides import these; no key is spelled as a string literal anywhere else.
"""

TASK_TRAIN = "train"
TASK_VALIDATE = "validate"

# FLModel.meta keys sent by a site with its result (plain numbers and strings, no patient data).
NUM_PATIENTS = "num_patients"  # aggregation weight: training patients at the site
NUM_STEPS = "num_steps"  # optimizer steps taken this round
TRAIN_LOSS = "train_loss"
VAL_DICE = "val_dice"  # Dice of the model the site *received*, on its held-out patients
VAL_PATIENTS = "val_patients"
EPSILON = "epsilon"  # privacy spent so far in this job, after this round (None when DP is off)
DELTA = "delta"
NOISE_MULTIPLIER = "noise_multiplier"
BUDGET_LEFT = "budget_left"  # the site's total epsilon budget minus all jobs' spend (if it has one)
REFUSED = "refused"  # present (a plain-language reason) when the site declines the round
ELAPSED_S = "elapsed_s"

# FLModel.meta keys sent by the server with a task.
ROUND = "round"  # 0-based round index; == rounds for the final validation
