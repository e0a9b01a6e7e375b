"""Every transfer syntax a hospital may send: a CT series in each one decodes to the HU volume of
the same series stored uncompressed (exactly when the syntax is lossless, within a stated
tolerance when it is lossy) and is ingested with its SEG.

Series are the simulator's phantom CT, re-encoded here with pydicom's own encoders (RLE,
JPEG-LS, JPEG 2000; big endian and deflate through pydicom's writer). pydicom cannot encode JPEG
baseline or JPEG lossless: baseline is written with Pillow (libjpeg), and JPEG lossless and
extended frames are taken from pydicom's own test files.
"""

from __future__ import annotations

import datetime
import shutil
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread, dcmwrite
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from simulator.dicom_writer import (
    CtAcquisition,
    Equipment,
    ImageSeries,
    PatientIdentity,
    SeriesGeometry,
    Study,
    deterministic_uid,
    write_ct_series,
    write_lesion_seg,
)
from simulator.phantom import PhantomSpec, make_phantom
from simulator.site_profiles import RescaleConvention
from site_app.ingestion import IngestionResult, ingest_site
from site_app.quarantine import QuarantineReason
from site_app.volumes import LabelledVolume
from tests.site_app import dicom_factory

SHAPE = (32, 32, 12)


@dataclass(frozen=True)
class Encoding:
    """How to re-encode a file, and the largest and mean absolute HU difference the result may
    show against the uncompressed series (0 = exact)."""

    syntax: UID
    max_error_hu: float = 0.0
    mean_error_hu: float = 0.0
    options: tuple[tuple[str, object], ...] = ()


ENCODINGS = {
    "implicit VR little endian": Encoding(ImplicitVRLittleEndian),
    "explicit VR big endian": Encoding(ExplicitVRBigEndian),
    "deflated explicit VR little endian": Encoding(DeflatedExplicitVRLittleEndian),
    "RLE lossless": Encoding(RLELossless),
    "JPEG-LS lossless": Encoding(JPEGLSLossless),
    "JPEG 2000 lossless": Encoding(JPEG2000Lossless),
    # Near-lossless JPEG-LS bounds every stored value's error by jls_error (HU here: slope 1).
    "JPEG-LS near-lossless": Encoding(JPEGLSNearLossless, 2.0, 1.5, (("jls_error", 2),)),
    # JPEG 2000 irreversible at 80 dB PSNR on a phantom with 10 HU noise: the mean error stays
    # below that noise (12-bit unsigned storage loses more than 16-bit signed at one PSNR).
    "JPEG 2000 lossy": Encoding(JPEG2000, 40.0, 8.0, (("j2k_psnr", [80]),)),
}


def _series(rescale: RescaleConvention) -> ImageSeries:
    tag = f"transfer-syntax-{rescale}"
    return ImageSeries(
        patient=PatientIdentity(
            name="CODEC^TEST",
            patient_id="TS-1",
            birth_date=datetime.date(1960, 1, 1),
            sex="M",
            age_years=61,
        ),
        study=Study(
            study_uid=deterministic_uid(tag, "study"),
            frame_of_reference_uid=deterministic_uid(tag, "for"),
            date=datetime.date(2021, 5, 30),
            time=datetime.time(9, 15, 0),
            accession_number="A1",
            study_id="1",
        ),
        equipment=Equipment(manufacturer="SIEMENS", model_name="X", institution_name="H"),
        geometry=SeriesGeometry.centred(
            shape=SHAPE, pixel_spacing_mm=10.0, slice_thickness_mm=2.5, table_z_mm=-300.0
        ),
        series_uid=deterministic_uid(tag, "series"),
        series_number=2,
        description="ABDOMEN",
    )


@pytest.fixture(scope="module", params=list(RescaleConvention), ids=lambda r: r.value)
def reference(request, tmp_path_factory) -> tuple[Path, LabelledVolume]:
    """A phantom CT (Explicit VR Little Endian, each vendor's pixel convention) with its SEG, and
    the volume ingestion makes of it."""
    root = tmp_path_factory.mktemp("reference")
    spec = PhantomSpec(
        rows=SHAPE[0],
        cols=SHAPE[1],
        slices=SHAPE[2],
        pixel_spacing_mm=10.0,
        slice_spacing_mm=2.5,
        noise_sigma_hu=10.0,
        lesion_count=1,
        lesion_radius_mm=(25.0, 35.0),
    )
    phantom = make_phantom(spec, rng=np.random.default_rng(7))
    ct = write_ct_series(
        hu=phantom.hu,
        series=_series(request.param),
        acquisition=CtAcquisition(kvp=120.0, rescale=request.param),
        out_dir=root / "CT",
    )
    write_lesion_seg(
        mask=phantom.lesion_mask,
        source_images=ct.datasets,
        series_uid=deterministic_uid(request.param, "seg"),
        content_datetime=datetime.datetime(2021, 6, 1, 12, 0),
        out_path=root / "SEG" / "seg.dcm",
    )
    (volume,) = _volumes(ingest_site(root))
    assert volume.label.any(), "the phantom should hold a lesion"
    return root, volume


