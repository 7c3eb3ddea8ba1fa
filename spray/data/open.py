"""Open the dataset a job's ``[data]`` section names, with a content fingerprint for stage reuse.

The fingerprint covers every sample (``fingerprint()`` of each format: every pixel and
label as read, or for image folders every file's bytes and the decoding settings), so an
attribution file is reused only for the very samples it explains.

The demo is generated and written once to ``stages/input.h5`` (reused while its
parameters are unchanged); every other source is read where it lies. The demo's data
also describe the artifact planted in them (:class:`PlantedArtifact`), which the audit's
artifact check and the correction's evaluation use.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import h5py
import numpy as np

from spray.data.arrays import ArrayFileSource
from spray.data.base import DataSource
from spray.data.config import DataConfig
from spray.data.demo import DemoConfig, DemoSplit, make_demo, stamp_tag, tag_region
from spray.data.entrypoint import DatasetSource, call_user_code, load_entry_point
from spray.data.folder import FolderSource, ImagePreprocessing
from spray.data.h5 import H5Source, open_h5_source, write_input_h5
from spray.store.folders import INPUT_FILE
from spray.store.stage_cache import fingerprint, mark, stored_fingerprint


@dataclass(frozen=True)
class PlantedArtifact:
    """An artifact planted in the audited data on purpose, and what it takes to test a model for it.

    What a job's ``[correct] stamp`` says about a user's artifact, the demo knows by
    construction, plus the truth: which rows carry it and a test split that was never audited.

    Attributes:
        class_index: the class whose images carry it (the shortcut it teaches).
        rows: the rows of the audited data that carry it (the ground truth of a flag).
        stamp: puts it on display images (N, C, H, W) in [0, 1]; returns a copy.
        region: the (rows, columns) slices of an image that the stamp covers.
        test: a held-out split from the same generator (images, labels, which carry it).
        description: what the artifact is and where the stamp puts it, for people.
    """

    class_index: int
    rows: np.ndarray
    stamp: Callable[[np.ndarray], np.ndarray]
    region: tuple[slice, slice]
    test: DemoSplit
    description: str


@dataclass
class AuditData:
    """The audited samples, plus the artifact planted in them when they are the demo's."""

    source: DataSource
    fingerprint: str
    description: str
    planted: PlantedArtifact | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def close(self) -> None:
        """Close the source's files, if it holds any."""
        if hasattr(self.source, "close"):
            self.source.close()


def _demo_data(config: DataConfig, seed: int, stages: Path) -> AuditData:
    """The generated demo, written to ``stages/input.h5`` when its parameters changed.

    Its fingerprint is the generator's parameters: ``input.h5`` is rewritten exactly when
    they change, so hashing its pixels again on every run would only repeat that key (and a
    change of the generator's code is covered by spray's version in the attribution file's
    fingerprint).
    """
    demo = DemoConfig(
        n_per_class=config.n_per_class, artifact_class=config.artifact_class, artifact_fraction=config.artifact_fraction, seed=seed
    )
    key = fingerprint({"demo": asdict(demo)})
    train, test = make_demo(demo)
    path = stages / INPUT_FILE
    if stored_fingerprint(path) != key:
        write_input_h5(path, train.images, train.labels, train.sample_ids, list(demo.class_names))
        with h5py.File(path, "a") as handle:
            handle.create_dataset("stamped", data=train.stamped)
        mark(path, key)
    planted = PlantedArtifact(
        class_index=demo.artifact_class,
        rows=np.flatnonzero(train.stamped),
        stamp=stamp_tag,
        region=tag_region(),
        test=test,
        description="the demo's copyright-like tag stamped in the bottom-right corner",
    )
    return AuditData(
        source=H5Source(path, max_pixels=config.max_image_pixels),
        fingerprint=key,
        description=f"demo ({len(train.labels)} training images, seed {seed})",
        planted=planted,
    )


def open_data(config: DataConfig, base_dir: Path, seed: int, stages: Path) -> AuditData:
    """The dataset named by ``config``; paths are relative to ``base_dir`` (the job file's
    folder), ``seed`` generates the demo, ``stages`` receives its ``input.h5``."""
    names = list(config.class_names) or None
    if config.source == "demo":
        return _demo_data(config, seed, stages)
    if config.source == "folder":
        preprocessing = ImagePreprocessing(config.resize, config.crop)
        source = FolderSource((base_dir / config.path).resolve(), preprocessing, config.strict, names, config.max_image_pixels)
        return AuditData(source, source.fingerprint(), f"image folder {config.path} ({len(source)} images)", skipped=source.skipped)
    if config.source == "h5":
        source = open_h5_source((base_dir / config.path).resolve(), names, config.max_image_pixels)
        return AuditData(source, source.fingerprint(), f"HDF5 {config.path} ({len(source)} samples)")
    if config.source == "npz":
        source = ArrayFileSource((base_dir / config.path).resolve(), names, config.max_image_pixels)
        return AuditData(source, source.fingerprint(), f"npz {config.path} ({len(source)} samples)")
    spec = config.entrypoint
    dataset = call_user_code(spec, "while building the dataset", load_entry_point(spec, base_dir))
    class_names = names or call_user_code(spec, "while listing its classes", lambda: list(getattr(dataset, "classes", []))) or None
    source = DatasetSource(dataset, class_names or [], spec)
    return AuditData(source, source.fingerprint(), f"entry point {spec} ({len(source)} samples)")
