"""Speed and memory benchmark: ``python -m vistok.eval.bench``, apart from the evaluation modules.

Measures, side by side in one run (``--sections``):

* ``train`` (:mod:`.train_step`): one training step (forward + backward + AdamW) of the 1D
  (``titok``) and 2D (``conv``) tokenizers: images/s, peak memory, FLOPs per step, achieved
  FLOP/s and model FLOPs utilisation (:mod:`.flops`), which attention kernel and matmul dtypes
  ran, and whether anything in forward + backward waits on the host (:mod:`.audit`). On CUDA:
  bf16 autocast, with and without ``torch.compile``.
* ``codec`` (:mod:`.codec`): ``encode`` and ``decode`` images/s, and decoding every prefix
  k = 1..K of each image, as the rate-distortion evaluation does.
* ``quantizers`` (:mod:`.quantizers`): forward + backward time and peak memory of each
  quantizer next to ``vector-quantize-pytorch``'s equivalent at equal settings, and the ratio.
  Optional: ``pip install -e ".[bench]"``.
* ``data`` (:mod:`.data`, also ``python -m vistok.eval.bench.data`` with its own options): the
  training stream's images/s next to torchvision's ImageFolder.

Timing and peak memory are read by :mod:`.measure`, on CPU in a fresh child process per case
(:mod:`.isolate`); :mod:`.plan` turns the arguments into cases, :mod:`.targets` judges the
performance targets, :mod:`.tables` prints, and :mod:`.cli` writes the JSON (``--output``,
atomically). The evaluation modules (metrics, score, rate_distortion, baselines) never import
from here; the benchmark uses them.
"""

