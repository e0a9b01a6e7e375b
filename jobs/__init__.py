"""The contract every side shares: JobSpec, model factory, message keys, spec -> FLARE job."""
