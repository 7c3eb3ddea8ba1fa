"""HDF5 layouts of spray's stage outputs, written atomically and versioned.

* ``spray.store.attributions``: ``attributions.h5`` (ViRelAy-readable: ``attribution``,
  ``prediction``, ``label``; plus concept relevances, sample ids and metadata).
* ``spray.store.analysis``: ``analysis.h5`` (SpRAy results per class).
"""
