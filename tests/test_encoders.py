from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from analysis.encoders import (
    ResNet50,
    ResNet50Trunc,
    WeightsMismatchError,
    build_encoder,
    build_model,
    calibrate_batchnorm,
    count_parameters,
    imagenet_normalize,
    load_weights,
)
from analysis.errors import AnalysisError


def _patches(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Smooth, stain-coloured uint8 patches (N, size, size, 3)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        fx, fy, phase = rng.uniform(1, 6, 3)
        wave = 0.5 + 0.5 * np.sin(2 * np.pi * (fx * xx + fy * yy) + phase)  # (S, S)
        colour = rng.uniform([150, 60, 120], [230, 140, 200])
        noise = rng.normal(0, 8, (size, size, 3))
        out.append(np.clip(wave[..., None] * colour + 30 + noise, 0, 255))
    return np.stack(out).astype(np.uint8)


@pytest.fixture(scope="module")
def torchvision_state() -> dict[str, torch.Tensor]:
    """A full ResNet50 state dict in torchvision's layout, with non-trivial BN statistics."""
    torch.manual_seed(123)
    full = ResNet50()
    for module in full.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.0)
    return full.state_dict()


def test_full_resnet50_has_torchvision_parameter_count_and_keys():
    model = ResNet50()
    keys = model.state_dict().keys()
    assert count_parameters(model) == 25_557_032
    for key in (
        "conv1.weight",
        "bn1.running_mean",
        "layer1.0.conv1.weight",
        "layer1.0.downsample.0.weight",
        "layer1.0.downsample.1.running_var",
        "layer3.5.bn3.num_batches_tracked",
        "layer4.2.conv3.weight",
        "fc.weight",
        "fc.bias",
    ):
        assert key in keys
    assert model.fc.weight.shape == (1000, 2048)


def test_trunc_model_stops_after_layer3_with_1024_dims():
    model = ResNet50Trunc()
    keys = model.state_dict().keys()
    assert not any(k.startswith(("layer4.", "fc.")) for k in keys)
    blocks = model.eval().forward_blocks(torch.zeros(2, 3, 64, 64))
    assert blocks["layer1"].shape == (2, 256, 16, 16)
    assert blocks["layer2"].shape == (2, 512, 8, 8)
    assert blocks["layer3"].shape == (2, 1024, 4, 4)
    assert blocks["pooled"].shape == (2, 1024)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_torchvision_state_dict_loads_strictly_into_trunc_and_matches_full_model(
    tmp_path, torchvision_state, suffix
):
    path = tmp_path / f"resnet50{suffix}"
    if suffix == ".pth":
        torch.save(torchvision_state, path)
    else:
        save_file({k: v.contiguous() for k, v in torchvision_state.items()}, str(path))
    full = ResNet50()
    full.load_state_dict(torchvision_state)
    trunc = load_weights(ResNet50Trunc(), path)
    for key, value in trunc.state_dict().items():
        assert torch.equal(value, torchvision_state[key]), key
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        expected = full.eval()._blocks(x)["layer3"].mean(dim=(2, 3))  # (2, 1024)
        got = trunc.eval()(x)
    torch.testing.assert_close(got, expected)


