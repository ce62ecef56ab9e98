"""Launching runs beyond one invocation: a registry queue, workers that drain it, Slurm via submitit.

``queue`` records runs as queued without executing them and refuses SQLite where jobs may run on
other nodes; ``worker`` claims queued runs (one process per run, through ``runner``) and puts back
the ones it cannot finish; ``slurm`` submits workers as one job array through submitit, shows and
cancels their jobs; ``tuning`` runs one Optuna study from several workers.
"""
