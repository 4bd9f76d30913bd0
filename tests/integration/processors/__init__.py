"""Record processors for the worker tests, imported by `flowfleet worker` subprocesses
through PYTHONPATH (see ``worker_helpers.worker_env``).

They read their knobs from the environment, because a worker loads a processor by name
and cannot pass it arguments:

- ``FLOWFLEET_TEST_SLEEP``: seconds each record takes (default 0);
- ``FLOWFLEET_TEST_LOG``: the side-effect log file (``effects.append_log``);
- ``FLOWFLEET_TEST_DSN``: a database the processor writes to over its own connection.
"""
