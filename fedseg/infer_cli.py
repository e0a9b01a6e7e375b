"""``fedseg site infer``: parsing, the model check and printing only.

The model's signed manifest is verified here (``server_app.model_manifest``) before any patient
data is read; the work is ``site_app.inference``'s (series, prediction) and
``site_app.seg_writer``'s (the SEG, storing it). Exit status: 0 when every valid series got its
SEG (quarantined inputs are reported, not failures), 1 when the model is refused, a series
could not be segmented or no series was valid, 2 for a usage or input error.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from rich.markup import escape

from fedseg.pacs_options import add_connection_options, dicomweb_source
from fedseg.terminal import UserError, console, error_console

PACS_FOLDER = ".fedseg-pacs"
"""Under ``--out``: the studies fetched with ``--dicomweb`` (kept, so a rerun fetches nothing)."""
HISTORY = "history.json"


# -- the model -----------------------------------------------------------------------------------


def _training_spec(args: argparse.Namespace, model: Path, user_error: type[Exception]) -> dict:
    """The spec the model was trained with, as plain data: ``--spec``, else the results folder's
    ``history.json`` (``R/models/final_model.pt`` -> ``R/history.json``). Its hash is checked
    against the signed manifest, so where it comes from does not need to be trusted."""
    from jobs.spec import load_spec

    if args.spec:
        return load_spec(args.spec).to_plain()
    for folder in (model.parent.parent, model.parent):
        history = folder / HISTORY
        if history.is_file():
            try:
                spec = json.loads(history.read_text()).get("spec")
            except (OSError, ValueError, AttributeError) as error:
                raise user_error(
                    f"{history}: cannot read the job's spec ({type(error).__name__}); pass "
                    "--spec SPEC.yaml, the spec the model was trained with"
                ) from None
            if isinstance(spec, dict):
                return spec
    raise user_error(
        f"--spec: no {HISTORY} with the job's spec beside {model} (a results folder holds "
        f"R/{HISTORY} next to R/models/); pass --spec SPEC.yaml, the spec the model was "
        "trained with (its spacing, HU window and network)"
    )


def _verified_model(args: argparse.Namespace, user_error: type[Exception]):
    """The model, loaded only once its manifest verifies; None (after saying why) if it does
    not. Nothing of the site's data has been read when this returns."""
    from jobs.spec import parse_spec
    from server_app.model_manifest import (
        ManifestError,
        file_sha256,
        manifest_paths,
        trust_anchor_from_kit,
        verify_model,
    )
    from site_app.inference import InferenceError, load_model
    from site_app.seg_writer import ModelProvenance

    model = Path(args.model)
    spec = _training_spec(args, model, user_error)
    root_ca, signer_name = (Path(args.root_ca) if args.root_ca else None), args.signer
    manifest_path, _ = manifest_paths(model)
    try:
        if args.kit:
            root_ca, server = trust_anchor_from_kit(Path(args.kit))
            signer_name = signer_name or server
        before = file_sha256(manifest_path) if manifest_path.is_file() else None
        result = verify_model(model, root_ca=root_ca, signer_name=signer_name, spec=spec)
        after = file_sha256(manifest_path)
    except ManifestError as error:
        raise user_error(f"the model was not used: {error}") from None
    if result.ok and before != after:
        result.problems.append("manifest: changed while it was being verified; run again")
    if not result.ok:
        error_console.print(
            f"[red]refused[/red]: {escape(str(model))} could not be verified, so no data was "
            "read and nothing was written:"
        )
        for problem in result.problems:
            error_console.print(f"  - {problem}", markup=False)
        return None
    for note in result.notes:
        console.print(f"[yellow]note:[/yellow] {escape(note)}")
    manifest = result.manifest
    if result.verified_signer is None:
        console.print(
            f"[yellow]warning: signer unproven[/yellow]: {escape(str(model))} is unchanged since "
            "signing, but it has a SIMULATION signature (a throwaway key): it does not show who "
            "made the model. Use a model signed by your federation's server for clinical data."
        )
    else:
        console.print(
            f"[green]verified[/green] {escape(str(model))}: job '{escape(str(manifest['job']))}' "
            f"signed by the federation's server '{escape(result.verified_signer)}'"
        )
    provenance = ModelProvenance(
        job=str(manifest.get("job")),
        model_sha256=str(manifest.get("model_sha256")),
        manifest_sha256=after,
        signer=result.verified_signer,
    )
    try:
        return load_model(model, spec=parse_spec(spec, source=HISTORY), provenance=provenance)
    except InferenceError as error:
        raise user_error(str(error)) from None


# -- the command ---------------------------------------------------------------------------------


def _check_arguments(args: argparse.Namespace, user_error: type[Exception]) -> None:
    if args.store and not args.dicomweb:
        raise user_error(
            "--store sends the SEGs to the PACS named by --dicomweb URL; read the series from "
            "there too (--dicomweb URL --study UID), or drop --store"
        )
    if args.study and not args.dicomweb:
        raise user_error("--study selects studies in the PACS: pass it with --dicomweb URL")
    if args.signer and not (args.root_ca or args.kit):
        raise user_error("--signer is checked under a root CA: pass --root-ca PEM or --kit KIT")
    if args.root_ca and not args.signer:
        raise user_error(
            "--root-ca needs --signer SERVER (FLARE certifies sites and admins with the same "
            "root CA, so only the name tells the server apart), or pass --kit KIT"
        )
    pacs_options = (args.username, args.password_env, args.ca_bundle, args.allow_insecure_http)
    if not args.dicomweb and any(pacs_options):
        raise user_error(
            "--username, --password-env, --ca-bundle and --allow-insecure-http are for "
            "--dicomweb URL"
        )


