"""``spray serve``: a reports folder as a service for a team (``docs/service.md``).

One module per job:

* ``matching``: when a later run's flag is a reviewed finding, and when it changed;
* ``gate``: the deployment gate with reviews (waived, unreviewed, lapsed...), pure;
* ``waivers``: the waiver file that carries the reviews to ``spray check``; ``check``: its
  use by ``spray check``;
* ``models``, ``database``, ``migrations/``: the tables, the engine (SQLite in WAL mode or
  PostgreSQL) and the Alembic history applied at start;
* ``scan``: the runs and flags rebuilt from the ``summary.json`` files; ``specs``: the job
  specs the service may run;
* ``reviews``: reviews in the database; ``tokens`` and ``security``: who may write, CSRF,
  and the paths a request may read;
* ``scheduler`` and ``notify``: queued, scheduled and running audits, and webhooks;
* ``trend`` and ``reach`` (with ``reach_view``): a job's findings across runs and a flag's
  concept reach;
* ``app``, ``api``, ``pages``, ``views``, ``templates/``: the FastAPI application;
  ``command``: the ``spray serve`` command line.

Importing this package imports nothing heavy; the web framework is loaded by ``app``.
"""
