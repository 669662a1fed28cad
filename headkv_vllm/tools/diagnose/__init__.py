"""`diagnose-needle`: which prompt tokens each KV head keeps, checked against the independent reference, without a server."""
