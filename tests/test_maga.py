from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from analysis.cli import main as lowmag
from analysis.encoders import build_encoder
from analysis.errors import AnalysisError
from analysis.maga import (
    MagaConfig,
    PairCache,
    build_pair_cache,
    embedding_distance,
    embedding_distances,
    maga_loss,
    train_maga,
)
from tests.conftest import shared_slide

CMU = "cmu-1-small-region.svs"


def test_maga_loss_pools_teacher_maps_to_student_size_and_weights_blocks():
    teacher = {
        "layer1": torch.arange(16.0).view(1, 1, 4, 4),
        "pooled": torch.tensor([[1.0, 3.0]]),
    }
    student = {"layer1": torch.zeros(1, 1, 2, 2), "pooled": torch.tensor([[1.0, 1.0]])}
    total, parts = maga_loss(teacher, student, weights=(2.0, 10.0), blocks=("layer1", "pooled"))
    # 2x2 average pools of 0..15 are 2.5, 4.5, 10.5, 12.5 -> mean |.| = 7.5
    assert parts == {"layer1": 7.5, "pooled": 1.0}
    assert total.item() == pytest.approx(2 * 7.5 + 10 * 1.0)


def test_maga_loss_is_zero_when_student_matches_pooled_teacher():
    t = {"layer1": torch.rand(2, 3, 8, 8), "pooled": torch.rand(2, 5)}
    s = {"layer1": torch.nn.functional.avg_pool2d(t["layer1"], 4), "pooled": t["pooled"].clone()}
    total, _ = maga_loss(t, s, weights=(1.0, 200.0), blocks=("layer1", "pooled"))
    assert total.item() == pytest.approx(0.0, abs=1e-6)


def test_embedding_distance_is_normalised_euclidean():
    a = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    b = np.array([[5.0, 0.0], [0.0, -1.0], [4.0, -3.0]])
    np.testing.assert_allclose(embedding_distances(a, b), [0.0, 2.0, np.sqrt(2.0)])
    assert embedding_distance(a, b) == pytest.approx((2.0 + np.sqrt(2.0)) / 3)
    assert embedding_distance(a, 7 * a) == pytest.approx(0.0)


@pytest.fixture(scope="module")
def cmu_pairs(tmp_path_factory) -> PairCache:
    root = tmp_path_factory.mktemp("pairs")
    return build_pair_cache([shared_slide(CMU)], root, low_mag=5, max_patches_per_slide=48)


def test_pair_cache_holds_the_same_tissue_at_both_magnifications(cmu_pairs):
    cache = cmu_pairs
    assert cache.high.shape[1:] == (256, 256, 3) and cache.low.shape[1:] == (64, 64, 3)
    assert cache.high.dtype == np.uint8 and len(cache) == len(cache.l0_xy) > 20
    shrunk = np.stack(
        [np.asarray(Image.fromarray(np.asarray(h)).resize((64, 64), Image.BOX)) for h in cache.high]
    ).astype(float)
    low = np.asarray(cache.low, float)
    same_cell = np.abs(shrunk - low).mean(axis=(1, 2, 3))  # (N,)
    other_cell = np.abs(shrunk - np.roll(low, 1, axis=0)).mean(axis=(1, 2, 3))
    assert same_cell.mean() < 6.0
    assert same_cell.mean() < 0.3 * other_cell.mean()


def test_pair_cache_is_reused_when_rebuilt_with_same_arguments(cmu_pairs):
    again = build_pair_cache(
        [shared_slide(CMU)], cmu_pairs.root, low_mag=5, max_patches_per_slide=48
    )
    np.testing.assert_array_equal(again.l0_xy, cmu_pairs.l0_xy)
    reopened = PairCache.open(cmu_pairs.root)
    assert (reopened.low_mag, reopened.high_mag) == (5.0, 20.0)


def _quick_config(**overrides) -> MagaConfig:
    base = dict(
        epochs=8,
        batch_size=8,
        lr=3e-4,
        lr_decay=0.95,
        holdout_fraction=0.25,
        calibration_patches=16,
        device="cpu",
    )
    return MagaConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def trained(cmu_pairs, tmp_path_factory):
    out = tmp_path_factory.mktemp("maga")
    return out, train_maga(cmu_pairs, out, _quick_config())


def test_maga_loss_falls_and_aligned_5x_embeddings_move_towards_20x_teacher(trained):
    out, result = trained
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 8 and sum(h["steps"] for h in result.history) >= 24
    assert np.mean(losses[-2:]) < losses[0]
    assert result.alignment["pairs"] >= 5  # held-out pairs, never trained on
    assert result.alignment["aligned"] < result.alignment["unaligned"]
    summary = json.loads((out / "maga.json").read_text())
    assert summary["alignment"] == result.alignment and summary["low_mag"] == 5.0


