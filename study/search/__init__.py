"""The search: space files, Optuna storage, the worker loop that trains trials, their dashboard reports."""
