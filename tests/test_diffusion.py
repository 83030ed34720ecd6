"""Training-loop numerics: the fused optimizer path against the per-parameter one, and resuming with it on."""

import dataclasses

import numpy as np
import torch

from model_collapse.diffusion import TrainSettings, build_unet, train
from model_collapse.registry import MODEL_PRESETS

SETTINGS = TrainSettings(train_steps=40, batch_size=16, lr=1e-3, lr_schedule="constant", warmup_steps=5,
                         weight_decay=1e-6, adam_beta1=0.95, adam_beta2=0.999, ema_decay=0.99, label_dropout=0.0,
                         checkpoint_every=20, grad_clip=1.0)


def _images():
    return np.random.default_rng(0).integers(0, 256, size=(64, 8, 8, 1), dtype=np.uint8)


def _weights(s=SETTINGS, **kw):
    torch.manual_seed(0)
    unet = build_unet(MODEL_PRESETS["tiny"], 8, 1)
    train(unet, _images(), None, s, 0, ("test",), **kw)
    return torch.cat([p.detach().flatten() for p in unet.parameters()])


def test_fused_optimizer_clip_and_ema_agree_with_the_per_parameter_loop():
    """Same arithmetic, other rounding: after 40 steps the weights differ by about 1e-7 of their norm (measured);
    1e-5 leaves room for other CPUs' kernels and is far below what one training step changes (about 1e-3)."""
    fused, loop = _weights(fused=True), _weights(fused=False)
    assert torch.equal(fused, _weights(fused=True))  # and the fused path repeats exactly
    assert not torch.equal(fused, _weights(dataclasses.replace(SETTINGS, train_steps=39)))
    assert ((fused - loop).norm() / fused.norm()).item() < 1e-5


def test_resuming_a_fused_run_from_its_checkpoint_is_bit_identical(tmp_path):
    """Training to 20 steps (checkpoint saved at the end), then on to 40 from it, equals 40 at once."""
    whole = _weights()
    torch.manual_seed(0)
    unet = build_unet(MODEL_PRESETS["tiny"], 8, 1)
    ckpt = tmp_path / "ckpt.safetensors"
    train(unet, _images(), None, dataclasses.replace(SETTINGS, train_steps=20), 0, ("test",), checkpoint=ckpt,
          save_final=True)
    torch.manual_seed(1)  # a different fresh model: everything must come from the checkpoint
    unet = build_unet(MODEL_PRESETS["tiny"], 8, 1)
    train(unet, _images(), None, SETTINGS, 0, ("test",), checkpoint=ckpt)
    assert torch.equal(whole, torch.cat([p.detach().flatten() for p in unet.parameters()]))


def _init_weights():
    torch.manual_seed(0)
    return torch.cat([p.detach().flatten() for p in build_unet(MODEL_PRESETS["tiny"], 8, 1).parameters()])


def test_mixed_precision_training_stays_finite_and_near_full_precision():
    full = _weights()
    for dtype in (torch.bfloat16, torch.float16):
        w = _weights(amp_dtype=dtype)
        assert torch.isfinite(w).all() and not torch.equal(w, full)
        moved = (full - _init_weights()).norm()
        assert (w - full).norm() < 0.5 * moved, dtype  # training went the same way, at lower precision


def test_fp16_overflow_is_skipped_and_the_scale_backs_off(monkeypatch, tmp_path):
    """A loss scale far too large makes every fp16 gradient overflow: those steps are skipped (the weights stay as
    they were, never NaN) and the scale halves until steps go through."""
    import model_collapse.diffusion as D

    monkeypatch.setattr(D, "FP16_INIT_SCALE", 2.0**40)
    one = dataclasses.replace(SETTINGS, train_steps=1, ema_decay=None)
    assert torch.equal(_weights(one, amp_dtype=torch.float16), _init_weights())  # the one step was skipped
    w = _weights(amp_dtype=torch.float16)
    assert torch.isfinite(w).all() and not torch.equal(w, _init_weights())


def test_resuming_fp16_training_restores_the_loss_scale(monkeypatch, tmp_path):
    """With a scale that backs off during the first 20 steps, resuming from the step-20 checkpoint equals training
    straight through only if the scaler's state came back with it."""
    import model_collapse.diffusion as D
    from safetensors.torch import load_file

    monkeypatch.setattr(D, "FP16_INIT_SCALE", 2.0**40)
    whole = _weights(amp_dtype=torch.float16)
    torch.manual_seed(0)
    unet = build_unet(MODEL_PRESETS["tiny"], 8, 1)
    ckpt = tmp_path / "ckpt.safetensors"
    train(unet, _images(), None, dataclasses.replace(SETTINGS, train_steps=20), 0, ("test",), checkpoint=ckpt,
          save_final=True, amp_dtype=torch.float16)
    assert float(load_file(str(ckpt))["scaler.scale"]) < 2.0**40
    unet = build_unet(MODEL_PRESETS["tiny"], 8, 1)
    train(unet, _images(), None, SETTINGS, 0, ("test",), checkpoint=ckpt, amp_dtype=torch.float16)
    assert torch.equal(whole, torch.cat([p.detach().flatten() for p in unet.parameters()]))

