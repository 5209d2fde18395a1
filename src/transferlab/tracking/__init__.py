"""MLflow and run identity: run lifecycle, buffered writes, hashes, the sweep context, UI links."""
