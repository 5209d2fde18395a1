"""What a study concludes across runs: the sweep callback, advise, transferability, report, stats, plot."""
