"""Training: the configuration and the recipes (config.py, recipes.py), `fit` (trainer.py) and its steps
(loop.py), the run's data (training_data.py), optimisers and schedules (optim.py, lookahead.py), the state it
checkpoints (state.py, checkpoint.py, run_folder.py), where it computes (runtime.py), loggers and progress, the
LR finder (lr_find.py) and torchrun (launch.py). The package exports nothing itself: `cnnlab.fit`,
`cnnlab.train(...)`, `cnnlab.lr_find` and `cnnlab.TrainConfig` are the entry points, and each module here is
public."""
