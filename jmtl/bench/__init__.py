"""jmtl.bench."""
