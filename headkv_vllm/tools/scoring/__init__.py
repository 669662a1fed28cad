"""Head scores and budgets: `score-heads` (the R and R2 probes), `import-scores`, `budgets` and `calibrate`."""
