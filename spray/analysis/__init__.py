"""The analysis stage: SpRAy clustering of relevance heatmaps and Clever Hans scores.

* ``spray.analysis.pipeline``: ``SprayConfig``, ``analyze_class``, ``analyze_dataset``.
* ``spray.analysis.preprocess``: pooling, sign handling, normalisation, bad-input checks.
* ``spray.analysis.graph``: sparse kNN affinity graph (exact or approximate neighbours).
* ``spray.analysis.spectral``: normalised Laplacian, eigenpairs, eigengap rule.
* ``spray.analysis.cluster``: Ng-Jordan-Weiss clustering of the spectral embedding.
* ``spray.analysis.embed``: 2-d pictures (UMAP, t-SNE, spectral).
* ``spray.analysis.artifacts``: the per-cluster Clever Hans score and its threshold.
* ``spray.analysis.result``: ``ClassAnalysis`` / ``ClusterResult``, the stage's output.

Results are written to ``analysis.h5`` by ``spray.store.analysis``.

Import the submodules directly; this package imports nothing heavy on its own.
"""