def test_aligned_student_loads_as_an_encoder_and_beats_the_unaligned_teacher(trained, cmu_pairs):
    out, result = trained
    student = build_encoder("resnet50_trunc", weights=result.student_path, device="cpu")
    teacher = build_encoder("resnet50_trunc", weights=out / "teacher.safetensors", device="cpu")
    low, high = np.asarray(cmu_pairs.low[:16]), np.asarray(cmu_pairs.high[:16])
    reference = teacher.embed(high)  # (N, 1024) at 20x
    aligned = embedding_distance(student.embed(low), reference)
    unaligned = embedding_distance(teacher.embed(low), reference)
    assert aligned < unaligned
    # the student learnt: its weights differ from the teacher it started from
    assert not torch.equal(
        student.model.layer3[0].conv1.weight, teacher.model.layer3[0].conv1.weight
    )


def test_resume_continues_from_the_saved_epoch(cmu_pairs, trained, tmp_path):
    teacher = trained[0] / "teacher.safetensors"
    config = _quick_config(epochs=1, max_steps_per_epoch=2)
    first = train_maga(cmu_pairs, tmp_path, config, teacher_weights=teacher)
    assert first.teacher_source == str(teacher)
    state = json.loads((tmp_path / "checkpoints" / "state.json").read_text())
    assert state["epoch"] == 1
    config = _quick_config(epochs=2, max_steps_per_epoch=2)
    resumed = train_maga(cmu_pairs, tmp_path, config, teacher_weights=teacher, resume=True)
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    assert resumed.history[0] == first.history[0]
    assert resumed.history[1]["lr"] == pytest.approx(3e-4 * 0.95)  # scheduler state restored
    assert json.loads((tmp_path / "checkpoints" / "state.json").read_text())["epoch"] == 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("epoch*")) == [
        "epoch002.optim.pt",
        "epoch002.safetensors",
    ]


def test_resume_with_different_settings_is_refused(cmu_pairs, trained, tmp_path):
    teacher = trained[0] / "teacher.safetensors"
    config = _quick_config(epochs=1, max_steps_per_epoch=1, holdout_fraction=0)
    train_maga(cmu_pairs, tmp_path, config, teacher_weights=teacher)
    with pytest.raises(AnalysisError, match="use the same settings"):
        train_maga(
            cmu_pairs,
            tmp_path,
            _quick_config(epochs=2, max_steps_per_epoch=1, holdout_fraction=0, lr=1e-3),
            teacher_weights=teacher,
            resume=True,
        )


def test_train_maga_command_writes_a_student(tmp_path, capsys):
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / CMU).symlink_to(shared_slide(CMU))
    out = tmp_path / "run"
    argv = ["train-maga", "--slides", str(slides), "--mag", "5", "--epochs", "1"]
    argv += ["--patches-per-slide", "8", "--batch-size", "4", "--max-steps", "1", "-o", str(out)]
    assert lowmag(argv) == 0
    assert (out / "student.safetensors").is_file()
    assert json.loads(capsys.readouterr().out)["student"].endswith("student.safetensors")


def test_train_maga_command_reports_an_empty_folder(tmp_path, capsys):
    assert lowmag(["train-maga", "--slides", str(tmp_path), "-o", str(tmp_path / "o")]) == 2
    assert "no whole-slide files" in capsys.readouterr().err


def test_maga_aligns_a_second_encoder_family(cmu_pairs, tmp_path):
    config = _quick_config(encoder="vit_tiny", epochs=3, lr=1e-4)
    result = train_maga(cmu_pairs, tmp_path, config)
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert result.alignment["aligned"] < result.alignment["unaligned"]
    student = build_encoder("vit_tiny", weights=result.student_path, device="cpu")
    assert student.embed(np.asarray(cmu_pairs.low[:2])).shape == (2, 192)