def test_unexpected_key_raises_naming_it(tmp_path, torchvision_state):
    state = dict(torchvision_state)
    state["classifier.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "extra.pth")
    with pytest.raises(WeightsMismatchError, match=r"unexpected key\(s\): classifier\.weight"):
        load_weights(ResNet50Trunc(), tmp_path / "extra.pth")


def test_missing_key_raises_naming_it(tmp_path, torchvision_state):
    state = {k: v for k, v in torchvision_state.items() if k != "layer2.1.conv2.weight"}
    torch.save(state, tmp_path / "missing.pth")
    with pytest.raises(WeightsMismatchError, match=r"missing key\(s\): layer2\.1\.conv2\.weight"):
        load_weights(ResNet50Trunc(), tmp_path / "missing.pth")


def test_wrong_shape_raises(tmp_path, torchvision_state):
    state = dict(torchvision_state)
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    torch.save(state, tmp_path / "shape.pth")
    with pytest.raises(WeightsMismatchError, match="wrong shape"):
        load_weights(ResNet50Trunc(), tmp_path / "shape.pth")


def test_full_model_refuses_trunc_file(tmp_path):
    torch.save(ResNet50Trunc().state_dict(), tmp_path / "trunc.pth")
    with pytest.raises(
        WeightsMismatchError, match=r"52 missing key\(s\): layer4\.0\.conv1\.weight"
    ):
        load_weights(ResNet50(), tmp_path / "trunc.pth")


def test_old_files_without_num_batches_tracked_and_dataparallel_prefix_load(
    tmp_path, torchvision_state
):
    state = {
        f"module.{k}": v for k, v in torchvision_state.items() if "num_batches_tracked" not in k
    }
    torch.save(state, tmp_path / "old.pth")
    trunc = load_weights(ResNet50Trunc(), tmp_path / "old.pth")
    assert torch.equal(trunc.conv1.weight, torchvision_state["conv1.weight"])


def test_unreadable_weight_file_raises_analysis_error(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(AnalysisError, match="cannot read weight file"):
        build_encoder("resnet50_trunc", weights=bad)
    with pytest.raises(AnalysisError, match="does not exist"):
        build_encoder("resnet50_trunc", weights=tmp_path / "absent.safetensors")


def test_unknown_encoder_name_raises():
    with pytest.raises(AnalysisError, match="unknown encoder 'vit_huge'"):
        build_encoder("vit_huge")


def test_fallback_teacher_is_deterministic_and_labelled():
    a, b = build_encoder(device="cpu"), build_encoder(device="cpu")
    assert a.weights_source == "seeded-init(seed=0)"
    b_state = b.model.state_dict()
    for key, value in a.model.state_dict().items():
        assert torch.equal(value, b_state[key]), key
    torch.manual_seed(99)  # global RNG state must not leak into the fallback init
    c = build_model("resnet50_trunc")
    assert torch.equal(c.conv1.weight, a.model.conv1.weight)


@pytest.mark.parametrize("size", [64, 256])
def test_embed_returns_n_by_1024_float32(size):
    encoder = build_encoder(device="cpu", batch_size=2)
    out = encoder.embed(_patches(3, size))
    assert out.shape == (3, 1024)
    assert out.dtype == np.float32
    assert np.isfinite(out).all()


def test_embed_is_independent_of_batch_size():
    patches = _patches(5, 64)
    small = build_encoder(device="cpu", batch_size=2).embed(patches)
    large = build_encoder(device="cpu", batch_size=8).embed(patches)
    np.testing.assert_allclose(small, large, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_bf16_embeddings_stay_within_tolerance_of_fp32(channels_last):
    patches = _patches(4, 64, seed=3)
    ref = build_encoder(device="cpu", precision="fp32").embed(patches)
    bf16 = build_encoder(device="cpu", precision="bf16", channels_last=channels_last)
    out = bf16.embed(patches)
    cosine = (out * ref).sum(1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1))
    assert cosine.min() > 0.99
    assert not np.array_equal(out, ref)  # bf16 really ran


def test_precision_is_validated():
    with pytest.raises(ValueError, match="precision"):
        build_encoder(precision="fp8", device="cpu")


def test_imagenet_normalize_layout_and_values():
    patch = np.zeros((1, 2, 2, 3), np.uint8)
    patch[..., 0] = 255
    x = imagenet_normalize(patch)
    assert x.shape == (1, 3, 2, 2)
    assert x[0, 0, 0, 0].item() == pytest.approx((1 - 0.485) / 0.229, rel=1e-5)
    assert x[0, 1, 0, 0].item() == pytest.approx(-0.456 / 0.224, rel=1e-5)


def test_calibrate_batchnorm_sets_statistics_from_unlabeled_batches():
    model = build_model("resnet50_trunc")
    before = model.bn1.running_var.clone()
    batches = [imagenet_normalize(_patches(4, 64, seed=s)) for s in range(2)]
    calibrate_batchnorm(model, batches)
    assert not model.training
    assert not torch.equal(model.bn1.running_var, before)
    assert model.bn1.momentum == 0.1  # momentum restored
    # the stem BN now normalises the stem's conv output: per-channel mean ~ running mean
    with torch.inference_mode():
        conv = model.conv1(torch.cat(batches))
    torch.testing.assert_close(
        model.bn1.running_mean, conv.mean(dim=(0, 2, 3)), atol=1e-4, rtol=1e-4
    )


@pytest.mark.parametrize("size", [64, 256])
def test_vit_tiny_embeds_any_multiple_of_16_and_exposes_blocks(size):
    encoder = build_encoder("vit_tiny", device="cpu")
    assert encoder.embed(_patches(2, size)).shape == (2, 192)
    blocks = encoder.blocks(_patches(2, size))
    tokens = size // 16
    assert blocks["layer1"].shape == (2, 192, tokens, tokens)
    assert blocks["layer3"].shape == (2, 192, tokens, tokens)
    assert blocks["pooled"].shape == (2, 192)


def test_vit_tiny_weights_round_trip_and_classifier_head_is_dropped(tmp_path):
    source = build_model("vit_tiny", seed=5)
    state = dict(source.state_dict())
    state["head.weight"], state["head.bias"] = torch.zeros(1000, 192), torch.zeros(1000)
    save_file(state, str(tmp_path / "vit.safetensors"))
    encoder = build_encoder("vit_tiny", weights=tmp_path / "vit.safetensors", device="cpu")
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(encoder.model(x), source.eval()(x))


# --- configurable ViT: UNI / Phikon layouts ---------------------------------------------------

SMALL_UNI = "vit:uni,dim=64,depth=3,heads=4"


def test_uni_encoder_has_vit_l16_shapes_keys_and_parameter_count():
    from analysis.encoders import UNI, VisionTransformer
    from tests.vit_layouts import uni_layout

    with torch.device("meta"):
        model = VisionTransformer(UNI)
        published = {k: v.shape for k, v in uni_layout(1024, 24).items()}
    own = {k: v.shape for k, v in model.state_dict().items()}
    assert own == published  # every key and shape of UNI's checkpoint, nothing else
    assert count_parameters(model) == 303_350_784  # ViT-L/16 without head, plus LayerScale
    assert model.embed_dim == 1024 and model.block_taps == (7, 15, 23)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_uni_layout_weights_load_and_give_5x_maps_and_embeddings(tmp_path, suffix):
    from tests.vit_layouts import uni_layout

    state = uni_layout(64, 3)
    state["mask_token"] = torch.zeros(1, 64)  # some masked-pretraining exports keep it
    path = tmp_path / f"uni{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    encoder = build_encoder(SMALL_UNI, weights=path, device="cpu")
    assert torch.equal(encoder.model.blocks[2].ls2.gamma, state["blocks.2.ls2.gamma"])
    blocks = encoder.blocks(_patches(2, 64))  # 5x patch: 4 x 4 tokens
    assert blocks["layer1"].shape == (2, 64, 4, 4) and blocks["pooled"].shape == (2, 64)
    assert encoder.embed(_patches(3, 256)).shape == (3, 64)


def test_layerscale_changes_the_output():
    from tests.vit_layouts import uni_layout

    model = build_model(SMALL_UNI)
    model.load_state_dict(uni_layout(64, 3))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        model.blocks[0].ls1.gamma.mul_(5)
        assert not torch.allclose(model(x), before)


def test_phikon_hugging_face_checkpoint_loads_into_the_timm_layout(tmp_path):
    from analysis.encoders import hf_vit_to_timm
    from tests.vit_layouts import phikon_layout

    hf = phikon_layout(48, 3)
    save_file(hf, str(tmp_path / "phikon.safetensors"))
    spec = "vit:phikon,dim=48,depth=3,heads=4"
    model = build_model(spec, weights=tmp_path / "phikon.safetensors")
    q, k, v = (
        hf[f"encoder.layer.1.attention.attention.{n}.weight"] for n in ("query", "key", "value")
    )
    assert torch.equal(model.blocks[1].attn.qkv.weight, torch.cat([q, k, v]))
    assert torch.equal(model.norm.weight, hf["layernorm.weight"])
    assert model.config.eps == 1e-12
    # the same network through a timm-named file gives the same embedding
    save_file(hf_vit_to_timm(hf), str(tmp_path / "timm.safetensors"))
    again = build_model(spec, weights=tmp_path / "timm.safetensors")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), again(x))


