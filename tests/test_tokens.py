import torch

from dynvit.ratios import normalize_keep_ratio
from dynvit.tokens import batch_gather, gather_tokens, num_kept, threshold_indices, topk_indices


def test_topk_indices_sorted_and_best():
    logits = torch.tensor([[0.1, 5.0, -1.0, 3.0, 2.0]])
    assert topk_indices(logits, 3).tolist() == [[1, 3, 4]]


def test_batch_gather():
    x = torch.arange(24.0).reshape(2, 4, 3)
    idx = torch.tensor([[3, 0], [1, 2]])
    out = batch_gather(x, idx)
    assert torch.equal(out[0], x[0, [3, 0]]) and torch.equal(out[1], x[1, [1, 2]])
    assert torch.equal(batch_gather(x[..., 0], idx), x[..., 0].gather(1, idx))


def test_gather_tokens_keeps_the_prefix_first():
    x = torch.randn(2, 6, 3)
    idx = torch.tensor([[3, 0], [1, 2]])
    for p in (0, 2):
        expected = torch.cat([x[:, :p], batch_gather(x[:, p:], idx)], dim=1)
        assert torch.equal(gather_tokens(x, idx, p), expected)


def test_threshold_indices_padding_and_at_least_one():
    logits = torch.tensor([[1.0, -1.0, 2.0, 0.5], [-3.0, -1.0, -2.0, -4.0], [-1.0, 1.0, -1.0, -1.0]])
    index, valid = threshold_indices(logits)
    assert valid.tolist() == [[True, True, True], [True, False, False], [True, False, False]]
    assert index[0].tolist() == [0, 2, 3]
    assert index[1, 0].item() == 1  # none above 0.5: the most likely one is kept
    assert index[2, 0].item() == 1
    # padding rows of a previous stage are never kept again
    index2, valid2 = threshold_indices(torch.tensor([[5.0, 5.0, 5.0]]), valid=torch.tensor([[True, False, False]]))
    assert valid2.tolist() == [[True]] and index2.tolist() == [[0]]


def test_num_kept_and_ratios():
    assert num_kept(0.7, 196) == 137 and num_kept(0.49, 196) == 96 and num_kept(0.343, 196) == 67
    assert num_kept(0.001, 10) == 1
    assert normalize_keep_ratio(0.5, 3) == (0.5, 0.25, 0.125)
    assert normalize_keep_ratio([0.9, 0.5], 2) == (0.9, 0.5)
