"""jmtl.train."""
