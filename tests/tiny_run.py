"""The smallest run the reliability tests train (importable: pytest puts tests/ on the path):
one layer of width 32, batches of 4 x 16 bytes, 8 steps, checkpoints at 0, 4 and 8, evals at
4 and 8, synchronous saves. A run takes a few seconds on a CPU."""

from seismo import config

TINY_RUN = [
    "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.max_seq_len=16",
    "data.batch_size=4", "data.seq_len=16", "data.eval_sequences=4",
    "optimizer.lr=3e-3", "optimizer.warmup_steps=1",
    "run.steps=8", "run.log_every=1", "run.eval_every=4", "run.checkpoint_every=4",
    "run.checkpoint_log_until=0", "run.progress=off", "run.checkpoint_async=false",
]


def tiny_run(*extra: str) -> config.Config:
    """The tiny run's config with `extra` overrides applied after it."""
    return config.load(None, [*TINY_RUN, *extra])
