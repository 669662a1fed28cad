"""Helpers of the tests: shared engine settings, kernel cases, and the scripts the engine tests run in fresh processes."""