def test_registers_and_mean_pooling_use_timms_names():
    model = build_model("vit:dim=32,depth=3,heads=2,registers=4,pool=mean,layerscale=1")
    keys = set(model.state_dict())
    assert {
        "reg_token",
        "fc_norm.weight",
        "blocks.0.ls1.gamma",
    } <= keys and "norm.weight" not in keys
    assert model.state_dict()["pos_embed"].shape == (1, 14 * 14 + 5, 32)
    blocks = model.forward_blocks(torch.randn(2, 3, 64, 64))
    assert blocks["layer2"].shape == (2, 32, 4, 4) and blocks["pooled"].shape == (2, 32)


def test_a_weight_file_of_another_width_fails_in_one_clear_line(tmp_path):
    from tests.vit_layouts import uni_layout

    save_file(uni_layout(96, 3), str(tmp_path / "wide.safetensors"))
    with pytest.raises(WeightsMismatchError) as caught:
        build_encoder(SMALL_UNI, weights=tmp_path / "wide.safetensors", device="cpu")
    message = str(caught.value)
    assert "\n" not in message
    assert "48 wrong shape key(s)" in message and "attn.proj.weight (96, 96) != (64, 64)" in message
    assert "timm-layout ViT" in message and "'uni'" in message


def test_a_resnet_file_into_a_vit_is_refused(tmp_path, torchvision_state):
    save_file(dict(torchvision_state), str(tmp_path / "r50.safetensors"))
    with pytest.raises(WeightsMismatchError, match="missing key"):
        build_model(SMALL_UNI, weights=tmp_path / "r50.safetensors")


