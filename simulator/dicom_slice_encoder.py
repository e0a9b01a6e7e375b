"""Part 10 bytes of the slices of one image series, encoding what they share only once.

The slices of a series differ only in their SOP instance UID, instance number, position, slice
location and pixels; everything else is encoded once from the series template, and
``SliceEncoder.encode`` gives the bytes ``Dataset.save_as(path, enforce_file_format=True)``
would write.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from pydicom.charset import default_encoding
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset, validate_file_meta
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import correct_ambiguous_vr, write_data_element
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID

__all__ = ["SliceEncoder"]

# The elements in which the slices of one series differ (the file meta's copy of the
# SOPInstanceUID aside); everything else is the series template's.
_SOP_INSTANCE_UID = Tag("SOPInstanceUID")
_INSTANCE_NUMBER = Tag("InstanceNumber")
_IMAGE_POSITION = Tag("ImagePositionPatient")
_SLICE_LOCATION = Tag("SliceLocation")
_PIXEL_DATA = Tag("PixelData")
_PER_SLICE = frozenset(
    {_SOP_INSTANCE_UID, _INSTANCE_NUMBER, _IMAGE_POSITION, _SLICE_LOCATION, _PIXEL_DATA}
)
_MEDIA_STORAGE_SOP_INSTANCE_UID = Tag("MediaStorageSOPInstanceUID")
_META_GROUP_LENGTH = Tag("FileMetaInformationGroupLength")
_PREAMBLE_AND_PREFIX = b"\x00" * 128 + b"DICM"


class SliceEncoder:
    """DICOM files of the slices of one series, encoding what they share only once.

    `encode(ds)` returns the bytes `ds.save_as(path, enforce_file_format=True)` writes (a test
    holds it to that), for a dataset from `slice_dataset`. Building and writing a whole pydicom
    Dataset per slice spent ~3 ms per file, most of the simulator's time; this takes a tenth.
    """

    def __init__(self, template: Dataset) -> None:
        self._implicit_vr = UID(template.file_meta.TransferSyntaxUID).is_implicit_VR
        self._encodings = template.get("SpecificCharacterSet", default_encoding)
        # Resolve "OB or OW" and the like once, as dcmwrite would for every file.
        correct_ambiguous_vr(template, True)
        meta = FileMetaDataset(dict(template.file_meta.items()))
        meta.MediaStorageSOPClassUID = template.SOPClassUID
        validate_file_meta(meta, enforce_standard=True)  # adds the implementation UID & version
        self._template, self._meta = template, meta
        self._meta_parts = self._parts(
            meta, per_slice={_MEDIA_STORAGE_SOP_INSTANCE_UID}, implicit_vr=False
        )
        self._dataset_parts = self._parts(
            template, per_slice=_PER_SLICE, implicit_vr=self._implicit_vr
        )

    def slice_dataset(
        self,
        *,
        sop_instance_uid: str,
        instance_number: int,
        position_mm: tuple[float, float, float],
        pixels: bytes,
    ) -> Dataset:
        """The template with one slice's UID, number, position and pixels (shared elements)."""
        ds = Dataset(dict(self._template.items()))
        meta = FileMetaDataset(dict(self._meta.items()))
        meta[_MEDIA_STORAGE_SOP_INSTANCE_UID] = DataElement(
            _MEDIA_STORAGE_SOP_INSTANCE_UID, "UI", sop_instance_uid
        )
        ds.file_meta = meta
        for tag, value in (
            (_SOP_INSTANCE_UID, sop_instance_uid),
            (_INSTANCE_NUMBER, instance_number),
            (_IMAGE_POSITION, list(position_mm)),
            (_SLICE_LOCATION, position_mm[2]),
            (_PIXEL_DATA, pixels),
        ):
            ds[tag] = DataElement(tag, self._template[tag].VR, value)
        return ds

    def encode(self, ds: Dataset) -> bytes:
        """Part 10 file bytes: preamble, file meta (explicit VR little endian), dataset."""
        meta = self._join(self._meta_parts, ds.file_meta, implicit_vr=False)
        length = DataElement(_META_GROUP_LENGTH, "UL", len(meta))
        return b"".join(
            (
                _PREAMBLE_AND_PREFIX,
                self._encoded([length], implicit_vr=False),
                meta,
                self._join(self._dataset_parts, ds, implicit_vr=self._implicit_vr),
            )
        )

    def _parts(
        self, ds: Dataset, *, per_slice: Collection[BaseTag], implicit_vr: bool
    ) -> list[bytes | BaseTag]:
        """`ds` in tag order as encoded runs of shared elements, with per-slice tags between."""
        parts: list[bytes | BaseTag] = []
        run: list[DataElement] = []
        for tag in sorted(ds.keys()):
            if tag.element == 0:  # group lengths: dcmwrite computes (0002) and drops the rest
                continue
            if tag in per_slice:
                parts += [self._encoded(run, implicit_vr=implicit_vr), tag]
                run = []
            else:
                run.append(ds[tag])
        parts.append(self._encoded(run, implicit_vr=implicit_vr))
        return parts

    def _join(self, parts: Sequence[bytes | BaseTag], ds: Dataset, *, implicit_vr: bool) -> bytes:
        return b"".join(
            part if isinstance(part, bytes) else self._encoded([ds[part]], implicit_vr=implicit_vr)
            for part in parts
        )

    def _encoded(self, elements: Sequence[DataElement], *, implicit_vr: bool) -> bytes:
        buffer = DicomBytesIO()
        buffer.is_little_endian = True
        buffer.is_implicit_VR = implicit_vr
        for element in elements:
            write_data_element(buffer, element, self._encodings)
        return buffer.getvalue()
