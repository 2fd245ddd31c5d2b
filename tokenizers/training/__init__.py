"""The training side: the LightningModule, losses, callbacks, SLURM support and run assembly.

It imports the model core (``vistok.tokenizers``); the core never imports it.
"""
