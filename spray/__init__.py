"""spray: dataset-wide Clever Hans detection for PyTorch image classifiers.

An audit runs in stages that meet at files on disk:

``spray.data`` / ``spray.models`` -> ``spray.attribution`` (LRP heatmaps and concept
relevances, ``attributions.h5``) -> ``spray.analysis`` (SpRAy clustering and artifact
scores, ``analysis.h5``) -> ``spray.report`` (``reports/<job>/index.html`` and
``summary.json``) -> ``spray.correction`` (ClArC).
"""

__version__ = "0.1.0"
