import hashlib

import torch

from jobs.seeds import derived_seed


def test_a_derived_seed_is_the_recorded_formula_so_seeded_runs_keep_their_numbers():
    # The formula every seeded run so far was made with (site and pooled-baseline streams).
    digest = hashlib.sha256(b"7:site-2:sampler").digest()
    assert derived_seed(7, "site-2", "sampler") == int.from_bytes(digest[:8], "little") >> 1


def test_derived_seeds_differ_by_purpose_and_fit_a_torch_generator():
    seeds = {derived_seed(0, site, purpose) for site in ("a", "b") for purpose in ("x", "y")}
    assert len(seeds) == 4
    for seed in seeds:
        assert 0 <= seed < 2**63
        torch.Generator().manual_seed(seed)
