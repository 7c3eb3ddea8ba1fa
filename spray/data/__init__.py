"""Dataset sources: the embedded Clever Hans demo and (later) users' own data."""
