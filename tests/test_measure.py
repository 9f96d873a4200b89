import pytest
import torch
from torch import nn

from distillab import measure


def test_linear_counts_are_exact():
    layer = nn.Linear(10, 5)
    assert measure.params(layer) == 55
    assert measure.macs(layer, (10,)) == 50
    with torch.no_grad():
        layer.weight[:2].zero_()
    assert measure.nonzero_params(layer) == 55 - 20


def test_conv_macs():
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    assert measure.macs(conv, (3, 16, 16)) == 16 * 16 * 8 * 3 * 3 * 3


def test_size_bytes_is_the_saved_state_dict():
    small, large = nn.Linear(10, 10), nn.Linear(100, 100)
    assert 110 * 4 < measure.size_bytes(small) < 110 * 4 + 2000
    assert 10100 * 4 < measure.size_bytes(large) < 10100 * 4 + 2000


def test_latency_is_positive_and_leaves_model_untouched():
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5))
    model.train()
    assert measure.latency_ms(model, (8,), batch_size=4, warmup=1, repeats=3) > 0
    assert model.training
    threads = torch.get_num_threads()
    measure.latency_ms(model, (8,), threads=1, warmup=1, repeats=2)
    assert torch.get_num_threads() == threads


def test_profile_block_has_the_results_fields():
    block = measure.profile(nn.Linear(4, 2), (4,))
    assert set(block) == {"params", "nonzero_params", "size_bytes", "macs", "latency_ms"}
    assert set(block["latency_ms"]) == {"batch_1", "batch_64"}
    assert block["params"] == 10 and block["macs"] == pytest.approx(8)


def test_quantized_weights_are_counted():
    import warnings

    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    assert list(quantized.parameters()) == []
    assert measure.params(quantized) == measure.params(model) == 8 * 4 + 4 + 4 * 2 + 2
    assert measure.nonzero_params(quantized) <= measure.params(quantized)
    assert measure.size_bytes(quantized) < measure.size_bytes(model) + 2000