def _describe_outcome(index: int, total: int, outcome) -> str:
    from site_app.quarantine import QuarantineEntry
    from site_app.seg_writer import WrittenSeg

    if isinstance(outcome, WrittenSeg):
        return (
            f"series {index}/{total} {outcome.series_key}: {outcome.lesion_voxels} lesion "
            f"voxel(s), SEG of {outcome.frames} frame(s) -> {outcome.path.name}"
        )
    if isinstance(outcome, QuarantineEntry):
        return f"series {index}/{total} {outcome.series_key}: quarantined ({outcome.reason.value})"
    return f"series {index}/{total}: failed: {outcome}"


def _site_infer(args: argparse.Namespace) -> int:
    from site_app.dicomweb_source import StudySelection
    from site_app.inference import InferenceError, run_inference
    from site_app.pacs_errors import PacsImportError
    from site_app.pacs_import import import_from_dicomweb
    from site_app.seg_writer import SegStoreError, store_segs

    _check_arguments(args, UserError)
    model = _verified_model(args, UserError)  # first: before any patient data is read
    if model is None:
        return 1
    import torch

    out = Path(args.out)
    source = None
    try:
        if args.dicomweb:
            source = dicomweb_source(args)
            data = out / PACS_FOLDER
            summary = import_from_dicomweb(
                source,
                data,
                selection=StudySelection(study_uids=tuple(args.study), modality="CT"),
                progress=True,
            )
            console.print(
                f"fetched {summary.fetched} instance(s) of {summary.studies} study(ies) from the "
                f"PACS ({summary.already_present} already in {escape(str(data))})"
            )
        else:
            data = Path(args.data)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        result = run_inference(
            data,
            out,
            model,
            device=device,
            progress=True,
            on_series=lambda i, n, outcome: console.print(
                _describe_outcome(i, n, outcome), markup=False, highlight=False
            ),
        )
        stored = store_segs(source, result.written) if args.store and result.written else []
    except (InferenceError, PacsImportError, SegStoreError) as error:
        raise UserError(str(error)) from None

    console.print(
        f"[green]wrote[/green] {len(result.written)} SEG(s) to {escape(str(out))} for "
        f"{result.series_found} series found; {len(result.quarantine)} quarantined item(s), "
        f"each with its reason: {escape(str(result.quarantine_path))}"
    )
    reasons = Counter(entry.reason.value for entry in result.quarantine)
    if reasons:
        console.print(
            "quarantined: " + ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items())),
            markup=False,
        )
    if stored:
        console.print(
            f"[green]stored[/green] {len(stored)} SEG(s) in the PACS (STOW-RS) and read each "
            "back: same instance, same number of frames"
        )
    if result.failed:
        for key, reason in result.failed:
            error_console.print(f"[red]failed[/red] {escape(key)}: {escape(reason)}")
        return 1
    if not result.written:
        error_console.print(
            "[red]no SEG written[/red]: no valid CT series to segment (each quarantined series "
            f"has its reason and fix in {escape(str(result.quarantine_path))})"
        )
        return 1
    return 0


def register(site_commands: argparse._SubParsersAction) -> None:
    """Add ``site infer`` to the ``fedseg site`` command group."""
    infer = site_commands.add_parser(
        "infer",
        help="segment the site's CT series with a verified model: one DICOM SEG per series",
        description="Verify the model's signed manifest (before reading any data), then "
        "segment every valid CT series of --data (or of studies fetched from --dicomweb) and "
        "write one DICOM SEG per series into --out. Exit status 0: done; 1: the model was "
        "refused or a series failed; 2: a usage or input error.",
    )
    infer.add_argument(
        "--model",
        required=True,
        metavar="MODEL",
        help="the model file, e.g. RESULTS/models/final_model.pt (its .manifest.json and "
        ".manifest.sig beside it)",
    )
    infer.add_argument(
        "--spec",
        metavar="SPEC",
        help="the job spec the model was trained with (default: RESULTS/history.json's); it "
        "must match the manifest",
    )
    where = infer.add_mutually_exclusive_group(required=True)
    where.add_argument("--data", metavar="DIR", help="the DICOM folder to segment")
    where.add_argument(
        "--dicomweb",
        metavar="URL",
        help="DICOMweb root of the hospital's PACS: studies are fetched into OUT/.fedseg-pacs",
    )
    infer.add_argument(
        "--study",
        action="append",
        default=[],
        metavar="UID",
        help="with --dicomweb: StudyInstanceUID to segment (repeatable; default: every CT study)",
    )
    infer.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="where the SEGs (<series key>.seg.dcm) and quarantine.json go; outside --data",
    )
    anchor = infer.add_mutually_exclusive_group()
    anchor.add_argument(
        "--kit",
        metavar="KIT",
        help="the site's startup kit: its rootCA.pem and server name check the model's signer",
    )
    anchor.add_argument(
        "--root-ca", metavar="PEM", help="rootCA.pem of the federation (needs --signer)"
    )
    infer.add_argument("--signer", metavar="NAME", help="the server that must have signed")
    infer.add_argument(
        "--store",
        action="store_true",
        help="with --dicomweb: store each SEG in that PACS (STOW-RS) and read it back",
    )
    add_connection_options(infer)
    infer.set_defaults(handler=_site_infer)
