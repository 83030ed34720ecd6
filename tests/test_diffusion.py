"""Training-loop numerics: the fused optimizer path against the per-parameter one, and resuming with it on."""

import dataclasses

import numpy as np
import pytest
import torch

from model_collapse.diffusion import TrainSettings, build_unet, train, train_together
from model_collapse.registry import MODEL_PRESETS

SETTINGS = TrainSettings(train_steps=40, batch_size=16, lr=1e-3, lr_schedule="constant", warmup_steps=5,
                         weight_decay=1e-6, adam_beta1=0.95, adam_beta2=0.999, ema_decay=0.99, label_dropout=0.0,
                         checkpoint_every=20, grad_clip=1.0)


class Crash(Exception):
    pass


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



# ---------------------------------------------------------------------------------------------- models together


def _member_inputs(i: int, conditional: bool):
    rng = np.random.default_rng(10 + i)
    images = rng.integers(0, 256, size=(24 + 8 * i, 8, 8, 1), dtype=np.uint8)  # training sets of different sizes
    return images, (rng.integers(0, 3, size=len(images)) if conditional else None)


def _together(members, conditional=False, checkpoints=None, s=SETTINGS, hook=None):
    """Train members (indices) together; returns {i: (flat weights, losses)}."""
    unets = []
    for i in members:
        torch.manual_seed(100 + i)
        unets.append(build_unet(MODEL_PRESETS["tiny"], 8, 1, num_classes=3 if conditional else None))
    data = [_member_inputs(i, conditional) for i in members]
    losses = [[] for _ in members]
    train_together(unets, [d[0] for d in data], [d[1] for d in data], s, [7] * len(members),
                   [("m", i) for i in members], checkpoints=checkpoints, losses=losses, on_checkpoint=hook,
                   null_class=3 if conditional else None)
    return {i: (torch.cat([p.detach().flatten() for p in u.parameters()]), l)
            for i, u, l in zip(members, unets, losses)}


def test_a_model_trained_together_depends_on_itself_only_and_matches_training_alone():
    """Each model's weights and losses are the same bits whoever trains beside it, in any order, and alone (beside
    an unused copy of itself); and within float rounding of `train` on the same draws (about 1e-7 of the weights'
    norm; bounded at 1e-5 as for the fused path above). Unconditional and conditional (with label dropout), and
    with neither EMA nor clipping."""
    for conditional, s in ((False, dataclasses.replace(SETTINGS, train_steps=12)),
                           (True, dataclasses.replace(SETTINGS, train_steps=12, label_dropout=0.25)),
                           (False, dataclasses.replace(SETTINGS, train_steps=12, ema_decay=None, grad_clip=None))):
        three, two, alone = (_together(m, conditional, s=s) for m in ([0, 1, 2], [2, 0], [0]))
        for i in (0, 2):
            assert torch.equal(three[i][0], two[i][0]) and three[i][1] == two[i][1]
        assert torch.equal(three[0][0], alone[0][0]) and three[0][1] == alone[0][1]
        assert not torch.equal(three[0][0], three[1][0])
        torch.manual_seed(100)
        unet = build_unet(MODEL_PRESETS["tiny"], 8, 1, num_classes=3 if conditional else None)
        images, labels = _member_inputs(0, conditional)
        losses = []
        train(unet, images, labels, s, 7, ("m", 0), losses=losses, null_class=3 if conditional else None)
        w = torch.cat([p.detach().flatten() for p in unet.parameters()])
        assert ((w - three[0][0]).norm() / w.norm()).item() < 1e-5
        assert np.allclose(losses, three[0][1], rtol=1e-4)


def test_models_trained_together_resume_exactly_from_checkpoints_at_different_steps(tmp_path):
    """A crash after member 1's checkpoint at step 20 but before member 2's; member 0 meanwhile trained further
    alone (beside a copy of itself, to its checkpoint at 30): resumed together, every member ends as in an
    uninterrupted run. The checkpoints are `train`'s format: `train` resumes one and carries its losses."""
    s = dataclasses.replace(SETTINGS, train_steps=40, checkpoint_every=10)
    whole = _together([0, 1, 2], s=s)
    ckpts = [tmp_path / f"m{i}.safetensors" for i in range(3)]

    def crash(i, step):
        if step == 20 and i == 1:
            raise Crash()

    with pytest.raises(Crash):
        _together([0, 1, 2], checkpoints=ckpts, s=s, hook=crash)
    from safetensors import safe_open

    steps = []
    for c in ckpts:
        with safe_open(str(c), framework="pt") as f:
            steps.append(int(f.metadata()["step"]))
    assert steps == [20, 20, 10]
    torch.manual_seed(102)
    unet = build_unet(MODEL_PRESETS["tiny"], 8, 1)
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(ckpts[2].read_bytes())
    losses = []
    train(unet, _member_inputs(2, False)[0], None, s, 7, ("m", 2), checkpoint=copy, losses=losses)
    assert losses[:10] == whole[2][1][:10] and losses[10:] != whole[2][1][10:]  # resumed at 10, on its own kernels
    w = torch.cat([p.detach().flatten() for p in unet.parameters()])
    assert ((w - whole[2][0]).norm() / w.norm()).item() < 1e-5
    _together([0], checkpoints=ckpts[:1], s=dataclasses.replace(s, train_steps=35))  # member 0 on to step 30
    resumed = _together([0, 1, 2], checkpoints=ckpts, s=s)
    for i in range(3):
        assert torch.equal(whole[i][0], resumed[i][0]) and whole[i][1] == resumed[i][1]
