"""Loss pieces of the tokenizer objective: quantizer precision and restarts, the discriminator, LPIPS.

No real LPIPS weights exist on the test machine (the VGG16 backbone is a download), so
the LPIPS tests use a file that a fixture writes from randomly initialised weights in
the layout of the standard checkpoint. They test the network, the loading and the
gradients, not the calibration of the distance.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import describe, invoke, tiny_recipe
from safetensors.torch import save_file

from wartok_cli.errors import WartokError
from wartok_cli.export import save_model
from wartok_cli.models import ConvTokenizer, ViTTokenizer
from wartok_cli.models.discriminator import (
    PatchDiscriminator,
    hinge_discriminator_loss,
    hinge_generator_loss,
    lecam_regularization,
    patch_map_side,
)
from wartok_cli.models.lpips import LPIPS, lpips_state_dict
from wartok_cli.models.quantizer import CosineQuantizer
from wartok_cli.recipe import load_recipe
from wartok_cli.train.common import DeadCodeRestarter, load_lpips
from wartok_cli.train.gan import Adversary, LeCamAverages, load_discriminator
from wartok_cli.train.loop import EMA, start_run

USER_ERROR = 2


def write_recipe(folder: Path, **reconstruction) -> Path:
    """Write the tiny recipe with extra reconstruction fields; return its path."""
    recipe = tiny_recipe(folder / "runs")
    recipe["reconstruction"] = reconstruction
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def tiny_tokenizer(family: str = "conv2d") -> ConvTokenizer | ViTTokenizer:
    torch.manual_seed(0)
    if family == "vit1d":
        return ViTTokenizer(resolution=16, channels=1, patch_size=4, num_latent_tokens=8, width=16, encoder_depth=1,
                            decoder_depth=1, heads=2, codebook_size=16, code_dim=4)  # fmt: skip
    return ConvTokenizer(resolution=16, channels=1, base_channels=8, channel_mult=(1, 2), codebook_size=16, code_dim=4)


# Quantizer --------------------------------------------------------------------------------


def test_indices_bf16_autocast_equal_fp32():
    # 64k assignments over 512 codes contain many near-ties, which bf16 distances would flip.
    torch.manual_seed(0)
    quantizer = CosineQuantizer(512, 8)
    latents = torch.randn(16, 4096, 8)
    fp32 = quantizer(latents).indices
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = quantizer(latents).indices
    assert torch.equal(bf16, fp32)


def test_latents_are_normalised_inputs():
    torch.manual_seed(0)
    latents = torch.randn(2, 5, 4)
    output = CosineQuantizer(8, 4)(latents)
    torch.testing.assert_close(output.latents, F.normalize(latents, dim=-1))


def test_restart_codes_writes_rows():
    quantizer = CosineQuantizer(8, 4)
    replacements = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, -3.0]])
    quantizer.restart_codes(torch.tensor([1, 6]), replacements)
    torch.testing.assert_close(quantizer.lookup(torch.tensor([1, 6])), F.normalize(replacements, dim=-1))


def test_restart_codes_rejects_shape():
    with pytest.raises(ValueError, match="replacements of shape"):
        CosineQuantizer(8, 4).restart_codes(torch.tensor([1]), torch.zeros(2, 4))


@pytest.fixture()
def restarted(tmp_path) -> dict:
    """Quantize clustered latents with a codebook of which most codes face away, then restart the dead codes."""
    recipe = load_recipe(write_recipe(tmp_path, restart_dead_codes_every=1))
    run = start_run(recipe, "restart", recipe.pretrain)
    tokenizer = tiny_tokenizer()
    quantizer = tokenizer.quantizer
    optimizer = torch.optim.AdamW(tokenizer.parameters(), lr=1e-3)
    quantizer(torch.randn(1, 64, 4)).loss.backward()
    optimizer.step()  # creates the AdamW moments that a restart must reset
    with torch.no_grad():
        quantizer.codebook.copy_(-torch.ones(16, 4))  # every code faces away from the cluster ...
        quantizer.codebook[:2] = torch.ones(2, 4)  # ... except codes 0 and 1
    ema = EMA(tokenizer, 0.999)

    generator = torch.Generator().manual_seed(1)
    latents = torch.ones(1, 64, 4) + 0.3 * torch.randn(1, 64, 4, generator=generator)  # (batch, length, code_dim)
    before = quantizer(latents)
    restarter = DeadCodeRestarter(1, 16, seed=0, device=run.device)
    count = restarter.observe(0, run, tokenizer, optimizer, ema, before.indices, before.latents)
    return {"before": before, "after": quantizer(latents), "count": count, "tokenizer": tokenizer, "ema": ema,
            "optimizer": optimizer, "restarter": restarter}  # fmt: skip


def test_restart_counts_dead_codes(restarted):
    dead = 16 - len(restarted["before"].indices.unique())
    assert dead > 0
    assert restarted["count"] == dead


def test_restart_revives_unused_codes(restarted):
    dead = set(range(16)) - set(restarted["before"].indices.unique().tolist())
    used_after = set(restarted["after"].indices.unique().tolist())
    assert dead <= used_after


def test_restart_copies_into_ema(restarted):
    codebook = restarted["tokenizer"].quantizer.codebook
    torch.testing.assert_close(restarted["ema"].model.quantizer.codebook, codebook)


def test_restart_resets_adam_moments(restarted):
    dead = sorted(set(range(16)) - set(restarted["before"].indices.unique().tolist()))
    state = restarted["optimizer"].state[restarted["tokenizer"].quantizer.codebook]
    assert state["exp_avg_sq"][dead].abs().sum() == 0


def test_restart_keeps_used_codes(restarted):
    used = restarted["before"].indices.unique()
    codes = restarted["tokenizer"].quantizer.codebook.detach()
    torch.testing.assert_close(codes[used], torch.ones(len(used), 4))


def test_restart_waits_for_window(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path))
    run = start_run(recipe, "window", recipe.pretrain)
    tokenizer = tiny_tokenizer()
    optimizer = torch.optim.AdamW(tokenizer.parameters(), lr=1e-3)
    output = tokenizer.quantizer(torch.ones(1, 8, 4))  # every latent picks the same code
    restarter = DeadCodeRestarter(3, 16, seed=0, device=run.device)
    counts = [restarter.observe(step, run, tokenizer, optimizer, None, output.indices, output.latents)
              for step in range(3)]  # fmt: skip
    assert counts == [0, 0, 15]


def test_restart_skips_nonfinite_latents(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path))
    run = start_run(recipe, "nonfinite", recipe.pretrain)
    tokenizer = tiny_tokenizer()
    before = tokenizer.quantizer.codebook.detach().clone()
    optimizer = torch.optim.AdamW(tokenizer.parameters(), lr=1e-3)
    restarter = DeadCodeRestarter(1, 16, seed=0, device=run.device)
    indices = torch.zeros(1, 8, dtype=torch.int64)
    latents = torch.full((1, 8, 4), float("nan"))
    assert restarter.observe(0, run, tokenizer, optimizer, None, indices, latents) == 0
    assert torch.equal(tokenizer.quantizer.codebook.detach(), before)


# Discriminator ----------------------------------------------------------------------------


@pytest.mark.parametrize(("resolution", "layers", "side"), [(256, 3, 30), (32, 3, 2), (16, 2, 2), (64, 3, 6)])
def test_patch_map_side(resolution, layers, side):
    # 256 pixels and 3 layers give pix2pix's 30 x 30 map of 70 x 70 patches.
    assert patch_map_side(resolution, layers) == side


@pytest.mark.parametrize(("channels", "resolution", "layers"), [(3, 32, 3), (1, 16, 2), (3, 64, 3)])
def test_discriminator_output_shape(channels, resolution, layers):
    discriminator = PatchDiscriminator(channels, 16, layers)
    logits = discriminator(torch.zeros(2, channels, resolution, resolution))
    side = patch_map_side(resolution, layers)
    assert logits.shape == (2, 1, side, side)


@pytest.mark.parametrize("channels", [8, 9, 10, 64])
def test_discriminator_any_width_builds(channels):
    logits = PatchDiscriminator(1, channels, 2)(torch.zeros(1, 1, 16, 16))
    assert logits.shape == (1, 1, 2, 2)


def test_discriminator_default_width():
    widths = [layer.out_channels for layer in PatchDiscriminator().net if isinstance(layer, torch.nn.Conv2d)]
    assert widths == [64, 128, 256, 512, 1]


def test_hinge_confident_discriminator_zero():
    loss = hinge_discriminator_loss(torch.full((4,), 2.0), torch.full((4,), -2.0))
    assert loss.item() == 0.0


def test_hinge_fooled_discriminator_positive():
    loss = hinge_discriminator_loss(torch.full((4,), -1.0), torch.full((4,), 1.0))
    assert loss.item() == pytest.approx(2.0)


def test_hinge_raises_real_logits():
    real = torch.zeros(4, requires_grad=True)
    hinge_discriminator_loss(real, torch.zeros(4)).backward()
    assert (real.grad < 0).all()  # descent moves real logits up


def test_hinge_lowers_fake_logits():
    fake = torch.zeros(4, requires_grad=True)
    hinge_discriminator_loss(torch.zeros(4), fake).backward()
    assert (fake.grad > 0).all()  # descent moves fake logits down


def test_generator_loss_raises_fake_logits():
    fake = torch.zeros(4, requires_grad=True)
    hinge_generator_loss(fake).backward()
    assert (fake.grad < 0).all()


def test_lecam_zero_inside_averages():
    assert lecam_regularization(torch.full((4,), -1.0), torch.full((4,), 1.0), 0.5, 0.0).item() == 0.0


def test_lecam_penalises_spread():
    value = lecam_regularization(torch.full((4,), 2.0), torch.full((4,), -2.0), 0.0, 0.0)
    assert value.item() == pytest.approx(8.0)


def test_lecam_averages_first_update_copies():
    averages = LeCamAverages(0.9)
    averages.update(1.0, -1.0)
    averages.update(0.0, 0.0)
    assert (averages.real, averages.fake) == pytest.approx((0.9, -0.9))


def test_discriminator_too_deep_fails_validation(tmp_path):
    # The tiny recipe's 16-pixel images leave an empty logit map after 3 stride-2 layers.
    with pytest.raises(WartokError, match="Use discriminator_layers of at most 2"):
        load_recipe(write_recipe(tmp_path, discriminator_weight=0.1, discriminator_layers=3))


def test_discriminator_off_depth_not_checked(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, discriminator_layers=3))
    assert recipe.reconstruction.discriminator_layers == 3


def test_load_discriminator_same_config(tmp_path):
    saved = PatchDiscriminator(1, 8, 2)
    save_model(tmp_path / "final", "discriminator", saved)
    loaded = PatchDiscriminator(1, 8, 2)
    assert load_discriminator(loaded, tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), loaded.state_dict().values()))


def test_load_discriminator_other_config(tmp_path):
    save_model(tmp_path / "final", "discriminator", PatchDiscriminator(1, 8, 2))
    assert not load_discriminator(PatchDiscriminator(1, 16, 2), tmp_path)


def test_load_discriminator_absent(tmp_path):
    assert not load_discriminator(PatchDiscriminator(1, 8, 2), tmp_path)


@pytest.fixture()
def adversary(tmp_path) -> Adversary:
    recipe = load_recipe(write_recipe(tmp_path, discriminator_weight=0.5, discriminator_start=3,
                                      discriminator_layers=2, discriminator_channels=8))  # fmt: skip
    run = start_run(recipe, "adversary", recipe.pretrain)
    return Adversary(run, recipe.reconstruction, tiny_tokenizer())


def test_generator_term_zero_before_start(adversary):
    reconstruction = torch.randn(2, 1, 16, 16, requires_grad=True)
    term, parts = adversary.generator_loss(2, reconstruction, reconstruction.pow(2).mean())
    assert term.item() == 0.0
    assert not term.requires_grad
    assert parts["g_weight"] == 0.0


def test_generator_term_on_at_start(adversary):
    reconstruction = torch.randn(2, 1, 16, 16, requires_grad=True)
    term, parts = adversary.generator_loss(3, reconstruction, reconstruction.pow(2).mean())
    term.backward()
    assert parts["g_weight"] == 0.5
    assert reconstruction.grad.abs().sum() > 0


def test_generator_term_freezes_discriminator(adversary):
    reconstruction = torch.randn(2, 1, 16, 16, requires_grad=True)
    term, _ = adversary.generator_loss(3, reconstruction, reconstruction.pow(2).mean())
    term.backward()
    assert all(parameter.grad is None for parameter in adversary.discriminator.parameters())
    assert all(parameter.requires_grad for parameter in adversary.discriminator.parameters())


def test_discriminator_step_skipped_before_start(adversary):
    before = [parameter.detach().clone() for parameter in adversary.discriminator.parameters()]
    parts = adversary.discriminator_step(2, torch.randn(2, 1, 16, 16), torch.randn(2, 1, 16, 16))
    after = list(adversary.discriminator.parameters())
    assert all(torch.equal(old, new) for old, new in zip(before, after))
    assert parts["d_loss"] != parts["d_loss"]  # nan


def test_discriminator_step_lowers_loss(adversary):
    generator = torch.Generator().manual_seed(0)
    real = torch.rand(4, 1, 16, 16, generator=generator)  # bright images ...
    fake = -torch.rand(4, 1, 16, 16, generator=generator)  # ... against dark ones
    losses = [adversary.discriminator_step(3 + step, real, fake)["d_loss"] for step in range(15)]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("family", ["conv2d", "vit1d"])
def test_adaptive_weight_balances_gradients(tmp_path, family):
    recipe = load_recipe(write_recipe(tmp_path, discriminator_weight=1.0, discriminator_adaptive=True,
                                      discriminator_layers=2, discriminator_channels=8))  # fmt: skip
    run = start_run(recipe, "adaptive", recipe.pretrain)
    tokenizer = tiny_tokenizer(family)
    adversary = Adversary(run, recipe.reconstruction, tokenizer)
    images = torch.rand(2, 1, 16, 16) * 2 - 1
    output = tokenizer(images)
    pixels = F.mse_loss(output.reconstruction, images)
    term, _ = adversary.generator_loss(0, output.reconstruction, pixels)
    layer = adversary.last_layer
    pixel_norm = torch.autograd.grad(pixels, layer, retain_graph=True)[0].norm()
    term_norm = torch.autograd.grad(term, layer)[0].norm()
    # The weighted term's gradient at the last layer has the pixel loss's norm (up to the 1e-4 guard).
    torch.testing.assert_close(term_norm, pixel_norm, rtol=1e-3, atol=1e-6)


# LPIPS -----------------------------------------------------------------------------------


def random_lpips_state() -> dict[str, torch.Tensor]:
    """Return LPIPS weights in the lpips package's layout, randomly initialised (no real weights exist here)."""
    torch.manual_seed(0)
    network = LPIPS()
    state = network.state_dict()
    for index in range(5):
        state[f"lin{index}.model.1.weight"] = torch.rand_like(state[f"lin{index}.model.1.weight"])  # non-negative
    return state


