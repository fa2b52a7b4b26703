"""After the runs: reports, plots and statistics over run folders."""
