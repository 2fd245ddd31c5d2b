"""The model core: encoders, quantizers, token dropout, decoders, ``ImageTokenizer``, export and load.

Pure torch: nothing here imports Lightning, Hydra or the training side. ``vistok.tokenizers.training``
wraps these parts for training. The common names are re-exported by ``vistok`` itself
(``vistok.load``, ``vistok.build_tokenizer``, ...).
"""