def test_bad_vit_specs_are_one_line_errors():
    with pytest.raises(AnalysisError, match="'depth=x' is not a int|depth='x' is not a int"):
        build_model("vit:depth=x")
    with pytest.raises(AnalysisError, match="is not key=value"):
        build_model("vit:width=3")
    with pytest.raises(AnalysisError, match="divisible by heads"):
        build_model("vit:dim=30,heads=4")


def test_any_module_with_forward_blocks_can_be_registered():
    from analysis.encoders import ENCODERS, register_encoder

    class Tiny(torch.nn.Module):
        embed_dim = 8

        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 4, stride=4)

        def forward_blocks(self, x):
            l1 = self.conv(x)
            l2 = torch.nn.functional.avg_pool2d(l1, 2)
            l3 = torch.nn.functional.avg_pool2d(l2, 2)
            return {"layer1": l1, "layer2": l2, "layer3": l3, "pooled": l3.mean((2, 3))}

        def forward(self, x):
            return self.forward_blocks(x)["pooled"]

    register_encoder("tiny_test", Tiny)
    try:
        encoder = build_encoder("tiny_test", device="cpu")
        assert encoder.embed(_patches(2, 64)).shape == (2, 8)
        with pytest.raises(AnalysisError, match="is taken"):
            register_encoder("tiny_test", Tiny)
    finally:
        ENCODERS.pop("tiny_test")


