"""``python -m soflow_fast.evaluate``: the ADM evaluator's metrics for every sample batch in a folder.

    python -m soflow_fast.evaluate --ref_batch VIRTUAL_imagenet256_labeled.npz \\
        --sample_batch_dir runs/xl/evals --inception weights-inception-2015-12-05-6726825d.pth

``--ref_batch`` and ``--sample_batch_dir`` are the flags of the SoFlow authors' evaluator. Each
``.npz`` in the folder (ADM's format: ``arr_0`` uint8 (N, H, W, 3)) is scored against the reference
batch with Inception Score, FID, sFID, precision and recall (``soflow_fast.eval.adm``), and one
line per file is printed and appended to ``DIR/eval_results.txt`` in the authors' format, followed by
the reference batch it was scored against (its name and a content id, :func:`reference_id`)::

    ckpt_0100000.npz # IS: 215.3, FID: 2.31, sFID: 4.87, prec: 0.79, recall: 0.58 # ref: in256_ref.npz (3f9a0c2e81d4)

Files are taken in the order of the number in their name; hidden ones (a name starting with ``.``,
such as the part files of an interrupted write) are left out. A file that ``eval_results.txt``
already scores against the same reference batch is skipped, so a run that stopped part-way
continues where it was (the authors' evaluator behaves the same way; unlike it, this one never
deletes the evaluated npz). Another reference batch scores every file again, on new lines; the old
ones stay (so do lines without a reference, as the authors' evaluator writes them: they skip
nothing). A latent preview (the npz of a latent model sampled without a VAE, with a ``latents``
array) is refused as a batch that cannot be scored.
The reference batch and the Inception weights are checked before anything is computed
(``soflow_fast.eval.checks``, as the trainer does). A sample batch that cannot be scored (a
truncated npz, no uint8 ``arr_0`` images, fewer than 4 images) gets one ``evaluate: error:`` line
naming it and why, is not written to ``eval_results.txt`` (a rerun tries it again), and the
others are still scored; the exit status is then 1.
The reference batch's features are computed once; its ``mu``/``sigma`` (and ``mu_s``/``sigma_s``)
are used instead of its images' statistics when the file holds them, as ADM does.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import re
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch

from soflow_fast.cli import Parser
from soflow_fast.eval import adm
from soflow_fast.eval.checks import (
    INCEPTION_SHA256,
    NPZ_READ_ERRORS,
    check_inception_weights,
    check_reference_batch,
    check_sample_batch,
)
from soflow_fast.eval.inception import InceptionFeatures, default_inception_path, iter_npz_images, npz_image_count

RESULTS_NAME = "eval_results.txt"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(prog="soflow-evaluate", description=__doc__.split("\n\n")[0] + " (or python -m soflow_fast.evaluate)")
    p.add_argument(
        "--ref_batch", required=True, help="reference batch npz (ADM format, e.g. VIRTUAL_imagenet256_labeled.npz)"
    )
    p.add_argument("--sample_batch_dir", required=True, help="folder of sample batch npz files to evaluate")
    p.add_argument(
        "--inception",
        default=None,
        help="torch-fidelity's Inception-v3 weights file (weights-inception-2015-12-05-6726825d.pth); default: "
        "torch hub's cache, where torch-fidelity keeps it when it downloads it",
    )
    p.add_argument(
        "--inception_sha256",
        type=lambda v: None if v.lower() in ("none", "") else v,
        default=INCEPTION_SHA256,
        help=f"the start of the weights file's SHA-256 (default {INCEPTION_SHA256}, torch-fidelity's file); none "
        "takes other weights, whose scores are not comparable to published ones",
    )
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--batch_size", type=int, default=64, help="images per Inception forward pass (ADM: 64)")
    return p.parse_args(argv)


def sample_files(folder: Path, ref_batch: Path) -> list[Path]:
    """The npz files of ``folder`` by the number in their name, then by name (the reference and hidden
    files, such as an interrupted write's part files, left out)."""
    files = [
        f
        for f in folder.iterdir()
        if f.is_file() and f.suffix == ".npz" and not f.name.startswith(".") and f.resolve() != ref_batch.resolve()
    ]

    def key(f: Path) -> tuple[int, str]:
        digits = "".join(re.findall(r"\d", f.name))
        return (int(digits) if digits else -1, f.name)

    return sorted(files, key=key)


def reference_id(path: Path) -> str:
    """12 hex digits that change with a reference batch's content: a hash of its members' names, sizes
    and CRC-32s as its zip directory lists them (the file's data are not read)."""
    with zipfile.ZipFile(path) as zf:
        members = sorted((info.filename, info.file_size, info.CRC) for info in zf.infolist())
    return hashlib.sha256(repr(members).encode()).hexdigest()[:12]


def reference_label(path: Path) -> str:
    """How a result line names its reference batch: ``NAME (ID)``."""
    return f"{path.name} ({reference_id(path)})"


_REF = re.compile(r" # ref: .*\(([0-9a-f]{12})\)\s*$")


def already_evaluated(results: Path, ref_id: str) -> set[str]:
    """File names that have a line in ``results`` scored against the reference batch ``ref_id``
    (``name # metrics # ref: NAME (ID)``); lines without a reference match none."""
    if not results.exists():
        return set()
    done = set()
    for line in results.read_text().splitlines():
        match = _REF.search(line)
        if match and match.group(1) == ref_id:
            done.add(line.split("#", 1)[0].strip())
    return done


def batch_statistics(path: Path, acts: dict[str, np.ndarray], spatial_reason: str | None) -> dict:
    """FID and sFID statistics of one batch: its stored ``mu``... arrays when present, else its features'."""
    with np.load(path) as z:
        stored = {k: z[k] for k in ("mu", "sigma", "mu_s", "sigma_s") if k in z.files}
    stats = {}
    stats["pool"] = (stored["mu"], stored["sigma"]) if "mu" in stored else adm.fid_statistics(acts["pool"])
    if "mu_s" in stored:
        stats["spatial"] = (stored["mu_s"], stored["sigma_s"])
    elif spatial_reason is None:
        stats["spatial"] = adm.fid_statistics(acts["spatial"])
    return stats


def softmax_probs(logits: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.from_numpy(logits).double(), dim=1).numpy()


def evaluate_batch(ref: dict, ref_stats: dict, acts: dict, stats: dict, spatial_reason: str | None, device) -> dict:
    """The five numbers of one sample batch against the reference."""
    out = {"IS": adm.inception_score(softmax_probs(acts["logits"]))}
    out["FID"] = adm.fid_from_stats(*stats["pool"], *ref_stats["pool"])
    if "spatial" in stats and "spatial" in ref_stats:
        out["sFID"] = adm.fid_from_stats(*stats["spatial"], *ref_stats["spatial"])
    else:
        out["sFID"] = f"not computed ({spatial_reason or 'no spatial statistics for one of the batches'})"
    out["prec"], out["recall"] = adm.precision_recall(ref["pool"], acts["pool"], device=device)
    return out


class ReferenceScorer:
    """The five numbers of sample batches against one reference batch, whose features are computed once.

    Args:
        ref_batch: the reference npz (ADM format).
        inception: the local Inception weights file.
        device: where the Inception runs.
        batch_size: images per Inception call.
        say: where progress lines go (``print`` for the command, the run log in training).

    Raises:
        FileNotFoundError, ValueError: from ``soflow_fast.eval.checks`` for a missing or unusable
            reference batch or weights file (checked before the network is built).
        ImportError: no torch-fidelity.
    """

    def __init__(
        self,
        ref_batch: Path,
        inception: Path,
        device: torch.device,
        batch_size: int = 64,
        say=print,
        sha256: str | None = INCEPTION_SHA256,
    ):
        check_reference_batch(ref_batch)
        self.net = InceptionFeatures(inception, device, sha256)  # checks the weights file first
        self.device, self.batch_size, self.say = device, batch_size, say
        if self.net.spatial_reason is not None:
            say(f"evaluate: sFID not computed: {self.net.spatial_reason}")
        self.ref = self.features(ref_batch, "reference batch")
        self.ref_stats = batch_statistics(ref_batch, self.ref, self.net.spatial_reason)

    def features(self, path: Path, what: str) -> dict[str, np.ndarray]:
        n = npz_image_count(path)
        self.say(f"evaluate: {what} {path} ({n} images) on {self.device}")
        return self.net.activations(iter_npz_images(path, self.batch_size), total=n, desc=path.name)

    def score(self, path: Path) -> dict:
        """The five numbers of the sample batch ``path``; raises ValueError (or an ``OSError``) when it
        cannot be scored, with a message naming it."""
        check_sample_batch(path)
        acts = self.features(path, "sample batch")
        stats = batch_statistics(path, acts, self.net.spatial_reason)
        return evaluate_batch(self.ref, self.ref_stats, acts, stats, self.net.spatial_reason, self.device)


def format_line(name: str, metrics: dict, reference: str | None = None) -> str:
    """The authors' line ``name # IS: .., FID: .., sFID: .., prec: .., recall: ..``, then
    `` # ref: REFERENCE`` when given (:func:`reference_label`)."""
    line = f"{name} # " + ", ".join(f"{k}: {metrics[k]}" for k in ("IS", "FID", "sFID", "prec", "recall"))
    return line if reference is None else f"{line} # ref: {reference}"


def batch_error_line(path: Path, err: BaseException) -> str:
    """One line naming a sample batch that could not be scored and why."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if isinstance(err, NPZ_READ_ERRORS):
        text = f"not a readable npz file ({type(err).__name__}: {text})"
    return f"evaluate: error: {text if str(path) in text else f'{path}: {text}'}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ref_path, folder = Path(args.ref_batch), Path(args.sample_batch_dir)
    if not folder.is_dir():
        sys.exit(
            f"evaluate: {folder} is not a folder"
            if folder.exists()
            else f"evaluate: sample batch folder not found: {folder}"
        )
    if args.batch_size < 1:
        sys.exit(f"evaluate: --batch_size must be >= 1, got {args.batch_size}")
    inception = Path(args.inception) if args.inception else default_inception_path()
    try:  # before anything is computed, with the trainer's words
        check_reference_batch(ref_path)
        check_inception_weights(inception, args.inception_sha256)
    except (OSError, ValueError) as err:
        sys.exit(f"evaluate: {err}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    results = folder / RESULTS_NAME
    reference = reference_label(ref_path)
    done = already_evaluated(results, reference_id(ref_path))
    files = sample_files(folder, ref_path)
    todo = [f for f in files if f.name not in done]
    skipped = len(files) - len(todo)
    if skipped:
        print(f"evaluate: {skipped} file(s) already in {results} against {reference}, skipped")
    if not todo:
        print(f"evaluate: nothing to evaluate in {folder}")
        return 0

    failed, ready = [], []
    for path in todo:  # the header checks first: no network is built for a folder of bad files
        try:
            check_sample_batch(path)
            ready.append(path)
        except (OSError, ValueError) as err:
            print(batch_error_line(path, err), file=sys.stderr, flush=True)
            failed.append(path.name)
    if ready:
        try:
            scorer = ReferenceScorer(ref_path, inception, device, args.batch_size, sha256=args.inception_sha256)
        except (OSError, ValueError, ImportError) as err:
            sys.exit(f"evaluate: {err}")
    for path in ready:
        try:
            metrics = scorer.score(path)
        except (OSError, ValueError, *NPZ_READ_ERRORS) as err:  # this file only: the others are still scored
            print(batch_error_line(path, err), file=sys.stderr, flush=True)
            failed.append(path.name)
            continue
        line = format_line(path.name, metrics, reference)
        print(line, flush=True)
        with results.open("a") as f:
            f.write(line + "\n")
        bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            print(f"evaluate: {path.name}: {', '.join(bad)} not finite")
    if len(failed) < len(todo):
        print(f"evaluate: results appended to {results}")
    if failed:
        names = ", ".join(f.name for f in todo if f.name in failed)
        print(f"evaluate: {len(failed)} of {len(todo)} file(s) not scored: {names}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
