"""What `make final` trains, as records: one seed's retrain (SeedRun), one fold's model (FoldRun), a candidate's
runs resumed from where a killed run left them (CandidateRuns).

Each is written as JSON under RESULTS/final/<study>/.partial/ the moment it
finishes (to_dict), and read back by a rerun that resumes there (from_dict);
metrics.json carries the seeds' records and their spread.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cnnlib.metrics import Evaluation
from cnnlib.config import TrainConfig
from cnnlib.training import DeviceData

from ..output import claim_partial


@dataclass
class SeedRun:
    """One retrain of the chosen config with one seed: its dev (and test) scores and its checkpoint."""

    seed: int
    evaluations: dict[str, Evaluation]  # split name -> evaluation
    seconds: float
    epochs: int
    checkpoint: Path

    def to_dict(self) -> dict:
        return {"seed": self.seed, "seconds": self.seconds, "epochs": self.epochs,
                **{name: e.to_dict() for name, e in self.evaluations.items()}}

    @classmethod
    def from_dict(cls, data: dict, classes, checkpoint: Path) -> "SeedRun":
        evaluations = {name: Evaluation.from_dict(classes, data[name]) for name in ("dev", "test") if name in data}
        if "dev" not in evaluations:  # the median seed is chosen on dev
            raise KeyError("dev")
        return cls(data["seed"], evaluations, data["seconds"], data["epochs"], checkpoint)

    def named(self, record: Path) -> "SeedRun":
        """Itself, when it is the seed its record's name says (seed-<n>.json)."""
        if type(self.seed) is not int or f"seed-{self.seed}" != record.stem:
            raise ValueError(f"it records seed {self.seed!r}")
        return self


@dataclass
class FoldRun:
    """One candidate's model for one fold: its predictions on the held-out fold, and its test score."""

    fold: int
    labels: np.ndarray  # the held-out images' labels, in pool order
    predictions: np.ndarray  # the model's (as evaluated, test-time views and all) class per held-out image
    test: Evaluation | None
    seconds: float
    classes: tuple[str, ...] = ()

    @property
    def held_out(self) -> Evaluation:
        n = len(self.classes)
        matrix = np.bincount(self.labels * n + self.predictions, minlength=n * n).reshape(n, n)
        return Evaluation(self.classes, matrix)

    @property
    def correct(self) -> np.ndarray:
        return self.labels == self.predictions

    def named(self, record: Path) -> "FoldRun":
        """Itself, when it is the fold its record's name says (fold-<n>.json)."""
        if type(self.fold) is not int or f"fold-{self.fold}" != record.stem:
            raise ValueError(f"it records fold {self.fold!r}")
        return self

    def to_dict(self) -> dict:
        return {"fold": self.fold, "seconds": self.seconds, "labels": self.labels.tolist(),
                "predictions": self.predictions.tolist(), "held_out": self.held_out.to_dict(),
                "test": self.test.to_dict() if self.test is not None else None}

    @classmethod
    def from_dict(cls, data: dict, classes) -> "FoldRun":
        test = Evaluation.from_dict(classes, data["test"]) if data.get("test") else None
        labels, predictions = (np.asarray(data[key], dtype=np.int64) for key in ("labels", "predictions"))
        if labels.ndim != 1 or labels.shape != predictions.shape:
            raise ValueError(f"labels {labels.shape} and predictions {predictions.shape} are not one per image")
        if labels.size and not (0 <= min(labels.min(), predictions.min()) and
                                max(labels.max(), predictions.max()) < len(classes)):
            raise ValueError(f"a class outside 0..{len(classes) - 1}")
        return cls(data["fold"], labels, predictions, test, data["seconds"], tuple(classes))


@dataclass
class CandidateRuns:
    """One candidate's runs (its seeds, or its folds); each is recorded under `partial` as it finishes, so a
    killed run resumes there."""

    label: str  # "trial 29 " when several candidates train, else ""
    config: TrainConfig
    partial: Path
    fingerprint: dict  # the work the records are of (trial, config, data, ...): another's are removed
    runs: dict[int, SeedRun | FoldRun] = field(default_factory=dict)

    def records(self, pattern: str) -> list[Path]:
        """The finished runs' records (`pattern`: seed-*.json, fold-*.json) that the same work left under `partial`."""
        claim_partial(self.partial, self.fingerprint)
        return sorted(self.partial.glob(pattern))


def eval_splits(data: DeviceData) -> dict:
    return {name: split for name, split in (("dev", data.dev), ("test", data.test)) if split is not None}


def median_run(runs: list[SeedRun]) -> SeedRun:
    ranked = sorted(runs, key=lambda r: (r.evaluations["dev"].macro_accuracy, r.seed))
    return ranked[(len(ranked) - 1) // 2]


def spread(values: list[float]) -> dict:
    values = [float(v) for v in values]
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def seed_summary(runs: list[SeedRun], data: DeviceData) -> dict:
    """Per evaluated split: the spread over seeds of macro and per-class accuracy."""
    return {name: {"macro_accuracy": spread([r.evaluations[name].macro_accuracy for r in runs]),
                   "per_class": {c: spread([r.evaluations[name].per_class[c] for r in runs]) for c in data.classes}}
            for name in eval_splits(data)}
