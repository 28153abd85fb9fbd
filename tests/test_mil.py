"""MIL models: one interface, GLTrans' global-local behaviour, baselines and the registry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from analysis.mil import (
    CLAMSB,
    MIL_MODELS,
    CLAMConfig,
    GLTrans,
    GLTransConfig,
    build_mil,
    mil_config_to_dict,
    mil_name,
)
from analysis.mil.bag import chunked_attention
from analysis.mil.gltrans import LocalConv, grid_cells

SMALL = {"in_dim": 32, "dim": 64}
SMALL_HEADS = {**SMALL, "n_heads": 4}


def small_config(name: str) -> dict:
    return SMALL_HEADS if name in ("gltrans", "transmil") else dict(SMALL)


def random_bag(n: int = 40, dim: int = 32, grid: int = 10, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(n, dim, generator=generator)
    cells = torch.randperm(grid * grid, generator=generator)[:n]
    grid_rc = torch.stack([cells // grid, cells % grid], dim=1)  # unique cells
    return features, grid_rc


def small_gltrans(**overrides) -> GLTrans:
    torch.manual_seed(0)
    return GLTrans(GLTransConfig(**{**SMALL_HEADS, **overrides})).eval()


def test_gltrans_is_deterministic_in_eval_mode():
    model = small_gltrans()
    features, grid_rc = random_bag()
    logits_a, scores_a = model(features, grid_rc)
    logits_b, scores_b = model(features, grid_rc)
    assert torch.equal(logits_a, logits_b)
    assert torch.equal(scores_a, scores_b)


def test_gltrans_logits_ignore_instance_order_and_scores_follow_instances():
    model = small_gltrans()
    features, grid_rc = random_bag(n=60)
    order = torch.randperm(60, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits, scores = model(features, grid_rc)
        logits_p, scores_p = model(features[order], grid_rc[order])
    assert torch.allclose(logits, logits_p, atol=1e-5)
    assert torch.allclose(scores[order], scores_p, atol=1e-6)


def test_gltrans_output_changes_when_an_instance_moves_to_another_grid_cell():
    model = small_gltrans()
    features, grid_rc = random_bag(n=30, grid=10)
    moved = grid_rc.clone()
    moved[0] = torch.tensor([40, 40])  # far from every other instance: no neighbours left
    with torch.no_grad():
        logits, scores = model(features, grid_rc)
        logits_m, scores_m = model(features, moved)
    assert (logits - logits_m).abs().max() > 1e-4
    assert (scores - scores_m).abs().max() > 1e-6


def test_gltrans_only_relative_grid_positions_matter():
    model = small_gltrans()
    features, grid_rc = random_bag()
    with torch.no_grad():
        logits, _ = model(features, grid_rc)
        logits_shifted, _ = model(features, grid_rc + torch.tensor([7, 120]))
    assert torch.allclose(logits, logits_shifted, atol=1e-6)


def test_gltrans_refuses_pixel_coordinates_passed_as_grid_cells():
    model = small_gltrans()
    features, grid_rc = random_bag()
    with pytest.raises(ValueError, match="not level-0 pixels"):
        model(features, grid_rc * 256 * 40)


def test_local_branch_equals_masked_dilated_convolution_on_the_true_grid():
    torch.manual_seed(1)
    dim = 4
    local = LocalConv(dim, (1, 3, 5), kernel_size=3)
    features, grid_rc = random_bag(n=25, dim=dim, grid=9, seed=2)
    with torch.no_grad():
        out = local(features, grid_cells(grid_rc))
    occupied = {tuple(rc.tolist()): features[i] for i, rc in enumerate(grid_rc)}
    for i, (row, col) in enumerate(grid_rc.tolist()):
        expected = torch.zeros(dim)
        for conv in local.convs:
            rate = conv.dilation[0]
            expected += conv.bias.detach()
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    neighbour = occupied.get((row + dy * rate, col + dx * rate))
                    if neighbour is not None:
                        expected += conv.weight[:, 0, dy + 1, dx + 1].detach() * neighbour
        assert torch.allclose(out[i], expected, atol=1e-5)


def test_gltrans_attention_scores_are_the_cls_softmax_over_instances():
    model = small_gltrans()
    features, grid_rc = random_bag()
    with torch.no_grad():
        _, scores = model(features, grid_rc)
    assert scores.shape == (40,)
    assert (scores > 0).all()
    assert 0.5 < float(scores.sum()) < 1.0  # the rest of the softmax mass is on CLS itself


def test_gltrans_contrast_scores_are_deterministic_and_change_sign_with_target():
    model = small_gltrans(score_method="contrast")
    features, grid_rc = random_bag()
    with torch.no_grad():
        _, scores = model(features, grid_rc)
        _, again = model(features, grid_rc)
        for_0 = model.class_contrast_scores(features, grid_rc, target=0)
        for_1 = model.class_contrast_scores(features, grid_rc, target=1)
    assert torch.equal(scores, again)
    assert torch.allclose(for_0, -for_1, atol=1e-6)  # two classes: contrast is antisymmetric


def test_chunked_attention_matches_scaled_dot_product_attention(monkeypatch):
    import analysis.mil.bag as bag

    monkeypatch.setattr(bag, "CHUNK_ELEMENTS", 2 * 3 * 50 * 7)  # chunks of 7 queries
    q, k, v = torch.randn(3, 1, 2, 50, 8).unbind(0)
    assert torch.allclose(chunked_attention(q, k, v), F.scaled_dot_product_attention(q, k, v))


BIG_BAG_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, torch
    torch.set_num_threads(2)
    from analysis.mil import GLTrans, GLTransConfig
    n = int(sys.argv[1])
    torch.manual_seed(0)
    model = GLTrans(GLTransConfig(**json.loads(sys.argv[2]))).eval()
    side = int(n ** 0.5) + 1
    index = torch.arange(n)
    grid_rc = torch.stack([index // side, index % side], dim=1)
    features = torch.randn(n, 1024)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.inference_mode():
        logits, scores = model(features, grid_rc)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_mb": (after - before) / 1024, "logits": list(logits.shape),
                      "scores": list(scores.shape), "finite": bool(torch.isfinite(scores).all())}))
    """
)


