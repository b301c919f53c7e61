"""The evaluation entry shared by val.py and eval_onnx.py (eval_ijbc_onnx.py and postprocess.py call
the IJB and verification protocols it dispatches to directly).

Every caller provides an embedder (MindSpore network, MINDIR, ONNX Runtime session or
precomputed features); the targets decide the protocol: `IJBB`/`IJBC` run the IJB 1:1
verification on an `IJB_release/<target>` folder, any other name the 10-fold protocol on
`<eval_url>/<name>.bin`.
"""
import os
import sys
import time

from src.errors import ArcFaceError
from src.evaluation.ijb import TARGETS as IJB_TARGETS
from src.evaluation.ijb import evaluate_ijb
from src.evaluation.verification import verify_bins


def split_targets(text):
    targets = [t.strip() for t in text.split(",") if t.strip()]
    if not targets:
        raise ArcFaceError("--target names no set")
    return targets


class ResultLog:
    """Result lines to stdout as the model zoo prints them, and appended to a log file with the time and
    the model they are about, so that a log read later says what was measured when: `describe` is set
    once the model is open (see embedders.Model.description)."""

    def __init__(self, path, describe=""):
        self.path, self.describe = path, describe
        if os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        self.file = open(path, "a", encoding="utf-8")

    def __call__(self, line):
        print(line, flush=True)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        for part in str(line).splitlines() or [""]:
            self.file.write(f"{stamp} {self.describe + ' ' if self.describe else ''}{part}\n")
        self.file.flush()

    def close(self):
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def check_eval_folder(eval_url):
    """--eval_url must be the folder of the sets: checked before a model is opened (or exported)."""
    if os.path.isfile(eval_url):
        folder, name = os.path.split(os.path.abspath(eval_url))
        raise ArcFaceError(f"--eval_url takes the folder holding the verification sets (<set>.bin, or IJB_release/"
                           f"<IJBB|IJBC>), not the file {eval_url}: use --eval_url {folder} --target "
                           f"{os.path.splitext(name)[0]}")
    if not os.path.isdir(eval_url):
        raise ArcFaceError(f"evaluation folder not found: {eval_url}")


def run_evaluation(embed_fn, eval_url, targets, batch_size, nfolds=10, log=print, result_dir="ijb_results",
                   progress=None, fusion="sum"):
    """Evaluate every target; returns {target: VerificationResult or {far: tar}}. A missing
    verification set is reported and skipped; finding none at all is an error. `fusion` combines
    the features of each image and its flip (src.evaluation.verification.FLIP_FUSIONS)."""
    if batch_size < 1:
        raise ArcFaceError(f"--batch_size must be positive, got {batch_size}")
    check_eval_folder(eval_url)
    progress = sys.stderr.isatty() if progress is None else progress
    results = {}
    bins = [t for t in targets if t.upper() not in IJB_TARGETS]
    if bins:
        results.update(verify_bins(embed_fn, eval_url, bins, batch_size, nfolds, log=log, progress=progress,
                                   fusion=fusion))
    for target in (t for t in targets if t.upper() in IJB_TARGETS):
        results[target] = evaluate_ijb(embed_fn, eval_url, target, batch_size, result_dir, log=log,
                                       progress=progress, fusion=fusion)
    if not results:
        raise ArcFaceError(f"none of the sets {', '.join(targets)} was found in {eval_url}")
    return results
