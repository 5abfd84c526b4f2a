"""What the gateway (service/) and the worker (worker/) share, and the only code both import: the job
contract (jobs.py), the Redis key layout and terminal-state writes (ledger.py), the job event
stream's layout and writer (events.py), the shared and worker settings (settings.py), JSON logs
(logs.py) and the software version (version.py). No torch, no FastAPI."""
