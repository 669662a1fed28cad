"""The method, free of vLLM: typed settings, head scores, budgets and the page layout."""
