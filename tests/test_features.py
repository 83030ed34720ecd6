"""Feature spaces without downloads: the real DINOv2 and Inception architectures, randomly initialised, saved to a
temporary folder and loaded by the same code as real weights; the domain network; FID against torch-fidelity."""

import numpy as np
import pytest
import torch

from model_collapse.errors import UserError
from model_collapse.features import SpaceContext, build_inception, extract, train_domain_net
from model_collapse.metrics import frechet_distance, gaussian_stats


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def inception_dir(tmp_path_factory):
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("inception")
    torch.manual_seed(0)
    net = build_inception(None)  # torch-fidelity's FID Inception-v3, random weights
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(d / "inception.safetensors"))
    return d, net


def test_inception_features_load_like_real_weights(images, inception_dir):
    d, net = inception_dir
    feats = extract("inception", images, SpaceContext(feature_dir=str(d)))
    assert feats.shape == (6, 2048)
    with torch.no_grad():
        ref = net(torch.from_numpy(images).permute(0, 3, 1, 2))[0].numpy()
    np.testing.assert_allclose(feats, ref, rtol=1e-5, atol=1e-6)


def test_our_fid_equals_torch_fidelity_on_the_same_features(rng):
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    a = rng.normal(size=(300, 16)).astype(np.float32)
    b = (rng.normal(size=(300, 16)) * 1.3 + 0.2).astype(np.float32)
    s1, s2 = fid_features_to_statistics(torch.from_numpy(a)), fid_features_to_statistics(torch.from_numpy(b))
    theirs = fid_statistics_to_metric(s1, s2, verbose=False)["frechet_inception_distance"]
    ours = frechet_distance(*gaussian_stats(a), *gaussian_stats(b))
    assert ours == pytest.approx(theirs, rel=1e-6)


def test_dinov2_cls_features_from_a_local_folder(images, tmp_path):
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(hidden_size=384, num_attention_heads=6, num_hidden_layers=12,
                                     patch_size=14, image_size=518))  # dinov2-small's architecture
    proc = BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                             do_center_crop=True, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    model.save_pretrained(tmp_path / "dinov2-small")
    proc.save_pretrained(tmp_path / "dinov2-small")
    feats = extract("dinov2-small", images[:3], SpaceContext(feature_dir=str(tmp_path)))
    assert feats.shape == (3, 384)
    with torch.no_grad():
        px = proc(images=list(images[:3]), return_tensors="pt")["pixel_values"]
        ref = model.eval()(pixel_values=px).last_hidden_state[:, 0].numpy()
    np.testing.assert_allclose(feats, ref, rtol=1e-4, atol=1e-5)


def test_missing_weights_name_model_place_and_option(images, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(UserError, match=r"inception: .*not found.*feature_dir") as e:
        extract("inception", images, SpaceContext(feature_dir=str(tmp_path)))
    assert str(tmp_path) in str(e.value)
    with pytest.raises(UserError, match=r"dinov2-small: weights of facebook/dinov2-small not found.*--feature-dir"):
        extract("dinov2-small", images, SpaceContext(feature_dir=str(tmp_path)))


def test_domain_network_is_bit_identical_for_a_seed(rng):
    imgs = rng.integers(0, 256, size=(200, 8, 8, 1), dtype=np.uint8)
    labels = rng.integers(0, 10, 200)
    a = train_domain_net(imgs, labels, seed=3, steps=30)
    b = train_domain_net(imgs, labels, seed=3, steps=30)
    c = train_domain_net(imgs, None, seed=3, steps=30)  # autoencoder objective without labels
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    ctx = SpaceContext(real_images=imgs, real_labels=labels, seed=3, domain_steps=30)
    f = extract("domain", imgs[:20], ctx)
    assert f.shape == (20, 64) and np.isfinite(f).all()
    assert c.head.out_features == 64


def test_domain_network_is_saved_and_reused(rng, tmp_path):
    imgs = rng.integers(0, 256, size=(100, 8, 8, 1), dtype=np.uint8)
    ctx = SpaceContext(run_dir=str(tmp_path), real_images=imgs, seed=1, domain_steps=20)
    f1 = extract("domain", imgs, ctx)
    assert (tmp_path / "features" / "domain.safetensors").exists()
    from model_collapse import features

    features._CACHE.clear()
    f2 = extract("domain", imgs, ctx)  # loaded from the file this time
    np.testing.assert_array_equal(f1, f2)
    # a damaged file, or whole weights of another network: set aside, trained again, the same features
    path = tmp_path / "features" / "domain.safetensors"
    from safetensors.torch import save_file

    for damage in (lambda: path.write_bytes(path.read_bytes()[:100]),
                   lambda: save_file({"w": torch.zeros(3)}, str(path))):
        damage()
        features._CACHE.clear()
        np.testing.assert_array_equal(extract("domain", imgs, ctx), f1)
        aside = tmp_path / "features" / "domain.safetensors.damaged"
        assert aside.exists()
        aside.unlink()


def test_fid_command_in_pixel_and_domain_space(tmp_path, rng, capsys):
    import json

    from model_collapse.cli import main

    a = rng.integers(0, 256, size=(60, 8, 8), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-40, 40, size=a.shape), 0, 255).astype(np.uint8)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    for space in ("pixel", "domain"):
        assert main(["fid", str(tmp_path / "b.npy"), "--ref", str(tmp_path / "a.npy"), "--space", space,
                     "--json"]) == 0
        res = json.loads(capsys.readouterr().out)
        assert res["fd"] > 0 and 0 <= res["precision"] <= 1 and "kid" in res


def test_the_domain_network_is_the_same_at_any_thread_count():
    """Whichever process of a run trains the domain network (a worker on one core, or the run's own process on
    every core), it is the same network: training runs on one thread and restores the caller's count."""
    import torch
    from sklearn.datasets import load_digits

    from model_collapse.features import train_domain_net

    d = load_digits()
    imgs = (d.images[:400] * 255 / 16).astype(np.uint8)[..., None]
    nets = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            nets.append([p.detach().clone() for p in train_domain_net(imgs, d.target[:400], 0, 12).parameters()])
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(*nets))
