"""Export: ONNX (top-k and threshold), .pt2 and safetensors reproduce PyTorch, and the
exported ONNX graph really runs fewer tokens after each pruning stage."""
from __future__ import annotations

import copy
import functools

import pytest
import timm
import torch

import dynvit
from conftest import make_decisive_, randomize_
from dynvit.export import ExportError, ParityError, export_model, main, verify_export
from dynvit.hub import load_pretrained, save_pretrained

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

PRUNE_LOC = (1, 3)
DEPTH = 4


def small_model() -> torch.nn.Module:
    """A tiny pruned ViT whose predictors keep about half the tokens with logits of order 1,
    so threshold decisions differ between images."""
    with torch.random.fork_rng():  # the initialisation: not whatever ran before
        torch.manual_seed(0)
        model = dynvit.build_model("deit_tiny_patch16_224", prune_loc=PRUNE_LOC, keep_ratio=0.6, img_size=64,
                                   depth=DEPTH, num_classes=5)
    randomize_(model).eval()
    make_decisive_(model)
    return model


@pytest.fixture(scope="module")
def model():
    return small_model()


@pytest.fixture(scope="module")
def inputs():
    return torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def onnx_exports(model, inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    exports = {mode: export_model(model, out / f"{mode}.onnx", mode=mode, inputs=inputs[:4]) for mode in ("topk", "threshold")}
    exports["threshold_b1"] = export_model(model, out / "threshold_b1.onnx", mode="threshold", batch_size=1, inputs=inputs[:4])
    return exports


@functools.cache
def ort_session(path: str) -> ort.InferenceSession:
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def onnx_logits(path: str, x: torch.Tensor) -> torch.Tensor:
    session = ort_session(path)
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def qkv_token_counts(path, x: torch.Tensor, embed_dim: int) -> list[int]:
    """Sequence length entering each block's qkv projection, read from onnxruntime at run time."""
    proto = onnx.load(str(path))
    weights = {i.name: tuple(i.dims) for i in proto.graph.initializer}
    # A qkv weight that other nodes also read (the predictors' attention signal slices it) reaches its
    # MatMul through a Transpose, not as an initializer: take the shapes shape inference gives.
    inferred = onnx.shape_inference.infer_shapes(proto).graph.value_info
    weights.update({v.name: tuple(d.dim_value for d in v.type.tensor_type.shape.dim) for v in inferred})
    names = [n.input[0] for n in proto.graph.node
             if n.op_type == "MatMul" and weights.get(n.input[1]) == (embed_dim, 3 * embed_dim)]
    assert len(names) == DEPTH, "expected one qkv MatMul per block"
    proto.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return [a.shape[1] for a in session.run(names, {"images": x.numpy()})]


def test_onnx_topk_matches_pytorch_on_several_batch_sizes(model, inputs, onnx_exports):
    result = onnx_exports["topk"]
    assert result.max_abs_diff <= 1e-4 and result.opset >= 18
    with torch.no_grad():
        for b in (1, 3, 8):
            expected = model.forward_pruned(inputs[:b], "topk").logits
            torch.testing.assert_close(onnx_logits(result.path, inputs[:b]), expected, atol=1e-4, rtol=0)


def test_onnx_threshold_matches_pytorch_for_different_kept_counts(model, inputs, onnx_exports):
    counts = set()
    with torch.no_grad():
        for i in range(len(inputs)):
            x = inputs[i : i + 1]
            out = model.forward_pruned(x, "threshold")
            counts.add(tuple(int(m.sum()) for m in out.keep_masks))
            for name in ("threshold", "threshold_b1"):
                torch.testing.assert_close(onnx_logits(onnx_exports[name].path, x), out.logits, atol=1e-4, rtol=0)
        # The graph of any batch size: batches whose images keep different counts, padded and masked.
        for b in (2, 3, 8):
            expected = model.forward_pruned(inputs[:b], "threshold").logits
            torch.testing.assert_close(onnx_logits(onnx_exports["threshold"].path, inputs[:b]), expected, atol=1e-4, rtol=0)
    assert len({c[0] for c in counts}) > 1, "test needs images with different kept counts"
    assert model.prune_mode == "threshold" and model.keep_ratio == (0.6, 0.36), "export changed the model's settings"
    assert onnx_exports["threshold"].batch_size is None and onnx_exports["threshold_b1"].batch_size == 1
    with pytest.raises(Exception, match="(?i)dimension|shape"):  # a graph for single images takes single images
        onnx_logits(onnx_exports["threshold_b1"].path, inputs[:2])


def test_onnx_threshold_export_for_a_fixed_batch_size(model, inputs, tmp_path):
    # A graph for batches of 3: padded to each batch's largest kept count, like a dynamic batch.
    result = export_model(model, tmp_path / "b3.onnx", mode="threshold", batch_size=3, inputs=inputs[:6])
    assert result.batch_size == 3 and result.batch_sizes == [3, 3] and len(result.kept_counts) == 6
    with torch.no_grad():
        for start in (0, 3):
            out = model.forward_pruned(inputs[start : start + 3], "threshold")
            torch.testing.assert_close(onnx_logits(str(result.path), inputs[start : start + 3]), out.logits,
                                       atol=1e-4, rtol=0)
    assert len({counts[0] for counts in result.kept_counts}) > 1, "test needs batches with different kept counts"


@pytest.mark.parametrize("dropped", ["discard", "merge", "merge+match", "merge+signals"])
def test_onnx_threshold_uses_calibrated_thresholds(model, inputs, tmp_path, dropped):
    """The thresholds dynvit.calibrate sets are buffers: the exported graph applies them (also
    with the match prior or the predictor signals, whose logits depend on which tokens are alive,
    their sizes and the class token's attention)."""
    tuned = copy.deepcopy(model)
    if "+" in dropped:
        dropped, extra = dropped.split("+")
        kind = {"match": dict(predictor_prior="match"),
                "signals": dict(predictor_signals=("attention", "redundancy", "size"))}[extra]
        tuned = dynvit.build_model("deit_tiny_patch16_224", prune_loc=PRUNE_LOC, keep_ratio=0.6, img_size=64,
                                   depth=DEPTH, num_classes=5, **kind)
        tuned.load_state_dict(model.state_dict(), strict=False)  # the same weights, plus match_scale or signal_weight
        tuned.eval()
    tuned.dropped_tokens = dropped
    dynvit.calibrate(tuned, torch.randn(32, 3, 64, 64, generator=torch.Generator().manual_seed(7)), keep_ratio=0.4)
    result = export_model(tuned, tmp_path / "calibrated.onnx", mode="threshold", inputs=inputs[:4])
    fewer = 0
    with torch.no_grad():
        for i in range(len(inputs)):
            x = inputs[i : i + 1]
            out = tuned.forward_pruned(x, "threshold")
            torch.testing.assert_close(onnx_logits(str(result.path), x), out.logits, atol=1e-4, rtol=0)
            kept = [int(m.sum()) for m in out.keep_masks]
            # a lone kept token is padded to two slots in a graph of any batch size (tokens.largest_count)
            assert qkv_token_counts(result.path, x, tuned.embed_dim)[3] == tuned.num_prefix_tokens + max(kept[1], 2)
            before = [int(m.sum()) for m in model.forward_pruned(x, "threshold").keep_masks]
            fewer += kept[1] < before[1]
    assert fewer > 0, "the calibrated budget (0.16 of the tokens after stage 2) should prune more than p > 0.5"


@pytest.mark.parametrize("name", ["topk", "threshold", "threshold_b1"])
def test_onnx_graph_runs_fewer_tokens_after_each_stage(model, inputs, onnx_exports, name):
    p, mode = model.num_prefix_tokens, name.split("_")[0]
    for i in range(3):
        x = inputs[i : i + 1]
        with torch.no_grad():
            kept = [int(m.sum()) for m in model.forward_pruned(x, mode).keep_masks]
        if name == "threshold":
            kept = [max(k, 2) for k in kept]  # a graph of any batch size pads a lone kept token to two slots
        expected = [p + 16, p + kept[0], p + kept[0], p + kept[1]]  # blocks 0..3, stages before blocks 1 and 3
        counts = qkv_token_counts(onnx_exports[name].path, x, model.embed_dim)
        assert counts == expected
        assert counts[1] < counts[0]
    if mode == "topk":
        assert qkv_token_counts(onnx_exports[name].path, inputs, model.embed_dim) == [17, 11, 11, 7]
    if name == "threshold":  # a batch runs its largest kept count
        with torch.no_grad():
            largest = [int(m.sum(1).max()) for m in model.forward_pruned(inputs, mode).keep_masks]
        assert qkv_token_counts(onnx_exports[name].path, inputs, model.embed_dim) == [
            p + 16, p + largest[0], p + largest[0], p + largest[1]]


def test_verify_fails_when_the_export_disagrees(model, inputs, onnx_exports):
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.head.bias.add_(1e-3)
    changed.prune_mode = "topk"
    with pytest.raises(ParityError, match="differs from PyTorch"):
        verify_export(changed, onnx_exports["topk"], inputs[:2])


@pytest.mark.parametrize("mode", ["topk", "threshold"])
def test_pt2_round_trip_gives_identical_logits(model, inputs, tmp_path, mode):
    result = export_model(model, tmp_path / "model.pt2", format="pt2", mode=mode, inputs=inputs[:3])
    loaded = torch.export.load(str(result.path)).module()
    with torch.no_grad():
        for x in [inputs[:1], inputs[:5], *inputs[1:3].split(1)]:
            torch.testing.assert_close(loaded(x), model.forward_pruned(x, mode).logits, atol=1e-5, rtol=0)
    if mode == "threshold":
        assert len({counts[0] for counts in result.kept_counts}) > 1, "test needs images with different kept counts"


def test_safetensors_round_trip_restores_identical_model(model, inputs, tmp_path):
    classes = ["cat", "dog", "owl", "fox", "elk"]
    model.dynvit_meta["classes"] = classes  # as load_pretrained sets them
    try:
        result = export_model(model, tmp_path / "ship", format="safetensors", mode="topk", keep_ratio=0.8, inputs=inputs)
    finally:
        del model.dynvit_meta["classes"]
    assert result.max_abs_diff == 0.0
    loaded = load_pretrained(tmp_path / "ship")
    assert (loaded.prune_mode, loaded.keep_ratio) == ("topk", (0.8, 0.8**2))
    assert loaded.dynvit_meta["classes"] == classes and loaded.pretrained_cfg["input_size"] == (3, 64, 64)
    assert model.keep_ratio == (0.6, 0.36), "export changed the model's settings"
    mine, theirs = model.state_dict(), loaded.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    reference = copy.deepcopy(model)
    reference.prune_mode, reference.keep_ratio = "topk", 0.8
    with torch.no_grad():
        assert torch.equal(loaded(inputs), reference(inputs))


def test_errors_name_the_problem(model, tmp_path):
    with pytest.raises(ExportError, match="keep_ratio applies to mode 'topk' only"):
        export_model(model, tmp_path / "m.onnx", mode="threshold", keep_ratio=0.5)
    with pytest.raises(ExportError, match="opset applies to ONNX only"):
        export_model(model, tmp_path / "m.pt2", format="pt2", opset=18)
    with pytest.raises(ExportError, match="batch_size must be a positive int .* or None"):
        export_model(model, tmp_path / "m.onnx", batch_size=0)
    with pytest.raises(ExportError, match="format 'tflite' cannot be exported"):
        export_model(model, tmp_path / "m.tflite", format="tflite")
    dense = timm.create_model("deit_tiny_patch16_224", img_size=64, depth=2)
    with pytest.raises(ExportError, match="mode 'topk' needs a dynvit model"):
        export_model(dense, tmp_path / "m.onnx", mode="topk")
    with pytest.raises(ExportError, match=r"opset 16 is too old: the minimum is 18.*LayerNormalization \(needs opset 17\)"):
        export_model(model, tmp_path / "m.onnx", mode="topk", opset=16)
    assert not (tmp_path / "m.onnx").exists()


def test_cli_reports_parity_and_speed(model, tmp_path, capsys):
    save_pretrained(model, tmp_path / "ckpt")
    out = tmp_path / "pruned.onnx"
    assert main(["--checkpoint", str(tmp_path / "ckpt"), "--format", "onnx", "--out", str(out), "--mode", "topk",
                 "--num-images", "3", "--bench-batch", "4", "--bench-repeats", "2"]) == 0
    printed = capsys.readouterr().out
    assert "max |onnx - pytorch| = " in printed and "batch sizes 1, 2, 3" in printed
    assert "patch tokens kept after each stage: 10, 6 of 16" in printed
    assert "onnxruntime images/s at batch 4: dense " in printed and out.is_file()


def test_cli_rejects_missing_and_mismatched_checkpoints(tmp_path, capsys):
    args = ["--format", "pt2", "--out", str(tmp_path / "m.pt2")]
    assert main(["--checkpoint", str(tmp_path / "nowhere"), *args]) == 1
    assert f"checkpoint '{tmp_path / 'nowhere'}' does not exist" in capsys.readouterr().err
    other = dynvit.build_model("deit_tiny_patch16_224", prune_loc=PRUNE_LOC, img_size=64, depth=DEPTH, num_classes=7)
    save_pretrained(other, tmp_path / "ckpt")
    save_pretrained(small_model(), tmp_path / "weights")
    (tmp_path / "weights" / "model.safetensors").replace(tmp_path / "ckpt" / "model.safetensors")
    assert main(["--checkpoint", str(tmp_path / "ckpt"), *args]) == 1
    assert "shape mismatch ['head.weight (file (5, 192), model (7, 192))'" in capsys.readouterr().err
