"""Training: the optimizer recipe, the jitted step, the loop, mesh and shardings, checkpoints.

Kept free of heavy imports: import the submodules (`seismo.train.optimizer`, ...) directly.
"""
