"""What the field's tools read: TensorBoard event files, an MLflow export and the official run folder
(``logs/<dataset>/<name>/{best.pth, configs.yaml, train_log.txt}``).

Standalone writers fed by plain data (a resolved run config, the engine's step and epoch records,
registry rows); the run execution and the CLI call them. Nothing here imports the CLI or the runner.
"""
