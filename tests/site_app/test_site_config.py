"""The site's own config: relative paths are relative to the file, and the private folder
(cache, quarantine lists) lies outside the FLARE workspace."""

import os

from site_app.site_config import load_site_config, site_private_dir


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
