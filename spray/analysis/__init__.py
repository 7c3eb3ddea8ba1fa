"""The analysis stage: SpRAy clustering of relevance heatmaps and Clever Hans scores.

* ``spray.analysis.pipeline``: ``SprayConfig``, ``analyze_class``, ``analyze_dataset``,
  ``analyze_spaces`` (heatmap and concept spaces, per class and dataset-wide).
* ``spray.analysis.preprocess``: pooling, sign handling, square-root scaling,
  normalisation, bad-input checks.
* ``spray.analysis.graph``: PCA, sparse kNN affinity graph (exact, or an inverted-file
  index for large inputs).
* ``spray.analysis.spectral``: normalised Laplacian, eigenpairs (deflated Lanczos),
  eigengap rule.
* ``spray.analysis.cluster``: Ng-Jordan-Weiss clustering of the spectral embedding
  (k-means, mini-batch k-means, Ward, DBSCAN, HDBSCAN).
* ``spray.analysis.embed``: 2-d pictures (UMAP, t-SNE, spectral; subset plus graph
  placement for large inputs).
* ``spray.analysis.artifacts``: the per-cluster Clever Hans score and its threshold.
* ``spray.analysis.result``: ``ClassAnalysis`` / ``ClusterResult``, the stage's output.

Results are written to ``analysis.h5`` by ``spray.store.analysis``. ``docs/analysis.md``
describes the method and its calibration.

Import the submodules directly; this package imports nothing heavy on its own.
"""
