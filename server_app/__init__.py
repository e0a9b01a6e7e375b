"""Everything that runs at the aggregator: weighted FedAvg, model selection and saving, reports.

Nothing here imports ``site_app``: the two sides meet only through FLARE messages and the JobSpec.
"""
