"""The report stage: ``reports/<job>/index.html`` for people and ``summary.json`` for machines.

* ``spray.report.context``: ``ReportContext``, everything the report is rendered from.
* ``spray.report.summary``: ``build_summary`` / ``write_summary``; the JSON schema.
* ``spray.report.render``: ``render_report(context, out_dir)``, the self-contained page.
* ``spray.report.views``: the page model and the caps that keep big reports small.
* ``spray.report.plots``: spectrum and embedding charts, heatmap and overlay thumbnails.
* ``spray.report.rows``: ordered reads from NumPy or ``h5py`` arrays, member selection.

Import the submodules directly; this package imports nothing heavy on its own.
"""
