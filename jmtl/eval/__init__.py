"""jmtl.eval."""