@pytest.fixture(scope="module")
def lpips_file(tmp_path_factory) -> Path:
    """Write random LPIPS weights in the lpips package's layout with torch.save; the real ones cannot be fetched."""
    path = tmp_path_factory.mktemp("lpips") / "lpips_vgg.pth"
    torch.save(random_lpips_state(), path)
    return path


@pytest.fixture(scope="module")
def lpips_network(lpips_file) -> LPIPS:
    return load_lpips(lpips_file)


def test_lpips_absent_fails_validation(tmp_path):
    path = write_recipe(tmp_path, perceptual_weight=0.5, lpips_weights=str(tmp_path / "missing.pth"))
    with pytest.raises(WartokError) as caught:
        load_recipe(path)
    message = str(caught.value)
    assert "reconstruction.lpips_weights" in message
    assert f"not found at {tmp_path / 'missing.pth'}" in message
    assert "VGG16 backbone" in message
    assert "lin0.model.1.weight" in message
    assert "--set reconstruction.lpips_weights=PATH" in message


def test_lpips_unset_fails_validation(tmp_path):
    with pytest.raises(WartokError, match="LPIPS weights file, which is not set"):
        load_recipe(write_recipe(tmp_path, perceptual_weight=0.5))


def test_lpips_absent_cli_exit_two(tmp_path):
    result = invoke("recipe", "validate", str(write_recipe(tmp_path, perceptual_weight=0.5)))
    assert result.exit_code == USER_ERROR, describe(result)
    assert "Traceback" not in result.output


