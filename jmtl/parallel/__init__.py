"""jmtl.parallel."""