# --- Swin-T / CTransPath ---------------------------------------------------------------------

SMALL_CTRANSPATH = "swin:ctranspath,dim=16,head_dim=8"


def test_ctranspath_has_swin_t_shapes_keys_and_parameter_count():
    from analysis.encoders import CTRANSPATH, SWIN_T, SwinTransformer
    from tests.swin_layouts import swin_layout

    derived = ("relative_position_index", "attn_mask")  # buffers recomputed for any input size
    published = {k: v.shape for k, v in swin_layout().items() if not k.endswith(derived)}
    with torch.device("meta"):
        ctranspath, swin_t = SwinTransformer(CTRANSPATH), SwinTransformer(SWIN_T)
    assert {k: v.shape for k, v in ctranspath.state_dict().items()} == published
    assert ctranspath.embed_dim == 768 and CTRANSPATH.heads == (3, 6, 12, 24)
    # timm swin_tiny_patch4_window7_224 is 28,288,354 with its 1000-way head (769,000)
    assert count_parameters(swin_t) == 28_288_354 - 769_000
    assert count_parameters(ctranspath) == 27_520_038  # 4 x 4 patch embed -> conv stem


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_ctranspath_checkpoint_with_published_keys_and_shapes_loads(tmp_path, suffix):
    from tests.swin_layouts import swin_layout

    state = swin_layout()  # full Swin-T shapes, with the derived buffers timm 0.5.4 saves
    path = tmp_path / f"ctranspath{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"model": state}, path)  # CTransPath's release wraps it in {'model': ...}
    model = build_model("ctranspath", weights=path)
    for key in ("patch_embed.proj.4.running_var", "layers.2.blocks.5.attn.relative_position_bias_table",
                "layers.1.downsample.reduction.weight", "norm.bias"):  # fmt: skip
        assert torch.equal(model.state_dict()[key], state[key]), key


