"""`stress`: load, client disconnects and bad requests against a real server, then a check that nothing leaked."""
