"""Each patient's crops and split side depend on that patient alone (issue "the guarantee as
written", point 3): adding or removing one patient changes nothing for the others, as the
per-patient add/remove proof assumes."""

import numpy as np
import torch

from site_app.dataset import PatientCropDataset, PreparedPatient, PreparedVolume, split_patients

ROI = (8, 8, 8)


def _patient(key: str, seed: int) -> PreparedPatient:
    rng = np.random.default_rng(seed)
    image = rng.random((1, 20, 20, 20), dtype=np.float32)
    label = np.zeros_like(image)
    label[0, 5:9, 5:9, 5:9] = 1.0
    return PreparedPatient(patient_key=key, volumes=(PreparedVolume(image=image, label=label),))


PATIENTS = [_patient(f"patient-{i}", i) for i in range(6)]


def _crops(dataset: PatientCropDataset, keys: list[str], rounds: int) -> dict[str, list]:
    """Each named patient drawn ``rounds`` times, interleaved with every other patient."""
    out: dict[str, list] = {key: [] for key in keys}
    for _ in range(rounds):
        for index, patient in enumerate(dataset.patients):
            image, _ = dataset[index]
            if patient.patient_key in out:
                out[patient.patient_key].append(image.clone())
    return out


def _dataset(patients, seed=1234):
    return PatientCropDataset(patients, roi_size=ROI, lesion_crop_fraction=0.5, seed=seed)


def test_removing_a_patient_leaves_every_other_patient_s_crops_unchanged():
    keys = [p.patient_key for p in PATIENTS[2:]]
    with_all = _crops(_dataset(PATIENTS), keys, rounds=4)
    without_one = _crops(_dataset(PATIENTS[:1] + PATIENTS[2:]), keys, rounds=4)
    for key in keys:
        assert all(torch.equal(a, b) for a, b in zip(with_all[key], without_one[key], strict=True))


def test_a_patient_s_crops_vary_between_draws_and_with_the_site_secret():
    key = PATIENTS[0].patient_key
    one = _crops(_dataset(PATIENTS), [key], rounds=4)[key]
    assert not all(torch.equal(one[0], later) for later in one[1:])
    other_secret = _crops(_dataset(PATIENTS, seed=99), [key], rounds=4)[key]
    assert not all(torch.equal(a, b) for a, b in zip(one, other_secret, strict=True))


def _keys(side) -> set[str]:
    return {p.patient_key for p in side}


def test_adding_a_patient_moves_no_other_patient_between_train_and_validation():
    many = [_patient(f"patient-{i}", 0) for i in range(40)]
    train, val = split_patients(many, val_fraction=0.25, seed=0)
    train2, val2 = split_patients([*many, _patient("newcomer", 0)], val_fraction=0.25, seed=0)
    assert _keys(train) <= _keys(train2) and _keys(val) <= _keys(val2)
    assert len(train2) + len(val2) == 41
