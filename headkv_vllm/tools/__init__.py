"""Command-line tools: score-heads, import-scores, budgets, eval-needle, bench, prepare-model."""
