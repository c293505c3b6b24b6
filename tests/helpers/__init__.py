"""Helpers several test files share (one module per job); fixtures stay in conftest.py."""
