"""The site's own config: relative paths are relative to the file, and the private folder
(cache, quarantine lists) lies outside the FLARE workspace."""

import os

import pytest

from site_app.site_config import SiteConfigError, load_site_config, site_private_dir


def test_relative_paths_are_relative_to_the_config_file_not_the_working_directory(
    tmp_path, monkeypatch
):
    local = tmp_path / "kit" / "local"
    local.mkdir(parents=True)
    config_file = local / "fedseg_site.yaml"
    config_file.write_text(
        "data_dir: ../../dicom\ncache_dir: cache\nprivate_dir: ../../private\n"
        "ledger: ledger/eps.jsonl\nsigning_key: keys/site.pem\n"
    )
    monkeypatch.chdir(tmp_path / "kit")  # anywhere but local/
    config = load_site_config(config_file)
    assert config.data_dir == (tmp_path / "dicom").resolve()
    assert config.cache_dir == (local / "cache").resolve()
    assert config.private_dir == (tmp_path / "private").resolve()
    assert config.ledger == (local / "ledger" / "eps.jsonl").resolve()
    assert config.signing_key == (local / "keys" / "site.pem").resolve()
    assert os.getcwd() == str(tmp_path / "kit")


def test_the_private_folder_is_outside_the_workspace_by_default(tmp_path):
    kit = tmp_path / "prod_00" / "site-1"
    (kit / "local").mkdir(parents=True)
    (kit / "local" / "fedseg_site.yaml").write_text("data_dir: /data\n")
    private = site_private_dir(load_site_config(kit / "local" / "fedseg_site.yaml"), kit)
    assert private == tmp_path / "prod_00" / "site-1-private"
    assert not private.is_relative_to(kit)


def test_the_ledger_and_key_named_relatively_land_beside_the_config_wherever_the_site_runs(
    tmp_path, monkeypatch
):
    """The config is loaded by a relative path from one folder and used from another, as a
    site process started by a script does: the ledger and its key stay under local/."""
    from site_app.ledger import EpsilonLedger, generate_site_key

    local = tmp_path / "kit" / "local"
    local.mkdir(parents=True)
    (local / "fedseg_site.yaml").write_text(
        "data_dir: dicom\ncache_dir: cache\nledger: eps.jsonl\nsigning_key: site.pem\n"
    )
    monkeypatch.chdir(tmp_path / "kit")
    config = load_site_config("local/fedseg_site.yaml")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    assert all(
        path.is_absolute()
        for path in (config.data_dir, config.cache_dir, config.ledger, config.signing_key)
    )
    generate_site_key(config.signing_key)
    EpsilonLedger.open(path=config.ledger, key_path=config.signing_key).append(
        job="job-a",
        round=0,
        steps=1,
        sample_rate=0.5,
        noise_multiplier=1.0,
        accountant="rdp",
        epsilon_after=0.5,
        delta=1e-5,
    )
    assert sorted(p.name for p in local.iterdir()) == [
        "eps.jsonl",
        "eps.jsonl.head",
        "eps.jsonl.lock",
        "fedseg_site.yaml",
        "site.pem",
    ]
    assert list(elsewhere.iterdir()) == []
    assert config.cache_dir == (local / "cache").resolve()


def test_a_bad_field_names_the_file_the_field_what_was_expected_and_what_was_found(tmp_path):
    path = tmp_path / "fedseg_site.yaml"
    path.write_text("data_dir: /data\nnum_threads: -2\ncache_dri: cache\n")
    with pytest.raises(SiteConfigError) as error:
        load_site_config(path)
    lines = str(error.value).splitlines()
    assert lines == [
        f"{path}: 2 problem(s) in the site config:",
        "  - num_threads: Input should be greater than or equal to 0, got -2",
        "  - cache_dri: unknown key (check the spelling)",
        f"  fix the field(s) above in {path}",
    ]
