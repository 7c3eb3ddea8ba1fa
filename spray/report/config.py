"""The report's settings (``[report]``), declared once (:mod:`spray.config`): caps that keep a
report of a large dataset small and quick to open."""

from __future__ import annotations

from dataclasses import dataclass

from spray.config import Range, setting, validate


@dataclass(frozen=True)
class ReportConfig:
    """``[report]``: how much a report shows.

    Attributes:
        samples_per_grid: members shown per flagged cluster (image and overlay each).
        cluster_samples: members shown per cluster in the class sections (overlay only).
        max_class_thumbnails: total overlays across all class sections; with many classes
            ``cluster_samples`` shrinks (down to 1) to stay within it.
        max_flag_sections: flags shown in full; further flags are listed in a table.

    With the defaults a page holds at most 30 * 24 * 2 + 1500 = 2940 thumbnails of at most
    64 px a side (about 10 kB each for noisy 224 px photos, less for simpler images), plus
    two charts of about 5-20 kB per class. A concept atlas adds, per detailed flag,
    2 * n_concepts * (1 + n_references) small pictures (56 with the atlas defaults).
    """

    samples_per_grid: int = setting(24, Range(1), doc="members shown per flagged cluster")
    cluster_samples: int = setting(8, Range(1), doc="members shown per cluster in the class sections")
    max_class_thumbnails: int = setting(1500, Range(1), doc="overlays across all class sections")
    max_flag_sections: int = setting(30, Range(1), doc="flags shown in full (the rest in a table)")

    def __post_init__(self) -> None:
        validate(self)