def _volumes(result: IngestionResult) -> list[LabelledVolume]:
    return [volume for patient in result.patients for volume in patient.volumes]


def transcode(source: Path, destination: Path, encoding: Encoding) -> None:
    """Write the image in ``source`` to ``destination`` in ``encoding.syntax`` (same UIDs)."""
    ds = dcmread(source)
    destination.parent.mkdir(parents=True, exist_ok=True)
    if encoding.syntax == ExplicitVRBigEndian:
        stored = ds.pixel_array
        ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
        ds.PixelData = stored.astype(stored.dtype.newbyteorder(">")).tobytes()
        dcmwrite(destination, ds, implicit_vr=False, little_endian=False, enforce_file_format=True)
    elif encoding.syntax in (ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
        ds.file_meta.TransferSyntaxUID = encoding.syntax
        ds.save_as(destination, enforce_file_format=True)
    else:
        ds.compress(encoding.syntax, generate_instance_uid=False, **dict(encoding.options))
        ds.save_as(destination, enforce_file_format=True)


@pytest.mark.parametrize("encoding", ENCODINGS.values(), ids=ENCODINGS.keys())
def test_a_ct_series_in_each_syntax_is_ingested_to_the_same_hu(
    reference, encoding: Encoding, tmp_path: Path
) -> None:
    source_root, expected = reference
    root = tmp_path / "data"
    for path in sorted((source_root / "CT").iterdir()):
        transcode(path, root / "CT" / path.name, encoding)
    shutil.copytree(source_root / "SEG", root / "SEG")
    assert {dcmread(p).file_meta.TransferSyntaxUID for p in (root / "CT").iterdir()} == {
        encoding.syntax
    }

    result = ingest_site(root)

    assert result.quarantine == ()
    (volume,) = _volumes(result)
    np.testing.assert_array_equal(volume.label, expected.label)
    assert (volume.spacing_mm, volume.origin_mm) == (expected.spacing_mm, expected.origin_mm)
    error = np.abs(volume.image_hu.astype(np.float64) - expected.image_hu)
    if encoding.max_error_hu == 0:
        np.testing.assert_array_equal(volume.image_hu, expected.image_hu)
    else:
        assert 0 < error.max() <= encoding.max_error_hu, "lossy, but within its bound"
        assert error.mean() <= encoding.mean_error_hu


def test_jpeg_baseline_8_bit_ct_is_ingested_within_its_quantisation(tmp_path: Path) -> None:
    """8-bit CT (slope 6 HU per step) as JPEG baseline, encoded by Pillow's libjpeg at quality
    95: the HU differ from the same 8-bit values stored uncompressed by a few steps at most, by
    at most two steps on average (the pixels carry 2 steps of noise)."""
    slope, intercept = 6.0, -1100.0
    rng = np.random.default_rng(3)
    smooth = np.add.outer(np.linspace(0, 200, 32), np.linspace(0, 40, 32))
    stored = np.clip(smooth[..., None] + rng.normal(0, 2, (32, 32, 6)), 0, 255).astype(np.uint8)

    def as_8_bit(k: int, ds) -> None:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.PixelData = stored[:, :, k].tobytes()

    def as_jpeg(k: int, ds) -> None:
        as_8_bit(k, ds)
        buffer = BytesIO()
        Image.fromarray(stored[:, :, k], mode="L").save(buffer, format="JPEG", quality=95)
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.LossyImageCompression = "01"
        ds.PixelData = encapsulate([buffer.getvalue()])
        ds["PixelData"].VR = "OB"

    volumes = {}
    for name, mutate in (("native", as_8_bit), ("jpeg", as_jpeg)):
        root = tmp_path / name
        series = dicom_factory.write_ct_series(
            root / "ct",
            n_slices=6,
            rows=32,
            cols=32,
            mutate=mutate,
            series_uid=f"1.2.3.{len(name)}",
        )
        dicom_factory.write_seg(root / "seg.dcm", series)
        result = ingest_site(root)
        assert result.quarantine == ()
        (volumes[name],) = _volumes(result)

    expected = stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    np.testing.assert_array_equal(volumes["native"].image_hu, expected)
    error = np.abs(volumes["jpeg"].image_hu - expected)
    assert 0 < error.max() <= 8 * slope and error.mean() <= 2 * slope


# JPEG lossless and JPEG extended cannot be encoded here: frames from pydicom's test files.
TEST_FILE_FRAMES = {
    "JPEG lossless SV1, 8 bit": ("JPGLosslessP14SV1_1s_1f_8b.dcm", JPEGLosslessSV1),
    "JPEG lossless SV1, 16 bit signed": ("JPEG-LL.dcm", JPEGLosslessSV1),
    "JPEG extended, 12 bit": ("JPGExtended.dcm", JPEGExtended12Bit),
}


def write_series_of_test_frame(root: Path, name: str, *, n_slices: int = 3) -> None:
    """A CT series whose every slice carries the compressed frame of pydicom test file ``name``,
    with its SEG."""
    source = dcmread(get_testdata_file(name))

    def use_frame(_: int, ds) -> None:
        ds.file_meta.TransferSyntaxUID = source.file_meta.TransferSyntaxUID
        for keyword in (
            "BitsAllocated",
            "BitsStored",
            "HighBit",
            "PixelRepresentation",
            "PhotometricInterpretation",
            "SamplesPerPixel",
        ):
            setattr(ds, keyword, source[keyword].value)
        ds.PixelData = source.PixelData
        ds["PixelData"].VR = "OB"

    series = dicom_factory.write_ct_series(
        root / "ct",
        n_slices=n_slices,
        rows=source.Rows,
        cols=source.Columns,
        slope=1.0,
        intercept=-1024.0,
        mutate=use_frame,
    )
    dicom_factory.write_seg(root / "seg.dcm", series)


@pytest.mark.parametrize("name, syntax", TEST_FILE_FRAMES.values(), ids=TEST_FILE_FRAMES.keys())
def test_jpeg_frames_from_pydicom_test_files_are_ingested(tmp_path: Path, name, syntax) -> None:
    write_series_of_test_frame(tmp_path, name)
    assert dcmread(next((tmp_path / "ct").iterdir())).file_meta.TransferSyntaxUID == syntax

    result = ingest_site(tmp_path)

    assert result.quarantine == ()
    (volume,) = _volumes(result)
    decoded = dcmread(get_testdata_file(name)).pixel_array  # pydicom on the original file
    expected = decoded.astype(np.float32) - np.float32(1024.0)
    assert volume.image_hu.shape == (*decoded.shape, 3)
    for k in range(3):
        np.testing.assert_array_equal(volume.image_hu[:, :, k], expected)


def test_a_jpeg_variant_no_installed_codec_decodes_is_quarantined_by_name(tmp_path: Path) -> None:
    """JPEG-lossy.dcm (12-bit JPEG extended, as pydicom ships it) defeats libjpeg and Pillow:
    the series is quarantined as undecodable, naming the file and the fix; its SEG follows."""
    write_series_of_test_frame(tmp_path, "JPEG-lossy.dcm")

    result = ingest_site(tmp_path)

    reasons = {entry.reason: entry for entry in result.quarantine}
    assert set(reasons) == {
        QuarantineReason.UNDECODABLE_PIXELS,
        QuarantineReason.LABEL_WITHOUT_SERIES,
    }
    detail = reasons[QuarantineReason.UNDECODABLE_PIXELS].detail
    assert "ct/slice_000.dcm could not be decoded" in detail and "install the decoder" in detail
    assert result.patients == ()


def test_the_decoder_plugins_are_the_pinned_ones() -> None:
    """Compressed syntaxes decode through these plugins; pyproject.toml pins them."""
    from pydicom.pixels.decoders.base import get_decoder

    for syntax, plugin in (
        (JPEGBaseline8Bit, "pylibjpeg"),
        (JPEGLosslessSV1, "pylibjpeg"),
        (JPEGLSLossless, "pyjpegls"),
        (JPEG2000Lossless, "pylibjpeg"),
        (RLELossless, "pylibjpeg"),
    ):
        decoder = get_decoder(syntax)
        assert decoder.is_available and plugin in decoder.available_plugins, syntax.name
    assert ExplicitVRLittleEndian.is_little_endian  # native syntaxes need no plugin
