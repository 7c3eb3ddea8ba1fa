"""The report stage: ``reports/<job>/index.html`` for people and ``summary.json`` for machines.

* ``spray.report.context``: ``ReportContext``, everything the report is rendered from
  (including the optional concept atlas records).
* ``spray.report.summary``: ``build_summary`` / ``write_summary``; the JSON schema.
* ``spray.report.render``: ``render_report(context, out_dir)``, the self-contained page.
* ``spray.report.views``: the page model and the caps that keep big reports small.
* ``spray.report.plots``: spectrum and embedding charts, heatmap and overlay thumbnails.
* ``spray.report.rows``: ordered reads from NumPy or ``h5py`` arrays, member selection.
* ``spray.report.atlas``: ``build_concept_atlas``, CRP concepts of flagged clusters (needs
  the model; run by the audit).
* ``spray.report.index``: ``write_index(reports_root)``, the list of all audits.
* ``spray.report.compare``: ``write_comparison(before, after, out_dir)``, two audits diffed.
* ``spray.report.virelay``: ``export_virelay(audit_dir)``, the audit as a ViRelAy project.

Import the submodules directly; this package imports nothing heavy on its own.
See ``docs/report.md`` for what the pages show and how they stay offline and small.
"""