def test_lpips_small_resolution_fails_validation(tmp_path, lpips_file):
    recipe = tiny_recipe(tmp_path / "runs")
    recipe["data"]["resolution"] = 8
    recipe["reconstruction"] = {"perceptual_weight": 0.5, "lpips_weights": str(lpips_file)}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(WartokError, match="data.resolution of at least 16"):
        load_recipe(path)


def test_lpips_unused_file_not_checked(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, lpips_weights=str(tmp_path / "missing.pth")))
    assert recipe.reconstruction.perceptual_weight == 0.0


def test_lpips_identical_images_zero(lpips_network):
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    assert lpips_network(images, images).abs().max().item() == 0.0


def test_lpips_different_images_positive(lpips_network):
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 16, 16, generator=generator) * 2 - 1
    others = torch.rand(3, 3, 16, 16, generator=generator) * 2 - 1
    assert (lpips_network(images, others) > 0).all()


def test_lpips_gradient_reaches_images(lpips_network):
    images = (torch.rand(2, 1, 16, 16) * 2 - 1).requires_grad_(True)
    lpips_network(images, torch.zeros(2, 1, 16, 16)).sum().backward()
    assert images.grad.abs().sum() > 0


def test_lpips_weights_frozen(lpips_network):
    assert not any(parameter.requires_grad for parameter in lpips_network.parameters())