def test_a_second_run_on_other_patches_never_reuses_the_first_runs_teacher_targets(tmp_path):
    """Same output folder, same pair count, other cells: the teacher must see the new patches."""
    from analysis.encoders import build_model, calibrate_batchnorm, imagenet_normalize, save_weights

    slide = shared_slide(CMU)
    first = build_pair_cache([slide], tmp_path / "pairs", max_patches_per_slide=12, seed=1)
    teacher = build_model("resnet50_trunc")
    calibrate_batchnorm(teacher, [imagenet_normalize(np.asarray(first.high))])
    weights = save_weights(teacher, tmp_path / "teacher.safetensors")
    config = _quick_config(epochs=1, batch_size=6, max_steps_per_epoch=1, holdout_fraction=0)
    train_maga(first, tmp_path / "run", config, teacher_weights=weights)

    second = build_pair_cache([slide], tmp_path / "pairs", max_patches_per_slide=12, seed=2)
    assert len(second) == len(first) and not np.array_equal(second.l0_xy, first.l0_xy)
    reused = train_maga(second, tmp_path / "run", config, teacher_weights=weights)
    fresh = train_maga(second, tmp_path / "fresh", config, teacher_weights=weights)
    assert reused.history[0]["loss"] == pytest.approx(fresh.history[0]["loss"], rel=1e-5)


def test_slide_pairs_derive_the_5x_patch_from_the_20x_read():
    from analysis.maga import SlidePairs
    from analysis.slides import open_slide

    pairs = SlidePairs([shared_slide(CMU)], low_mag=5, pairs_per_slide=6, seed=3)
    assert len(pairs) == 6 and pairs.low_size == 64
    i, high, low = pairs[4]
    assert i == 4 and high.shape == (256, 256, 3) and low.shape == (64, 64, 3)
    boxes = high.reshape(64, 4, 64, 4, 3).astype(float).mean(axis=(1, 3))
    assert np.abs(boxes - low).max() <= 0.5 + 1e-9
    with open_slide(shared_slide(CMU)) as slide:
        read_at_5x = slide.read_patch(tuple(pairs.l0_xy[4]), 5).astype(float)
    assert np.abs(read_at_5x - low).mean() < 6.0  # the same tissue as a direct 5x read


def test_streaming_trainer_reads_slides_in_workers_writes_no_pair_data_and_resumes(tmp_path):
    from analysis.maga import SlidePairs

    pairs = SlidePairs([shared_slide(CMU)], low_mag=5, pairs_per_slide=16, seed=0)
    lines: list[str] = []
    config = _quick_config(
        epochs=1,
        batch_size=4,
        max_steps_per_epoch=2,
        workers=2,
        target_memory_mb=0,
        holdout_fraction=0,
        log_every_s=0,
    )
    first = train_maga(pairs, tmp_path, config, log=lines.append)
    assert first.history[0]["pairs"] == 8 and first.history[0]["pairs_per_s"] > 0
    assert any("pairs/s, epoch ETA" in line for line in lines)
    resumed = train_maga(
        pairs, tmp_path, _quick_config(**{**config.__dict__, "epochs": 2}), resume=True
    )
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == [
        "checkpoints/epoch002.optim.pt",
        "checkpoints/epoch002.safetensors",
        "checkpoints/state.json",
        "maga.json",
        "student.safetensors",
        "teacher.safetensors",
    ]
    assert json.loads((tmp_path / "maga.json").read_text())["pair_source"]["kind"] == "slides"


def test_a_uni_layout_teacher_aligns_through_maga_at_5x(tmp_path):
    from safetensors.torch import load_file, save_file

    from analysis.maga import SlidePairs
    from tests.vit_layouts import uni_layout

    spec = "vit:uni,dim=64,depth=3,heads=4"  # UNI's key layout at a small width
    save_file(uni_layout(64, 3), str(tmp_path / "uni.safetensors"))
    pairs = SlidePairs([shared_slide(CMU)], low_mag=5, pairs_per_slide=24, seed=0)
    config = _quick_config(encoder=spec, epochs=4, lr=1e-4, holdout_fraction=0.25)
    result = train_maga(
        pairs, tmp_path / "run", config, teacher_weights=tmp_path / "uni.safetensors"
    )
    first, last = result.history[0], result.history[-1]
    assert last["loss"] < first["loss"] and last["pooled"] < first["pooled"]
    assert result.alignment["pairs"] == 6 and np.isfinite(result.alignment["aligned"])
    assert set(load_file(str(result.student_path))) == set(uni_layout(64, 3))  # still UNI's keys
    student = build_encoder(spec, weights=result.student_path, device="cpu")
    _, _, low = pairs[0]
    assert student.embed(low[None]).shape == (1, 64)