def _big_bag_peak(n: int, config: dict) -> dict:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    done = subprocess.run(
        [sys.executable, "-c", BIG_BAG_SCRIPT, str(n), json.dumps(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def _assert_linear_memory(n: int, fraction: float, config: dict | None = None) -> None:
    measured = _big_bag_peak(n, config or {})
    all_heads_matrix_mb = 8 * n * n * 4 / 2**20  # N x N float32 scores of 8 heads
    assert measured["logits"] == [2] and measured["scores"] == [n] and measured["finite"]
    assert measured["peak_mb"] < fraction * all_heads_matrix_mb, measured


def test_gltrans_default_config_on_a_12000_instance_bag_never_builds_an_n_by_n_matrix():
    # 8 heads x N x N float32: 4.3 GiB (one head 0.54 GiB); measured ~0.45 GiB for everything.
    _assert_linear_memory(12_000, fraction=0.15)


def test_gltrans_on_a_50000_instance_1024d_bag_never_builds_an_n_by_n_matrix():
    # 1024-d inputs, a narrower token width so the quadratic compute fits the suite's time;
    # 8 heads x N x N float32 would be 75 GiB (one head 9.3 GiB).
    _assert_linear_memory(50_000, fraction=0.03, config={"dim": 64, "depth": 1})


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("LOWMAG_BIG_BAG_TEST"),
    reason="a 50000-instance forward of the default width takes minutes on 2 cores; "
    "set LOWMAG_BIG_BAG_TEST=1",
)
def test_gltrans_default_config_on_a_50000_instance_bag_never_builds_an_n_by_n_matrix():
    # 8 heads x N x N float32: 75 GiB (one head 9.3 GiB); measured ~1.4 GiB for everything.
    _assert_linear_memory(50_000, fraction=0.03)


@pytest.mark.parametrize("name", sorted(MIL_MODELS))
def test_every_model_returns_logits_and_scores_and_trains_a_step(name):
    torch.manual_seed(0)
    model = build_mil(name, small_config(name))
    features, grid_rc = random_bag(n=23)
    logits, scores = model(features, grid_rc)
    assert logits.shape == (2,) and scores.shape == (23,)
    batched_logits, batched_scores = model(features[None], grid_rc[None])
    assert batched_logits.shape == (1, 2) and batched_scores.shape == (23,)

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    loss = F.cross_entropy(logits[None], torch.tensor([1]))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    changed = sum(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert changed > len(before) // 2


@pytest.mark.parametrize("loss_kind", ["svm", "ce"])
def test_clam_instance_loss_is_finite_and_backpropagates(loss_kind):
    torch.manual_seed(0)
    model = CLAMSB(CLAMConfig(**SMALL, instance_loss=loss_kind, subtyping=True, k_sample=4))
    features, grid_rc = random_bag(n=20)
    loss = model.instance_loss(features, grid_rc, label=1)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert model.instance_heads[1].weight.grad.abs().sum() > 0  # in-class classifier
    assert model.instance_heads[0].weight.grad.abs().sum() > 0  # subtyping: out-of-class
    assert model.attention.score.weight.grad is None  # top-k selection is not differentiable
    assert model.embed[0].weight.grad.abs().sum() > 0


def test_clam_single_instance_bag_has_zero_instance_loss():
    model = CLAMSB(CLAMConfig(**SMALL))
    features, grid_rc = random_bag(n=1)
    assert float(model.instance_loss(features, grid_rc, label=0).detach()) == 0.0


def test_transmil_scores_cover_every_instance_including_padded_copies():
    torch.manual_seed(0)
    model = build_mil("transmil", SMALL_HEADS).eval()
    features, grid_rc = random_bag(n=10)  # padded to 16 tokens: 6 copies
    with torch.no_grad():
        _, scores = model(features, grid_rc)
    assert scores.shape == (10,) and (scores > 0).all()
    assert float(scores.sum()) < 1.0


def test_registry_builds_models_from_json_config_and_names_them():
    model = build_mil("gltrans", SMALL_HEADS)
    config = json.loads(json.dumps(mil_config_to_dict(model.config)))
    assert config["dilations"] == [1, 3, 5]
    rebuilt = build_mil("gltrans", config)
    assert rebuilt.config == model.config
    assert mil_name(rebuilt) == "gltrans"
    assert mil_name(build_mil("clam_sb", SMALL)) == "clam_sb"


def test_registry_rejects_unknown_models_and_config_keys():
    with pytest.raises(ValueError, match="unknown MIL model 'dsmil'"):
        build_mil("dsmil", {})
    with pytest.raises(ValueError, match="unknown abmil config keys"):
        build_mil("abmil", {"depth": 3})
    with pytest.raises(ValueError, match="not divisible"):
        build_mil("gltrans", {"dim": 60, "n_heads": 8})
