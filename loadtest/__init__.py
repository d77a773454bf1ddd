"""Load tests for functok serve: locust users, a one-command runner, a soak test (see loadtest/README.md)."""