def test_a_ctranspath_layout_teacher_aligns_through_maga_at_5x(tmp_path):
    from safetensors.torch import load_file

    from analysis.maga import SlidePairs
    from tests.swin_layouts import swin_layout

    spec = "swin:ctranspath,dim=16,head_dim=8,depths=1-1-2-1"  # CTransPath's keys, small width
    layout = swin_layout(dim=16, head_dim=8, depths=(1, 1, 2, 1))
    torch.save({"model": layout}, tmp_path / "ctranspath.pth")  # as CTransPath is released
    pairs = SlidePairs([shared_slide(CMU)], low_mag=5, pairs_per_slide=24, seed=0)
    config = _quick_config(encoder=spec, epochs=3, lr=3e-4, holdout_fraction=0.25)
    result = train_maga(
        pairs, tmp_path / "run", config, teacher_weights=tmp_path / "ctranspath.pth"
    )
    first, last = result.history[0], result.history[-1]
    assert last["loss"] < first["loss"] and last["pooled"] < first["pooled"]
    assert result.alignment["aligned"] < result.alignment["unaligned"]  # held-out pairs
    derived = ("relative_position_index", "attn_mask")
    assert set(load_file(str(result.student_path))) == {
        k for k in layout if not k.endswith(derived)
    }  # still CTransPath's names
    student = build_encoder(spec, weights=result.student_path, device="cpu")
    _, _, low = pairs[0]
    assert student.embed(low[None]).shape == (1, 128)


def _ddp_worker(rank: int, root: str, out: str, teacher: str, port: int) -> None:
    import os

    from analysis.encoders import save_weights
    from analysis.maga import init_distributed

    os.environ.update(
        WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )  # fmt: skip
    torch.set_num_threads(1)
    device = init_distributed()
    config = _quick_config(
        encoder="vit:dim=32,depth=3,heads=2", epochs=1, batch_size=4, holdout_fraction=0,
        device=device,
    )  # fmt: skip
    result = train_maga(PairCache.open(root), out, config, teacher_weights=teacher)
    save_weights(result.student, f"{out}/{rank}")  # this process's copy of the student
    torch.distributed.destroy_process_group()


def test_two_processes_train_one_student_with_distributed_data_parallel(cmu_pairs, tmp_path):
    import socket

    from safetensors.torch import load_file

    from analysis.encoders import build_model, save_weights

    teacher = save_weights(build_model("vit:dim=32,depth=3,heads=2"), tmp_path / "t.safetensors")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "run"
    args = (str(cmu_pairs.root), str(out), str(teacher), port)
    torch.multiprocessing.spawn(_ddp_worker, args=args, nprocs=2, join=True)
    state = json.loads((out / "checkpoints" / "state.json").read_text())
    assert state["history"][0]["pairs"] == len(cmu_pairs) // 2  # each process: half the pairs
    first, second = load_file(str(out / "0")), load_file(str(out / "1"))
    for key in first:  # gradients were averaged: both processes hold the same student
        torch.testing.assert_close(first[key], second[key])
    assert not torch.equal(
        first["blocks.0.attn.qkv.weight"], load_file(str(teacher))["blocks.0.attn.qkv.weight"]
    )


def test_epoch_order_shuffles_runs_of_neighbouring_pairs_and_covers_each_pair_once():
    from analysis.maga import epoch_order

    train = np.array([0, 1, 2, 4, 5, 6, 7, 9, 10, 11, 12, 13, 15, 16, 17, 18, 19, 20])
    first, second = epoch_order(train, 0, 0, run=4), epoch_order(train, 0, 1, run=4)
    assert sorted(first) == sorted(second) == list(train)
    assert not np.array_equal(first, second) and not np.array_equal(first, train)
    runs = {tuple(train[i : i + 4]) for i in range(0, len(train), 4)}
    assert {tuple(first[i : i + len(r)]) for i, r in _run_starts(first, runs)} == runs


def _run_starts(order, runs):
    by_first = {r[0]: r for r in runs}
    i = 0
    while i < len(order):
        run = by_first[order[i]]
        yield i, run
        i += len(run)


def test_train_maga_with_a_teacher_of_another_architecture_is_one_line_and_writes_nothing(
    tmp_path, capsys
):
    from safetensors.torch import save_file

    from tests.vit_layouts import uni_layout

    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / CMU).symlink_to(shared_slide(CMU))
    save_file(uni_layout(64, 3), str(tmp_path / "uni.safetensors"))
    out = tmp_path / "run"
    argv = ["train-maga", "--slides", str(slides), "--teacher", str(tmp_path / "uni.safetensors")]
    argv += ["--pairs-per-slide", "4", "--workers", "0", "-o", str(out)]
    assert lowmag(argv) == 2  # a UNI-layout file into the default ResNet50-trunc
    err = capsys.readouterr().err.strip().splitlines()
    assert "does not fit ResNet50Trunc" in err[-1] and "missing key" in err[-1]
    assert not out.exists()
