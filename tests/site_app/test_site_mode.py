"""A site decides its own mode and config: only FLARE's simulator, started by fedseg's, is a
simulation; a deployed site reads only its own local/fedseg_site.yaml."""

from pathlib import Path

import pytest

from site_app.site_mode import SIMULATION_SITE_CONFIGS_ENV, decide_site_mode


@pytest.mark.parametrize(
    ("flare_simulator", "environ", "simulation", "config"),
    [
        (True, {SIMULATION_SITE_CONFIGS_ENV: "/sim/configs"}, True, "/sim/configs/site-2.yaml"),
        # Set in a deployed site's environment (by mistake or by anyone): ignored.
        (
            False,
            {SIMULATION_SITE_CONFIGS_ENV: "/sim/configs"},
            False,
            "/kit/local/fedseg_site.yaml",
        ),
        # FLARE's simulator run by hand, not by fedseg's: not a fedseg simulation.
        (True, {}, False, "/kit/local/fedseg_site.yaml"),
        (False, {}, False, "/kit/local/fedseg_site.yaml"),
    ],
)
def test_only_fedseg_s_simulator_makes_a_simulation(flare_simulator, environ, simulation, config):
    mode = decide_site_mode(
        workspace_root=Path("/kit"), site="site-2", flare_simulator=flare_simulator, environ=environ
    )
    assert mode.simulation is simulation
    assert mode.config_path == Path(config)
