"""The audited data: the embedded Clever Hans demo and users' own datasets.

``base`` is the interface every source implements (``DataSource``, recipes for Dask
workers, errors); ``h5``, ``folder``, ``arrays`` and ``entrypoint`` are the formats, one
module each; ``demo`` generates the demo set; ``config`` declares ``[data]``; ``open``
opens what a job names (``open_data``), with the artifact planted in the demo's data.
"""
