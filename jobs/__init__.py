"""The contract every side shares: the JobSpec, the model factory, message keys, spec -> FLARE job."""
