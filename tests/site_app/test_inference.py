"""`fedseg site infer`: a verified model segments every valid CT series into one DICOM SEG.

A tiny network (the suite's tiny spec) is signed as the simulator signs; the data is the suite's
tiny simulated federation, broken inputs included. SEGs are read back with
``reading_validation_mode = RAISE``, checked by dciodvfy, and stored in a real Orthanc.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread

from fedseg.cli import main
from jobs.model import build_network
from server_app.model_manifest import (
    Signer,
    SignerKind,
    manifest_paths,
    simulation_signer,
    write_signed_manifest,
)
from site_app.ct_pixels import decode_hu_volume
from site_app.dataset import prepare_volume
from site_app.dicom_series import series_key
from site_app.inference import (
    InferenceError,
    find_series,
    load_model,
    predict_mask,
    prepared_image,
)
from site_app.ingestion import ingest_site
from site_app.quarantine import read_quarantine
from site_app.seg_writer import ModelProvenance, build_seg
from tests.conftest import tiny_spec
from tests.site_app.test_pacs_import import PASSWORD, PASSWORD_ENV, USER, _upload, running_orthanc

SPEC = tiny_spec()


def _results(folder: Path, signer: Signer | None = None) -> Path:
    """A results folder as `fedseg simulate run` leaves it: R/models/final_model.pt with its
    signed manifest, and R/history.json holding the spec. Returns the model file."""
    models = folder / "models"
    models.mkdir(parents=True)
    torch.manual_seed(0)
    model = models / "final_model.pt"
    torch.save(build_network(SPEC.model).state_dict(), model)
    write_signed_manifest(
        model,
        spec=SPEC.to_plain(),
        contributing_sites=["site-1"],
        epsilon_per_site={"site-1": 3.0},
        rounds_completed=2,
        signer=signer or simulation_signer(),
    )
    (folder / "history.json").write_text(json.dumps({"spec": SPEC.to_plain()}))
    return model


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return _results(tmp_path_factory.mktemp("results"))


@pytest.fixture(scope="module")
def inferred(tiny_federation, model, tmp_path_factory) -> tuple[Path, Path, str]:
    """``fedseg site infer`` over site-1 (3 good patients + the simulator's broken inputs)."""
    out = tmp_path_factory.mktemp("inferred") / "segs"
    site = tiny_federation / "site-1"
    with pytest.MonkeyPatch.context() as patch:
        outputs = []
        patch.setattr("fedseg.infer_cli.console.print", lambda *a, **k: outputs.append(str(a)))
        status = main(
            ["site", "infer", "--model", str(model), "--data", str(site), "--out", str(out)]
        )
    assert status == 0
    return site, out, "\n".join(outputs)


def _key(geometry) -> str:
    return series_key(geometry.slices[0].series_uid)


def _site_manifest(federation: Path) -> dict:
    manifest = json.loads((federation / "manifest.json").read_text())
    return next(site for site in manifest["sites"] if site["name"] == "site-1")


# --- the model is checked before any data is read ------------------------------------------------


def _flip_one_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _provisioned_looking_signer() -> Signer:
    """A key with a certificate that *claims* to be a provisioned server: anyone can make one."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "server1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return Signer(private_key=key, certificate=certificate, kind=SignerKind.PROVISIONED)


def _tamper_model(model: Path) -> None:
    _flip_one_byte(model, model.stat().st_size // 2)


def _tamper_manifest(model: Path) -> None:
    manifest, _ = manifest_paths(model)
    manifest.write_text(
        manifest.read_text().replace('"rounds_completed": 2', '"rounds_completed": 3')
    )


def _tamper_signature(model: Path) -> None:
    _, signature = manifest_paths(model)
    raw = bytearray(base64.b64decode(signature.read_text()))
    raw[10] ^= 0x01
    signature.write_text(base64.b64encode(bytes(raw)).decode())


@pytest.mark.parametrize(
    ("tamper", "expected"),
    [
        (_tamper_model, "weights: sha256"),
        (_tamper_manifest, "signature: does not match"),
        (_tamper_signature, "signature: does not match"),
    ],
    ids=["one byte of the weights", "the manifest", "the signature"],
)
def test_a_changed_model_is_refused_before_any_data_is_read(tmp_path, capsys, tamper, expected):
    model = _results(tmp_path / "results")
    tamper(model)
    out = tmp_path / "out"
    # A data folder that does not exist: reading it would fail with exit 2, not the refusal.
    argv = ["site", "infer", "--model", str(model), "--data", str(tmp_path / "nowhere")]
    assert main([*argv, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "refused" in err and expected in err and "no data was read" in err
    assert not out.exists()


def test_a_model_claiming_a_provisioned_signer_needs_the_sites_kit(tmp_path, capsys):
    model = _results(tmp_path / "results", signer=_provisioned_looking_signer())
    argv = ["site", "infer", "--model", str(model), "--data", str(tmp_path / "nowhere")]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 1
    assert "no root CA was given" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_spec_other_than_the_training_spec_is_refused(tmp_path, capsys):
    model = _results(tmp_path / "results")
    other = tmp_path / "other.yaml"
    other.write_text(json.dumps({**SPEC.to_plain(), "name": "another-job"}))
    argv = ["site", "infer", "--model", str(model), "--spec", str(other)]
    assert main([*argv, "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 1
    assert "spec: sha256" in capsys.readouterr().err


def test_weights_changed_after_verification_are_not_loaded(model, tmp_path):
    copy = tmp_path / "final_model.pt"
    shutil.copyfile(model, copy)
    provenance = ModelProvenance(
        job="tiny", model_sha256="0" * 64, manifest_sha256="1" * 64, signer=None
    )
    with pytest.raises(InferenceError, match="changed after verification"):
        load_model(copy, spec=SPEC, provenance=provenance)


# --- the prediction ------------------------------------------------------------------------------


def test_the_network_sees_the_image_training_prepares(tiny_federation):
    site = tiny_federation / "site-1"
    volumes = {v.series_key: v for p in ingest_site(site).patients for v in p.volumes}
    scan = find_series(site)
    assert volumes and len(scan.series) == len(volumes)  # unlabelled series would count too
    for geometry in scan.series:
        volume = volumes[_key(geometry)]
        ours = prepared_image(np.asarray(decode_hu_volume(site, geometry)), geometry, SPEC)
        np.testing.assert_array_equal(ours.numpy(), prepare_volume(volume, SPEC.data).image)


class _BrightIsLesion(torch.nn.Module):
    """Logits that call every windowed voxel above 0.5 a lesion: the mask is a known shape."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 40.0 * (x - 0.5)


def test_the_mask_comes_back_onto_the_series_grid_unflipped(tiny_federation):
    site = tiny_federation / "site-1"
    geometry = find_series(site).series[0]
    rows, cols, slices = geometry.slices[0].rows, geometry.slices[0].columns, len(geometry.slices)
    truth = np.zeros((rows, cols, slices), dtype=bool)
    truth[: rows // 2, : cols // 3, slices // 4 :] = True  # a block against one corner only
    image_hu = np.where(truth, 1000.0, -1000.0).astype(np.float32)
    mask = predict_mask(_BrightIsLesion(), image_hu, geometry, SPEC)
    assert mask.shape == (rows, cols, slices) and mask.dtype == np.uint8
    dice = 2 * (mask.astype(bool) & truth).sum() / (mask.sum() + truth.sum())
    assert dice > 0.9, dice  # a flipped axis would put the block in another corner


def test_a_mask_without_lesion_still_gives_a_seg_of_every_slice(tiny_federation):
    site = tiny_federation / "site-1"
    geometry = find_series(site).series[0]
    sources = [dcmread(site / h.path, stop_before_pixels=True) for h in geometry.slices]
    shape = (geometry.slices[0].rows, geometry.slices[0].columns, len(geometry.slices))
    provenance = ModelProvenance(
        job="tiny", model_sha256="a" * 64, manifest_sha256="b" * 64, signer=None
    )
    seg = build_seg(source_images=sources, mask=np.zeros(shape, np.uint8), provenance=provenance)
    assert int(seg.NumberOfFrames) == len(sources)
    with pytest.raises(ValueError, match="expected shape"):
        build_seg(source_images=sources, mask=np.zeros((*shape[:2], 1)), provenance=provenance)


# --- the command over a folder --------------------------------------------------------------------


def test_every_good_series_gets_one_seg_and_the_broken_one_is_quarantined(
    tiny_federation, inferred
):
    _site, out, _ = inferred
    profile = _site_manifest(tiny_federation)
    good = {case["series_key"] for case in profile["cases"]}
    segs = sorted(out.glob("*.seg.dcm"))
    assert {p.name.removesuffix(".seg.dcm") for p in segs} == good
    quarantine = read_quarantine(out / "quarantine.json")
    broken = {(b["series_key"], b["expected_reason"]) for b in profile["broken_inputs"]}
    found = {(e.series_key, e.reason.value) for e in quarantine}
    for key, reason in broken:
        if reason in ("missing_slices", "unsupported_modality"):
            assert (key, reason) in found  # the bad series are named, and the others still done


def test_the_seg_sits_on_the_source_series_and_names_the_model(model, inferred):
    site, out, _ = inferred
    pydicom.config.settings.reading_validation_mode = pydicom.config.RAISE
    try:
        by_key = {_key(g): g for g in find_series(site).series}
        manifest, _ = manifest_paths(model)
        for path in sorted(out.glob("*.seg.dcm")):
            geometry = by_key[path.name.removesuffix(".seg.dcm")]
            sources = [dcmread(site / h.path, stop_before_pixels=True) for h in geometry.slices]
            seg = hd.seg.segread(path)
            assert seg.SegmentationType == "BINARY" and seg.Modality == "SEG"
            assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
            assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
            assert seg.PatientID == sources[0].PatientID
            assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID
            assert (seg.Rows, seg.Columns) == (sources[0].Rows, sources[0].Columns)
            referenced = [uid for _, _, uid in seg.get_source_image_uids()]
            assert set(referenced) <= {s.SOPInstanceUID for s in sources}
            shared = seg.SharedFunctionalGroupsSequence[0]
            assert list(shared.PixelMeasuresSequence[0].PixelSpacing) == list(
                sources[0].PixelSpacing
            )
            by_sop = {s.SOPInstanceUID: s for s in sources}
            frames = seg.PerFrameFunctionalGroupsSequence
            assert 1 <= len(frames) == int(seg.NumberOfFrames) <= len(sources)
            for frame in frames:
                source = by_sop[
                    frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
                ]
                position = frame.PlanePositionSequence[0].ImagePositionPatient
                assert list(position) == list(source.ImagePositionPatient)
            segment = seg.SegmentSequence[0]
            assert segment.SegmentLabel == "lesion" and segment.SegmentAlgorithmType == "AUTOMATIC"
            algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
            assert algorithm.AlgorithmName == SPEC.name
            parameters = dict(item.split("=") for item in algorithm.AlgorithmParameters.split(","))
            assert parameters["model_sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
            assert (
                parameters["manifest_sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
            )
            assert parameters["signer"] == "simulation-unproven"
            mask = seg.get_pixels_by_source_instance(
                source_sop_instance_uids=[s.SOPInstanceUID for s in sources],
                assert_missing_frames_are_empty=True,
            )
            assert mask.shape[:3] == (len(sources), sources[0].Rows, sources[0].Columns)
    finally:
        pydicom.config.settings.reading_validation_mode = pydicom.config.WARN


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed")
def test_dciodvfy_finds_no_errors_in_the_segs(inferred):
    _, out, _ = inferred
    for path in sorted(out.glob("*.seg.dcm")):
        result = subprocess.run(
            ["dciodvfy", str(path)], capture_output=True, text=True, check=False
        )
        errors = [line for line in (result.stdout + result.stderr).splitlines() if "Error" in line]
        assert errors == [], f"{path.name}: {errors}"


def test_what_is_printed_names_series_by_hash_only(inferred):
    site, _, printed = inferred
    secrets = set()
    for path in site.rglob("*.dcm"):
        try:
            ds = dcmread(path, stop_before_pixels=True)
        except Exception:
            continue
        for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "SeriesInstanceUID"):
            secrets.add(str(ds.get(keyword, "")))
    secrets.discard("")
    assert "series 1/" in printed and "signer unproven" in printed
    assert not [s for s in secrets if s in printed]


def test_the_out_folder_may_not_lie_inside_the_data(tiny_federation, model, capsys):
    site = tiny_federation / "site-1"
    argv = ["site", "infer", "--model", str(model), "--data", str(site)]
    assert main([*argv, "--out", str(site / "segs")]) == 2
    assert "lies inside the data folder" in capsys.readouterr().err
    assert not (site / "segs").exists()


# --- from the PACS and back ---------------------------------------------------------------------


def test_studies_from_the_pacs_get_segs_stored_back_and_read_again(
    tiny_federation, model, tmp_path, monkeypatch
):
    site = tiny_federation / "site-1"
    with running_orthanc(tmp_path / "orthanc") as server:
        uploaded = _upload(server, sorted(p for p in site.rglob("*.dcm") if p.parent.name == "CT"))
        assert uploaded
        good = _site_manifest(tiny_federation)["cases"][0]
        first_ct = next((tiny_federation / good["ct_series"]).glob("*.dcm"))
        study = str(dcmread(first_ct, stop_before_pixels=True).StudyInstanceUID)
        monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
        out = tmp_path / "out"
        argv = ["site", "infer", "--model", str(model), "--dicomweb", server.dicomweb]
        argv += ["--study", study, "--out", str(out), "--store"]
        argv += ["--username", USER, "--password-env", PASSWORD_ENV]
        assert main(argv) == 0
        (written,) = out.glob("*.seg.dcm")
        assert written.name == f"{good['series_key']}.seg.dcm"
        sent = dcmread(written, stop_before_pixels=True)

        client = DICOMwebClient(server.dicomweb, session=server.session)
        found = client.search_for_series(
            search_filters={"SeriesInstanceUID": sent.SeriesInstanceUID}
        )
        assert len(found) == 1
        (kept,) = client.retrieve_series(
            study_instance_uid=study, series_instance_uid=sent.SeriesInstanceUID
        )
        seg = hd.seg.Segmentation.from_dataset(kept)
        assert seg.SOPInstanceUID == sent.SOPInstanceUID
        assert int(seg.NumberOfFrames) == int(sent.NumberOfFrames)
        assert seg.SegmentSequence[0].SegmentLabel == "lesion"
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == str(
            dcmread(first_ct, stop_before_pixels=True).SeriesInstanceUID
        )
        assert kept.PixelData == dcmread(written).PixelData


def test_store_needs_the_pacs_it_stores_to(tiny_federation, model, tmp_path, capsys):
    argv = ["site", "infer", "--model", str(model), "--data", str(tiny_federation / "site-1")]
    assert main([*argv, "--out", str(tmp_path / "o"), "--store"]) == 2
    assert "--store sends the SEGs to the PACS named by --dicomweb" in capsys.readouterr().err