@pytest.mark.parametrize("size", [64, 256])
def test_ctranspath_gives_768_d_embeddings_and_stage_maps_at_5x_and_20x(size):
    encoder = build_encoder("ctranspath", device="cpu")
    patches = _patches(1, size)
    blocks = encoder.blocks(patches)
    s = size // 8
    assert blocks["layer1"].shape == (1, 192, s, s)
    assert blocks["layer2"].shape == (1, 384, s // 2, s // 2)
    assert blocks["layer3"].shape == (1, 768, s // 4, s // 4)
    embedding = encoder.embed(patches)
    assert embedding.shape == (1, 768) and np.isfinite(embedding).all()
    np.testing.assert_allclose(embedding[0], blocks["pooled"][0].numpy(), rtol=1e-4, atol=1e-5)


def test_shifted_windows_mix_across_window_borders_and_padding_keeps_sizes():
    model = build_model(SMALL_CTRANSPATH)
    block = model.layers[0].blocks[1]  # shifted block of stage 0
    x = torch.zeros(1, 14, 14, 16)
    x[0, 6, 6] = torch.randn(16)  # a token at the bottom-right corner of the first window
    with torch.no_grad():
        block.mlp.fc2.weight.zero_()  # leave only the attention branch
        block.mlp.fc2.bias.zero_()
        shifted = block(x)
        block.shifted = False
        plain = block(x)
    # the token reaches across the window border (to 7, 7) only when windows are shifted
    assert shifted[0, 7, 7].abs().sum() > 1e-4 and plain[0, 7, 7].abs().sum() < 1e-6
    assert shifted[0, 13, 13].abs().sum() < 1e-6  # rolled in from the far edge: masked
    with torch.no_grad():  # 10 x 10 map: padded to 14 x 14 windows, cropped back
        assert block(torch.randn(2, 10, 10, 16)).shape == (2, 10, 10, 16)


def test_newer_timm_swin_layout_and_a_head_load_into_swin_t(tmp_path):
    from tests.swin_layouts import swin_layout

    state = swin_layout(dim=32, depths=(1, 1, 1, 1), head_dim=16, conv_stem=False)
    newer = {}
    for k, v in state.items():
        if ".downsample." in k:  # timm >= 0.9 merges at the start of stages 1..3
            i, _, rest = k.removeprefix("layers.").partition(".")
            k = f"layers.{int(i) + 1}.{rest}"
        newer[k] = v
    newer["head.fc.weight"], newer["head.fc.bias"] = torch.zeros(1000, 256), torch.zeros(1000)
    save_file(newer, str(tmp_path / "swin.safetensors"))
    model = build_model(
        "swin:dim=32,depths=1-1-1-1,head_dim=16", weights=tmp_path / "swin.safetensors"
    )
    assert torch.equal(
        model.layers[0].downsample.norm.weight, state["layers.0.downsample.norm.weight"]
    )


def test_a_swin_file_of_another_width_fails_in_one_clear_line(tmp_path):
    from tests.swin_layouts import swin_layout

    save_file(swin_layout(dim=32, head_dim=8), str(tmp_path / "wide.safetensors"))
    with pytest.raises(WeightsMismatchError) as caught:
        build_encoder(SMALL_CTRANSPATH, weights=tmp_path / "wide.safetensors", device="cpu")
    message = str(caught.value)
    assert "\n" not in message
    assert "181 wrong shape key(s)" in message
    assert "layers.0.blocks.0.attn.proj.weight (32, 32) != (16, 16)" in message
    assert "timm-layout Swin" in message and "'ctranspath'" in message


def test_a_vit_file_into_ctranspath_and_bad_swin_specs_are_refused(tmp_path):
    from tests.vit_layouts import uni_layout

    save_file(uni_layout(64, 3), str(tmp_path / "uni.safetensors"))
    with pytest.raises(WeightsMismatchError, match="missing key.*unexpected key"):
        build_model(SMALL_CTRANSPATH, weights=tmp_path / "uni.safetensors")
    with pytest.raises(AnalysisError, match="is not key=value"):
        build_model("swin:width=3")
    with pytest.raises(AnalysisError, match="divisible by head_dim"):
        build_model("swin:dim=20")


class _TinyNet(torch.nn.Module):
    """A small real network: (B, 3, H, W) -> (B, 8), each patch on its own."""

    embed_dim = 8

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean(dim=(2, 3))  # (B, 8)


def test_embed_halves_its_batch_when_the_cpu_allocator_runs_out_of_memory():
    from analysis.encoders import Encoder
    from tests.fake_accelerator import MemoryLimitedNet, cpu_out_of_memory

    net = _TinyNet().eval()
    patches = _patches(10, 16)
    expected = Encoder(name="t", model=net, dim=8, weights_source="t", device="cpu").embed(patches)
    limited = MemoryLimitedNet(net, max_batch=3, error=cpu_out_of_memory)
    encoder = Encoder(
        name="t", model=limited, dim=8, weights_source="t", device="cpu", batch_size=8
    )
    np.testing.assert_allclose(encoder.embed(patches), expected, rtol=1e-5, atol=1e-6)
    assert limited.batch_sizes[:3] == [8, 4, 2] and encoder.batch_size == 2

    limited.max_batch = 0
    with pytest.raises(AnalysisError, match=r"one 16x16 px patch does not fit.*t encoder"):
        encoder.embed(patches)


def test_embed_lets_other_runtime_errors_through():
    from analysis.encoders import Encoder
    from tests.fake_accelerator import MemoryLimitedNet

    broken = MemoryLimitedNet(_TinyNet().eval(), max_batch=0, error=RuntimeError)
    encoder = Encoder(name="t", model=broken, dim=8, weights_source="t", device="cpu", batch_size=4)
    with pytest.raises(RuntimeError, match="^4 patches$"):
        encoder.embed(_patches(4, 16))
    assert broken.batch_sizes == [4]  # not taken for out-of-memory: no smaller retry
