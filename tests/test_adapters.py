"""Every length adapter: shapes, output lengths of the paper's Table 2, masks for padded batches, gradients."""

import pytest
import torch

from speechtrim import adapters

DIM = 32
PAPER_LENGTHS = {"none": 170, "mean": 1, "concat": 85, "conv": 85, "attn_mean": 1, "attn_q_mean": 1}


def test_registry_lists_the_six_adapters_of_the_paper():
    assert adapters.names() == sorted(PAPER_LENGTHS)


@pytest.mark.parametrize("name", sorted(PAPER_LENGTHS))
def test_output_length_matches_table_2_and_forward(name):
    torch.manual_seed(0)
    adapter = adapters.build(name, dim=DIM)
    assert adapter.output_length(170) == PAPER_LENGTHS[name]
    y, y_mask = adapter(torch.randn(3, 170, DIM))
    assert y.shape == (3, PAPER_LENGTHS[name], DIM)
    assert y_mask.all() and y_mask.shape == y.shape[:2]


@pytest.mark.parametrize("name", sorted(PAPER_LENGTHS))
@pytest.mark.parametrize("length", [1, 2, 7, 33])
def test_padded_row_equals_the_row_alone(name, length):
    torch.manual_seed(1)
    adapter = adapters.build(name, dim=DIM).eval()
    row = torch.randn(1, length, DIM)
    padded = torch.randn(2, 40, DIM) * 100  # padding holds garbage that must not leak
    padded[0, :length] = row[0]
    mask = torch.zeros(2, 40, dtype=torch.bool)
    mask[0, :length] = True
    mask[1, :] = True
    alone, alone_mask = adapter(row)
    batched, batched_mask = adapter(padded, mask)
    valid = int(batched_mask[0].sum())
    assert valid == adapter.output_length(length) == alone.shape[1] == int(alone_mask.sum())
    torch.testing.assert_close(batched[0, :valid], alone[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(PAPER_LENGTHS))
def test_gradients_reach_every_trainable_parameter(name):
    torch.manual_seed(2)
    adapter = adapters.build(name, dim=DIM)
    with torch.no_grad():  # away from the initialisation (a zero query gives the key no gradient at step 0)
        for parameter in adapter.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    x = torch.randn(2, 20, DIM, requires_grad=True)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1, 12:] = False
    y, y_mask = adapter(x, mask)
    (y * y_mask.unsqueeze(-1)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert x.grad[1, 12:].abs().sum() == 0, "padding frames must not influence the output"
    for parameter_name, parameter in adapter.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, parameter_name
    expected_trainable = sum(p.numel() for p in adapter.parameters())
    assert adapter.num_trainable == expected_trainable
    assert (adapter.num_trainable == 0) == (name in ("none", "mean"))


def test_windowed_mean_and_custom_factors():
    x = torch.arange(10, dtype=torch.float32).view(1, 10, 1).expand(1, 10, 4).contiguous()
    y, y_mask = adapters.build("mean", dim=4, window=4)(x)
    assert y[0, :, 0].tolist() == [1.5, 5.5, 8.5] and y_mask.all()
    assert adapters.build("concat", dim=4, factor=3).output_length(10) == 4
    assert adapters.build("conv", dim=4, stride=4).output_length(170) == 43


def test_attn_q_mean_is_equation_1():
    torch.manual_seed(3)
    adapter = adapters.build("attn_q_mean", dim=DIM)
    with torch.no_grad():  # away from the identity initialisation, so every projection shows
        for parameter in adapter.parameters():
            parameter.normal_(0.0, 0.2)
    x = torch.randn(1, 9, DIM)
    q = adapter.query(x.mean(dim=1))  # (1, d)
    scores = adapter.key(x)[0] @ q[0] / DIM**0.5  # (T,)
    expected = adapter.out(torch.softmax(scores, dim=0) @ adapter.value(x)[0])
    y, _ = adapter(x)
    torch.testing.assert_close(y[0, 0], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(PAPER_LENGTHS))
def test_every_adapter_starts_as_a_pooling_that_keeps_a_constant_sequence(name):
    torch.manual_seed(4)
    adapter = adapters.build(name, dim=DIM)
    value = torch.randn(DIM)
    y, y_mask = adapter(value.expand(2, 10, DIM).clone(), torch.ones(2, 10, dtype=torch.bool))
    torch.testing.assert_close(y[y_mask], value.expand(int(y_mask.sum()), DIM), rtol=1e-5, atol=1e-5)
    x = torch.randn(1, 10, DIM)  # and a convex combination of the frames in general: inside their range
    y, _ = adapter(x)
    assert bool((y <= x.amax(dim=1, keepdim=True) + 1e-5).all() and (y >= x.amin(dim=1, keepdim=True) - 1e-5).all())
    if name.startswith("attn"):  # uniform attention at first: exactly the mean
        torch.testing.assert_close(y[0, 0], x[0].mean(dim=0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "name, params, message",
    [
        ("mean", {"window": 0}, "window"),
        ("concat", {"factor": 0}, "factor"),
        ("conv", {"stride": 0}, "stride"),
        ("conv", {"kernel_size": 2}, "kernel_size"),
        ("attn_mean", {"heads": 5}, "heads"),
        ("nope", {}, "choose one of"),
    ],
)
def test_bad_parameters_raise_value_errors(name, params, message):
    with pytest.raises(ValueError, match=message):
        adapters.build(name, dim=DIM, **params)


def test_bad_inputs_raise_value_errors():
    adapter = adapters.build("mean", dim=DIM)
    with pytest.raises(ValueError, match="shape"):
        adapter(torch.randn(2, 5, DIM + 1))
    with pytest.raises(ValueError, match="at least one real frame"):
        adapter(torch.randn(2, 5, DIM), torch.zeros(2, 5, dtype=torch.bool))
