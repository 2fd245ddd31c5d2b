"""The Lightning side of training: one module for every tokenizer (1D or 2D, any quantizer).

:class:`TokenizerModule` wraps an :class:`~vistok.tokenizers.model.ImageTokenizer` built from a plain
config (``build_tokenizer(**tokenizer)``) and trains it with

- reconstruction loss (L1 and/or L2) + the quantizer's auxiliary loss + optional LPIPS;
- an optional adversarial loss (VQGAN: patch discriminator, hinge, adaptive weight, start step,
  optional LeCAM) with a second optimizer;
- AdamW with linear warm-up then cosine decay, gradient clipping, optional ``torch.compile``;
- an exponential moving average of the weights (timm's ``ModelEmaV3``), used for validation and
  saved as ``checkpoint["ema_state_dict"]`` for export;
- validation at several token counts (PSNR, SSIM, codebook usage and perplexity through eval's
  :class:`~vistok.eval.metrics.ReconstructionEvaluator`) and a reconstruction grid;
- a stop with the step and the loss terms when a loss or the gradient norm turns NaN/inf,
  before any checkpoint of the broken weights is written.

Steps. Optimization is manual. Lightning counts ``global_step`` once per
``LightningOptimizer.step()``, so only the generator steps through its LightningOptimizer; the
discriminator steps through the strategy directly (same precision/strategy handling, not
counted). ``global_step``, ``trainer.max_steps``, the schedules, ``adversarial.start`` and the
checkpoint step all count generator steps.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from timm.utils import ModelEmaV3
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics.aggregation import SumMetric

from vistok.eval.metrics import ReconstructionEvaluator
from vistok.eval.plots import labelled_rows
from vistok.eval.rate_distortion import halving_token_counts
from vistok.tokenizers.errors import VistokError
from vistok.tokenizers.export import TOKENIZER_PREFIX, add_prefix, strip_prefix, vistok_version
from vistok.tokenizers.model import ImageTokenizer, build_tokenizer
from vistok.tokenizers.training import two_stage
from vistok.tokenizers.training.losses import (
    LeCAM,
    PatchDiscriminator,
    PerceptualLoss,
    adaptive_generator_weight,
    decoder_last_layer,
    hinge_d_loss,
    hinge_g_loss,
)
from vistok.tokenizers.training.settings import (
    EMASettings,
    LossSettings,
    OptimSettings,
    ValidationSettings,
    check_ranges,
    parse_settings,
)

# Where the module's own submodules keep their weights in its state_dict (the tokenizer's is TOKENIZER_PREFIX).
EMA_PREFIX = "ema.module."
PERCEPTUAL_PREFIX = "perceptual."


def warmup_cosine(warmup_steps: int, max_steps: int, min_ratio: float):
    """LR multiplier per step: linear warm-up to 1, then cosine down to ``min_ratio`` at max_steps."""

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier


class TrainingDiverged(RuntimeError):
    """A loss term or the gradient norm became NaN or infinite; the message names the step and terms."""


# ---------------------------------------------------------------------------------------------


class TokenizerModule(pl.LightningModule):
    """Train an :class:`ImageTokenizer`.

    Args:
        tokenizer: ``build_tokenizer`` kwargs (plain mapping, quantizer included).
        loss, optim, ema, validation: the blocks of the same names in configs/train.yaml; keys left
            out take their defaults from there, unknown keys are an error
            (:mod:`vistok.tokenizers.training.settings`).
        compile: ``torch.compile`` the tokenizer's training forward.
        teacher: path of a 2D VQ tokenizer for two-stage TiTok (:mod:`~vistok.tokenizers.training.two_stage`):
            its codebook and decoder become the model's pixel decoder, its codes stage 1's targets.

    Batches are ``{"image": (B, 3, H, W) float in [0, 1]}``.
    """

    def __init__(self, tokenizer: Mapping[str, Any], loss: Mapping[str, Any] | None = None,
                 optim: Mapping[str, Any] | None = None, ema: Mapping[str, Any] | None = None,
                 validation: Mapping[str, Any] | None = None, compile: bool = False,
                 teacher: str | None = None) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.loss_settings: LossSettings = parse_settings(LossSettings, loss, "loss")
        self.optim_settings: OptimSettings = parse_settings(OptimSettings, optim, "optim")
        self.ema_settings: EMASettings = parse_settings(EMASettings, ema, "ema")
        self.val_settings: ValidationSettings = parse_settings(ValidationSettings, validation, "validation")
        check_ranges(self.loss_settings, self.optim_settings, self.ema_settings)
        tokenizer = dict(tokenizer)
        # A list keeps the teacher out of the state_dict, the checkpoint and the EMA copy.
        self._teacher = [two_stage.load_teacher(teacher)] if teacher is not None else []
        if self._teacher:
            tokenizer = two_stage.with_teacher(tokenizer, self._teacher[0])
        self._check_proxy_stage()
        self.tokenizer: ImageTokenizer = build_tokenizer(**tokenizer)
        if self._teacher:
            two_stage.copy_teacher(self.tokenizer, self._teacher[0])
        self.val_token_counts = self._check_token_counts(self.val_settings.token_counts)
        # Plain dicts only: the checkpoint must load with torch.load(weights_only=True).
        self.save_hyperparameters({
            "tokenizer": self.tokenizer.config,
            "loss": asdict(self.loss_settings),
            "optim": asdict(self.optim_settings),
            "ema": asdict(self.ema_settings),
            "validation": asdict(self.val_settings),
            "compile": bool(compile),
        })

        adversarial = self.loss_settings.adversarial
        perceptual = self.loss_settings.perceptual
        self.perceptual = PerceptualLoss(perceptual.weights_path) if perceptual.weight > 0 else None
        self.discriminator = None
        self.lecam = None
        if adversarial.weight > 0:
            self.discriminator = PatchDiscriminator(adversarial.channels, adversarial.num_layers, adversarial.norm,
                                                    self.tokenizer.image_size)
            if adversarial.lecam_weight > 0:
                self.lecam = LeCAM(adversarial.lecam_decay)

        # The EMA copy is taken before compiling, so it holds a plain module. Buffers (e.g. an EMA
        # VQ codebook, itself a moving average) are copied rather than averaged.
        self.ema = None
        if self.ema_settings.enabled:
            self.ema = ModelEmaV3(self.tokenizer, decay=self.ema_settings.decay, use_warmup=self.ema_settings.use_warmup,
                                  warmup_power=self.ema_settings.warmup_power, exclude_buffers=True)
            self.ema.requires_grad_(False)
            # it only ever runs under validation's eval(); leaving timm's eval() here would make
            # Lightning warn about modules in eval mode at the start of training
            self.ema.train()
        if compile:
            self.tokenizer.compile()

        self.evaluator = ReconstructionEvaluator(self.val_token_counts, codebook_size=self.tokenizer.codebook_size,
                                                 token_dim=self.tokenizer.token_dim)
        self.val_images = SumMetric()  # validation images seen, summed over ranks
        self.last_val_metrics: dict[str, float] = {}
        self.latest_grid: torch.Tensor | None = None  # (3, H', W') in [0, 1], labelled rows, set by validation
        self._grid_rows: list[torch.Tensor] | None = None  # the first validation batch, then its reconstructions

        # Names of the tracked loss terms, fixed so a NaN record has one shape from the first step.
        self.term_names = ["total"] + [name for name in ("l1", "l2") if getattr(self.loss_settings, f"{name}_weight") > 0]
        self.term_names.append("quantizer")
        if self.loss_settings.proxy_weight > 0:
            self.term_names.append("proxy")
        if self.perceptual is not None:
            self.term_names.append("perceptual")
        if self.discriminator is not None:
            self.term_names += ["generator", "adaptive_weight", "discriminator"]
        self.term_names.append("grad_norm")
        self._healthy: torch.Tensor | None = None  # device bool: every step so far was finite
        self._step: torch.Tensor | None = None  # device long: the generator step of the latest _track_finite
        self._bad_step: torch.Tensor | None = None
        self._bad_values: torch.Tensor | None = None

    # ------------------------------------------------------------------ setup

    def _check_proxy_stage(self) -> None:
        """Stage 1 of two-stage TiTok learns the teacher's codes and decodes no pixels."""
        loss = self.loss_settings
        if loss.proxy_weight == 0:
            return
        if not self._teacher:
            raise VistokError("loss.proxy_weight > 0 trains on a teacher's codes; pass teacher=PATH (a 2D VQ tokenizer) or set loss.proxy_weight=0.")
        pixel = [name for name, weight in [("loss.l1_weight", loss.l1_weight), ("loss.l2_weight", loss.l2_weight),
                 ("loss.perceptual.weight", loss.perceptual.weight), ("loss.adversarial.weight", loss.adversarial.weight)] if weight > 0]
        if pixel:
            raise VistokError(f"stage 1 of two-stage TiTok (loss.proxy_weight > 0) decodes no pixels, so {', '.join(pixel)} must be 0; "
                              "train the pixel losses in stage 2 (init_from the stage-1 run, loss.proxy_weight=0).")

    def _check_token_counts(self, counts: list[int] | None) -> list[int]:
        k_max = self.tokenizer.max_tokens
        if counts is None:
            return halving_token_counts(k_max) if self.tokenizer.decodes_prefixes else [k_max]
        if not self.tokenizer.decodes_prefixes and counts != [k_max]:
            raise VistokError(f"validation.token_counts is {counts}, but this {self.tokenizer.arch} tokenizer decodes only its full grid of {k_max} tokens; set validation.token_counts=[{k_max}] or null.")
        if not counts:
            raise VistokError("validation.token_counts is empty; list at least one token count, or set it to null for K/8, K/4, K/2, K.")
        bad = [k for k in counts if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= k_max]
        if bad:
            raise VistokError(f"validation.token_counts has {bad[0]!r}, but the model has {k_max} tokens per image; "
                              f"use token counts from 1 to {k_max}, or validation.token_counts=null for K/8, K/4, K/2, K.")
        return sorted(set(counts))

    @property
    def eval_model(self) -> ImageTokenizer:
        """The weights validation and export use: the EMA copy when enabled."""
        return self.ema.module if self.ema is not None else self.tokenizer

    def configure_optimizers(self):
        settings = self.optim_settings
        max_steps = self.trainer.max_steps if self._trainer is not None else -1
        if max_steps is None or max_steps < 1:
            raise VistokError(f"trainer.max_steps is {max_steps}, but the cosine schedule needs the number of steps; set trainer.max_steps to a positive number.")
        decay = [p for p in self.tokenizer.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in self.tokenizer.parameters() if p.requires_grad and p.ndim < 2]
        schedule = warmup_cosine(settings.warmup_steps, max_steps, settings.min_lr_ratio)
        # the fused kernel is one op for all tensors instead of ~10 per tensor (CPU and CUDA)
        fused = self.device.type in ("cpu", "cuda")
        generator = torch.optim.AdamW(
            [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=settings.lr, betas=tuple(settings.betas), eps=settings.eps, fused=fused)
        if self.discriminator is None:
            return [generator], [LambdaLR(generator, schedule)]
        disc_lr = self.loss_settings.adversarial.lr or settings.lr
        discriminator = torch.optim.AdamW(self.discriminator.parameters(), lr=disc_lr, betas=tuple(settings.betas),
                                          eps=settings.eps, weight_decay=settings.weight_decay, fused=fused)
        return [generator, discriminator], [LambdaLR(generator, schedule), LambdaLR(discriminator, schedule)]

    # ------------------------------------------------------------------ training

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images = batch["image"]
        optimizers, schedulers = self.optimizers(), self.lr_schedulers()
        opt_g, opt_d = (optimizers, None) if not isinstance(optimizers, list) else optimizers
        sched_g, sched_d = (schedulers, None) if not isinstance(schedulers, list) else schedulers
        settings = self.loss_settings
        adversarial = self.discriminator is not None and self.global_step >= settings.adversarial.start

        if settings.proxy_weight > 0:  # two-stage TiTok, stage 1: the teacher's codes are the targets
            out = two_stage.proxy_forward(self.tokenizer, self._teacher[0], images, step=self.global_step)
            recon = None  # no pixel loss is on (checked in __init__)
        else:
            # training mode: lengths from the tail-token dropout and perturbed tokens, where configured
            out = self.tokenizer(images, step=self.global_step)
            recon = out.reconstruction
        zero = out.quantizer.loss.new_zeros(()).float()
        terms = dict.fromkeys(self.term_names, zero)
        terms["quantizer"] = out.quantizer.loss.float()
        nll = settings.quantizer_weight * terms["quantizer"]
        if settings.proxy_weight > 0:
            terms["proxy"] = out.loss.float()
            nll = nll + settings.proxy_weight * terms["proxy"]
        if settings.l1_weight > 0:
            terms["l1"] = F.l1_loss(recon.float(), images)
            nll = nll + settings.l1_weight * terms["l1"]
        if settings.l2_weight > 0:
            terms["l2"] = F.mse_loss(recon.float(), images)
            nll = nll + settings.l2_weight * terms["l2"]
        if self.perceptual is not None:
            terms["perceptual"] = self.perceptual(recon, images).mean().float()
            nll = nll + settings.perceptual.weight * terms["perceptual"]
        total = nll

        if adversarial:
            self.toggle_optimizer(opt_g)  # the discriminator is a fixed critic for this step
            terms["generator"] = hinge_g_loss(self.discriminator(recon)).float()
            if settings.adversarial.adaptive:
                last_layer = decoder_last_layer(self.tokenizer.decoder)
                terms["adaptive_weight"] = adaptive_generator_weight(nll, terms["generator"], last_layer,
                                                                     settings.adversarial.max_adaptive_weight)
            else:
                terms["adaptive_weight"] = torch.ones_like(zero)
            total = nll + settings.adversarial.weight * terms["adaptive_weight"] * terms["generator"]
        terms["total"] = total

        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(total)
        terms["grad_norm"] = self._clip(self.tokenizer.parameters())
        opt_g.step()  # the one counted step: global_step += 1
        sched_g.step()
        if adversarial:
            self.untoggle_optimizer(opt_g)
        if self.ema is not None:
            self.ema.update(self.tokenizer, step=self.global_step)

        if opt_d is not None:
            if adversarial:
                terms["discriminator"] = self._discriminator_step(opt_d, images, recon.detach())
            with warnings.catch_warnings():
                # stepped before the discriminator starts on purpose: its schedule is indexed by
                # generator steps, like the generator's (torch warns about the order once)
                warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*before.*optimizer.step", category=UserWarning)
                sched_d.step()

        self._track_finite(terms)
        every = self.optim_settings.finite_check_every
        if every is None:  # null: at the logging interval, where Lightning reads the logged values back anyway
            every = self.trainer.log_every_n_steps if self._trainer is not None else 1
        if every and self.global_step % every == 0:
            self.check_finite()
        self.log_dict({f"train/{name}": value.detach() for name, value in terms.items()})
        self.log_dict({f"train/quantizer_{name}": value for name, value in out.quantizer.stats.items()})
        self.log("train/mean_tokens", out.lengths.float().mean())
        if out.perturbed is not None:
            self.log("train/perturbed_fraction", out.perturbed.float().mean())
        if "skipped_total" in batch:  # samples the data loader dropped so far (vistok.data.datamodule.TrainLoader)
            self.log("train/num_skipped", torch.tensor(float(batch["skipped_total"])))  # CPU: no device copy
        if settings.proxy_weight > 0:
            self.log("train/proxy_accuracy", out.accuracy)
        return total.detach()

    def _clip(self, parameters) -> torch.Tensor:
        """Clip to ``optim.grad_clip`` (0: no clipping); returns the global norm before clipping."""
        limit = self.optim_settings.grad_clip if self.optim_settings.grad_clip > 0 else float("inf")
        grads = [p for p in parameters if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(grads, limit).float()

    def _discriminator_step(self, opt_d, images: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        logits_real = self.discriminator(images)
        logits_fake = self.discriminator(recon)
        loss = hinge_d_loss(logits_real, logits_fake)
        if self.lecam is not None:
            loss = loss + self.loss_settings.adversarial.lecam_weight * self.lecam(logits_real, logits_fake)
        opt_d.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        self._clip(self.discriminator.parameters())
        # Through the strategy (precision plugin, hooks) but not LightningOptimizer.step, which
        # would count a second global step per batch.
        self.trainer.strategy.optimizer_step(opt_d.optimizer, closure=lambda: None, model=self)
        return loss.detach().float()

    # ------------------------------------------------------------------ NaN / inf guard

    def _track_finite(self, terms: Mapping[str, torch.Tensor]) -> None:
        """Record, on the device (no host sync), the first step whose terms were not all finite.

        Called once per generator step, after it; the step count lives on the device too (set from
        ``global_step`` once, then incremented there), so no step makes a host-to-device copy.
        """
        values = torch.stack([terms[name].detach().float().reshape(()) for name in self.term_names])
        finite = torch.isfinite(values).all()
        if self._healthy is None:
            self._healthy = torch.ones((), dtype=torch.bool, device=values.device)
            self._step = torch.full((), self.global_step, dtype=torch.long, device=values.device)
            self._bad_step = torch.zeros((), dtype=torch.long, device=values.device)
            self._bad_values = torch.zeros_like(values)
        else:
            self._step += 1
        newly_bad = self._healthy & ~finite
        self._bad_step = torch.where(newly_bad, self._step, self._bad_step)
        self._bad_values = torch.where(newly_bad, values, self._bad_values)
        self._healthy = self._healthy & finite

    def check_finite(self) -> None:
        """Raise :class:`TrainingDiverged` if any step so far had a NaN/inf loss term or gradient norm."""
        if self._healthy is None or bool(self._healthy):
            return
        values = ", ".join(f"{name}={value:.4g}" for name, value in zip(self.term_names, self._bad_values.tolist()))
        raise TrainingDiverged(
            f"training stopped: a loss became NaN or infinite at step {int(self._bad_step)} ({values}); "
            "lower optim.lr or raise optim.warmup_steps, and check the data"
        )

    # ------------------------------------------------------------------ validation

    @property
    def validation_metrics(self) -> list[str]:
        """The names each validation logs; ``callbacks.checkpoint.monitor`` picks one of them."""
        names = ["val/images", "val/psnr", "val/ssim", "val/psnr_mean"]
        names += [f"val/{metric}@{k}" for k in self.val_token_counts for metric in ("psnr", "ssim")]
        return names + (["val/usage", "val/perplexity"] if self.tokenizer.is_discrete else [])

    def on_validation_epoch_start(self) -> None:
        self.check_finite()
        self.evaluator.reset()
        self.val_images.reset()
        self._grid_rows = None

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        images = batch["image"]
        model = self.eval_model
        tokens = model.encode(images)
        recon = {k: model.decode(tokens[:, :k]) for k in self.val_token_counts}
        self.evaluator.update(images, recon, indices=tokens if model.is_discrete else None)
        self.val_images.update(images.shape[0])
        if "num_skipped" in batch:  # validation samples that failed to decode, summed over batches and ranks
            self.log("val/num_skipped", batch["num_skipped"].float(), on_step=False, on_epoch=True, reduce_fx="sum", sync_dist=True)
        if self._grid_rows is None and self.val_settings.grid_images > 0:
            n = self.val_settings.grid_images
            self._grid_rows = [images[:n].float().cpu()] + [recon[k][:n].float().cpu() for k in self.val_token_counts]

    def on_validation_epoch_end(self) -> None:
        results = self.evaluator.compute()  # all-reduced across ranks
        self.evaluator.reset()
        k_max = self.val_token_counts[-1]
        metrics: dict[str, float] = {"val/images": float(self.val_images.compute())}
        for k, values in results.items():
            metrics[f"val/psnr@{k}"] = values["psnr"]
            metrics[f"val/ssim@{k}"] = values["ssim"]
        metrics["val/psnr"] = results[k_max]["psnr"]
        metrics["val/ssim"] = results[k_max]["ssim"]
        # the whole rate-distortion curve in one number: what a variable-length tokenizer's best
        # checkpoint should maximise (with late tail-token dropout, PSNR at K alone peaks before the
        # prefixes learn to decode)
        metrics["val/psnr_mean"] = sum(values["psnr"] for values in results.values()) / len(results)
        for name in ("usage", "perplexity"):
            if name in results[k_max]:
                metrics[f"val/{name}"] = results[k_max][name]
        # equal on every rank already (the evaluator all-reduced); sync_dist says so to Lightning
        self.log_dict({name: value for name, value in metrics.items() if name != "val/psnr"}, sync_dist=True)
        self.log("val/psnr", metrics["val/psnr"], prog_bar=True, sync_dist=True)
        if self.trainer.sanity_checking:
            return
        self.last_val_metrics = metrics
        if self._grid_rows is not None:
            labels = ["original"] + [f"{k} tokens, {results[k]['psnr']:.1f} dB" for k in self.val_token_counts]
            self.latest_grid = labelled_rows(list(zip(labels, self._grid_rows)))

    # ------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_finite()  # never write a checkpoint of diverged weights
        state = checkpoint["state_dict"]
        # EMA off: the model is its own average, so export finds the same keys
        checkpoint["ema_state_dict"] = strip_prefix(state, EMA_PREFIX) or strip_prefix(state, TOKENIZER_PREFIX)
        # the EMA copy now lives in ema_state_dict, and frozen LPIPS weights come from their own file
        for key in [key for key in state if key.startswith((EMA_PREFIX, PERCEPTUAL_PREFIX))]:
            del state[key]
        checkpoint["vistok"] = {"metrics": dict(self.last_val_metrics), "step": int(self.global_step),
                                "version": vistok_version()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        if self.ema is not None:
            source = checkpoint.get("ema_state_dict") or strip_prefix(state, TOKENIZER_PREFIX)
            state.update(add_prefix(source, EMA_PREFIX))
        if self.perceptual is not None:
            state.update(add_prefix(self.perceptual.state_dict(), PERCEPTUAL_PREFIX))
        self.last_val_metrics = dict(checkpoint.get("vistok", {}).get("metrics", {}))
