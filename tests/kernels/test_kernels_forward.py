"""Forward kernel (online log-sum-exp + target logit) against the float64 eager reference."""

import pytest
import torch
from kernels_testutils import DTYPES, bound, eager_logprobs, make_inputs, rel_err

from safedpo_kernels.kernels import forward_logprobs
from safedpo_kernels.triton_logprobs import triton_is_usable, triton_linear_logprobs


def _check_forward(hidden, weight, bias, labels, dtype, **kw):
    ref = eager_logprobs(hidden.double(), weight.double(), None if bias is None else bias.double(), labels)
    cast = [None if t is None else t.to(dtype) for t in (hidden, weight, bias)]
    eager = eager_logprobs(*cast, labels)
    out = triton_linear_logprobs(cast[0], cast[1], labels, cast[2], **kw)
    assert out.dtype == torch.float32 and out.shape == labels.shape
    assert rel_err(out, ref) <= bound([rel_err(eager, ref)], dtype)[0]
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_values_match_float64_on_odd_shapes(seed, dtype, bias):
    hidden, weight, b, labels, _ = make_inputs(37, 72, 333, bias=bias)
    _check_forward(hidden, weight, b, labels, dtype)


def test_lse_and_vocab_splits(seed):
    hidden, weight, b, labels, _ = make_inputs(37, 72, 333)
    logits = hidden.double() @ weight.double().T + b.double()
    outs = []
    for splits in (1, 2, 5):  # 333 columns = 6 blocks of 64: uneven splits too
        logp, lse, one_minus_p = forward_logprobs(hidden, weight, labels, b, num_splits=splits)
        ref = torch.log_softmax(logits, -1).gather(1, labels[:, None])[:, 0]
        assert (lse.double() - torch.logsumexp(logits, -1)).abs().max() < 1e-5
        assert (logp.double() - ref).abs().max() < 1e-5
        torch.testing.assert_close(one_minus_p.double(), -torch.expm1(ref), rtol=1e-5, atol=0)
        outs.append(logp)
    torch.testing.assert_close(outs[0], outs[2], rtol=0, atol=1e-5)


@pytest.mark.parametrize("m,v", [(1, 333), (37, 40), (1, 17)])
def test_one_token_and_vocab_smaller_than_a_block(seed, m, v):
    hidden, weight, b, labels, _ = make_inputs(m, 72, v)
    _check_forward(hidden, weight, b, labels, torch.float32)


def test_forward_only_path_builds_no_graph(seed):
    hidden, weight, b, labels, _ = make_inputs(37, 72, 333)
    hidden.requires_grad_()
    with torch.no_grad():
        out = triton_linear_logprobs(hidden, weight, labels, b)
    assert out.grad_fn is None and not out.requires_grad
    frozen = triton_linear_logprobs(hidden.detach(), weight, labels, b)  # nothing requires grad
    assert frozen.grad_fn is None
    graph = triton_linear_logprobs(hidden, weight.clone().requires_grad_(), labels, b)  # recompute path
    assert graph.grad_fn is not None
    assert torch.equal(out, graph.detach()) and torch.equal(out, frozen)
    frozen_head = triton_linear_logprobs(hidden, weight, labels, b)  # frozen-head kernel: one split
    assert frozen_head.grad_fn is not None
    torch.testing.assert_close(frozen_head.detach(), out, rtol=0, atol=2e-6)


def test_non_contiguous_inputs(seed):
    hidden, weight, b, labels, _ = make_inputs(37, 72, 333)
    wide = torch.randn(37, 100)
    wide[:, 10:82] = hidden
    h_view = wide[:, 10:82]  # row stride 100
    w_view = weight.T.contiguous().T  # (V, H) with strides (1, V)
    assert not h_view.is_contiguous() and not w_view.is_contiguous()
    out = _check_forward(h_view, w_view, b, labels, torch.float32)
    torch.testing.assert_close(out, triton_linear_logprobs(hidden, weight, labels, b), rtol=0, atol=1e-6)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy warns on the NaN row
def test_nan_is_not_hidden(seed):
    hidden, weight, b, labels, _ = make_inputs(37, 72, 333)
    hidden[5, 3] = float("nan")
    out = triton_linear_logprobs(hidden, weight, labels, b)
    assert torch.isnan(out[5]) and torch.isfinite(out[torch.arange(37) != 5]).all()


def test_usable_and_bad_input_messages():
    assert triton_is_usable(torch.device("cpu"))
    h, w, labels = torch.randn(3, 8), torch.randn(5, 8), torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="labels"):
        triton_linear_logprobs(h, w, labels.int())
    with pytest.raises(ValueError, match="M >= 1"):
        triton_linear_logprobs(h[:0], w, labels[:0])
    with pytest.raises(TypeError, match="dtype"):
        triton_linear_logprobs(h.double(), w.double(), labels)
    with pytest.raises(ValueError, match="bias"):
        triton_linear_logprobs(h, w, labels, torch.zeros(4))