def test_lpips_stays_eval(lpips_network):
    lpips_network.train()
    assert not lpips_network.training


def test_lpips_torchvision_layout_equal(lpips_network):
    # torchvision's vgg16 keys (features.N.*) plus the linear layers give the same network.
    state = random_lpips_state()
    renamed = {}
    for key, value in state.items():
        if key.startswith("net.slice"):
            key = "features." + key.split(".", 2)[2]
        renamed[key] = value
    network = LPIPS()
    network.load_state_dict(lpips_state_dict(renamed), strict=False)
    images, others = torch.rand(2, 3, 16, 16) * 2 - 1, torch.zeros(2, 3, 16, 16)
    torch.testing.assert_close(network(images, others), lpips_network(images, others))


def test_lpips_safetensors_loads(tmp_path, lpips_network):
    path = tmp_path / "lpips.safetensors"
    save_file({key: value.contiguous() for key, value in random_lpips_state().items()}, str(path))
    images, others = torch.rand(2, 3, 16, 16) * 2 - 1, torch.zeros(2, 3, 16, 16)
    torch.testing.assert_close(load_lpips(path)(images, others), lpips_network(images, others))


def test_lpips_linear_only_file_rejected(tmp_path):
    # The lpips package's own weights/v0.1/vgg.pth contains only the linear layers.
    path = tmp_path / "vgg.pth"
    torch.save({key: value for key, value in random_lpips_state().items() if key.startswith("lin")}, path)
    with pytest.raises(WartokError, match="26 VGG16 backbone tensors are missing"):
        load_lpips(path)


def test_lpips_pickle_rejected(tmp_path):
    path = tmp_path / "lpips.pth"
    torch.save({"network": LeCamAverages(0.9)}, path)  # an arbitrary object needs plain pickle
    with pytest.raises(WartokError, match="Failed to read the LPIPS weights file"):
        load_lpips(path)


def test_lpips_small_images_rejected(lpips_network):
    with pytest.raises(ValueError, match="at least 16 pixels"):
        lpips_network(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))
