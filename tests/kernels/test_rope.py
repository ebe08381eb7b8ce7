import pytest
import torch

pytest.importorskip("triton")
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # noqa: E402

from finetune_kernels.reference import rope_cos_sin_reference, rope_reference  # noqa: E402
from finetune_kernels.rope import apply_rope, apply_rope_tables, token_tables  # noqa: E402

# (batch, tokens, q heads, kv heads, head dim): GQA head counts and half-dims that are not
# powers of two.
SHAPES = [(2, 7, 3, 1, 10), (1, 5, 4, 2, 6)]
DTYPES = [torch.float32, torch.bfloat16]


def _inv_freq(head_dim, device, base=10000.0):
    return 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)


def _tolerances(dtype):
    if dtype == torch.float32:
        # Two products and a sum in fp32 on both sides; a fused multiply-add on GPU rounds
        # differently, by ulps of |x| (randn, so below 8): 1e-6 absolute covers it.
        return {"rtol": 1e-5, "atol": 1e-6}
    # Both sides compute in fp32 and round once to bf16; the CPU interpreter truncates instead,
    # and fp32 differences may straddle a rounding boundary: 2 ulps, 2^-6 relative.
    return {"rtol": 2**-6, "atol": 1e-5}


def _transformers_tolerances(dtype):
    if dtype == torch.float32:
        return _tolerances(dtype)
    # transformers rounds q * cos and rotate_half(q) * sin to bf16 before adding them, so its
    # error is about an ulp of the products (|x| < 8, ulp 2^-5) rather than of the result.
    return {"rtol": 2**-6, "atol": 2**-4}


def _qk(batch, tokens, q_heads, kv_heads, head_dim, dtype, device, seed=0):
    torch.manual_seed(seed)
    q = torch.randn(batch, tokens, q_heads, head_dim).to(device, dtype).requires_grad_()
    k = torch.randn(batch, tokens, kv_heads, head_dim).to(device, dtype).requires_grad_()
    return q, k


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(device, shape, dtype):
    batch, tokens, *_, head_dim = shape
    q, k = _qk(*shape, dtype, device)
    position_ids = torch.randint(0, 4096, (batch, tokens), device=device)
    inv_freq = _inv_freq(head_dim, device)
    cos, sin = rope_cos_sin_reference(position_ids, inv_freq)

    out = apply_rope(q, k, position_ids=position_ids, inv_freq=inv_freq)
    expected = rope_reference(q, k, cos, sin)
    for got, want in zip(out, expected):
        torch.testing.assert_close(got, want, **_tolerances(dtype))

    grads_out = [torch.randn_like(t) for t in out]
    got_grads = torch.autograd.grad(out, (q, k), grads_out)
    want_grads = torch.autograd.grad(expected, (q, k), grads_out)
    for got, want in zip(got_grads, want_grads):
        torch.testing.assert_close(got, want, **_tolerances(dtype))

    # The native model makes token_tables once per forward for every layer: the same fp32 angles and
    # kernel as the position_ids path, so forward and backward agree bit for bit.
    from_tables = apply_rope_tables(q, k, *token_tables(position_ids, inv_freq))
    for got, want in zip((*from_tables, *torch.autograd.grad(from_tables, (q, k), grads_out)), (*out, *got_grads)):
        assert torch.equal(got, want)


def test_tables_of_another_shape_or_layout_are_refused(device):
    q, k = _qk(*SHAPES[0], torch.float32, device)
    positions = torch.arange(SHAPES[0][1], device=device).expand(SHAPES[0][:2])
    cos_rows, sin_rows = token_tables(positions, _inv_freq(SHAPES[0][-1], device))
    with pytest.raises(ValueError, match="tables"):
        apply_rope_tables(q, k, cos_rows[1:], sin_rows[1:])
    with pytest.raises(ValueError, match="tables"):
        apply_rope_tables(q, k, cos_rows.T.contiguous().T, sin_rows)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_transformers_with_its_cos_sin(device, shape, dtype):
    batch, tokens, *_, head_dim = shape
    q, k = _qk(*shape, dtype, device)
    position_ids = torch.arange(3, 3 + tokens, device=device).expand(batch, tokens)
    cos, sin = (t.to(dtype) for t in rope_cos_sin_reference(position_ids, _inv_freq(head_dim, device)))

    out = apply_rope(q, k, cos=cos, sin=sin)
    # transformers works on (batch, heads, tokens, head_dim).
    hf_q, hf_k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    torch.testing.assert_close(out[0], hf_q.transpose(1, 2), **_transformers_tolerances(dtype))
    torch.testing.assert_close(out[1], hf_k.transpose(1, 2), **_transformers_tolerances(dtype))


def test_table_and_position_inputs_agree_and_broadcast(device):
    q, k = _qk(2, 7, 3, 1, 10, torch.float32, device)
    inv_freq = _inv_freq(10, device)
    position_ids = torch.arange(7, device=device).expand(2, 7)
    cos, sin = rope_cos_sin_reference(position_ids[:1], inv_freq)
    from_positions = apply_rope(q, k, position_ids=position_ids, inv_freq=inv_freq)
    for from_table in (apply_rope(q, k, cos=cos, sin=sin), apply_rope(q, k, cos=cos[0], sin=sin[0])):
        assert all(torch.equal(a, b) for a, b in zip(from_positions, from_table))


@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_positions_restart_per_sample(device, dtype):
    sample_lengths = [4, 1, 6]
    q_heads, kv_heads, head_dim = 3, 1, 10
    q, k = _qk(1, sum(sample_lengths), q_heads, kv_heads, head_dim, dtype, device)
    packed_q, packed_k = q[0], k[0]
    position_ids = torch.cat([torch.arange(length, device=device) for length in sample_lengths])
    inv_freq = _inv_freq(head_dim, device)

    packed = apply_rope(packed_q, packed_k, position_ids=position_ids, inv_freq=inv_freq)
    grads_out = [torch.randn_like(t) for t in packed]
    packed_grads = torch.autograd.grad(packed, (q, k), grads_out)

    start = 0
    for length in sample_lengths:
        end = start + length
        sample_positions = torch.arange(length, device=device)[None]
        sample = apply_rope(q[:, start:end], k[:, start:end], position_ids=sample_positions, inv_freq=inv_freq)
        sample_grads = torch.autograd.grad(sample, (q, k), [g[None, start:end] for g in grads_out])
        # Same angles per token, but torch's CPU cos may take its vectorized or its scalar path
        # depending on where an element falls, which can move cos/sin by an fp32 ulp.
        for got, want in [
            (packed[0][start:end], sample[0][0]),
            (packed[1][start:end], sample[1][0]),
            (packed_grads[0][:, start:end], sample_grads[0][:, start:end]),
            (packed_grads[1][:, start:end], sample_grads[1][:, start:end]),
        ]:
            torch.testing.assert_close(got, want, **_tolerances(dtype))
        start = end


@pytest.mark.gpu
def test_matches_reference_cuda(cuda):
    batch, tokens, q_heads, kv_heads, head_dim = 2, 1021, 32, 8, 128
    q, k = _qk(batch, tokens, q_heads, kv_heads, head_dim, torch.bfloat16, cuda)
    position_ids = torch.randint(0, 8192, (batch, tokens), device=cuda)
    inv_freq = _inv_freq(head_dim, cuda)
    cos, sin = rope_cos_sin_reference(position_ids, inv_freq)
    out = apply_rope(q, k, position_ids=position_ids, inv_freq=inv_freq)
    expected = rope_reference(q, k, cos, sin)
    grads_out = [torch.randn_like(t) for t in out]
    for got, want in zip(
        (*out, *torch.autograd.grad(out, (q, k), grads_out)),
        (*expected, *torch.autograd.grad(expected, (q, k), grads_out)),
    ):
        torch.testing.assert_close(got, want, **_tolerances(torch.bfloat16))


def test_launch_asks_for_a_power_of_two_warps():
    # The interpreter ignores num_warps, so the CPU runs above cannot catch a count the GPU refuses
    # (it did: 8 q heads beside 4 k heads of dim 128 asked for 3 warps).
    from finetune_kernels.rope import _num_warps

    powers = [2 ** i for i in range(8)]
    for q_heads in powers:
        for k_heads in (k for k in powers if k <= q_heads):
            for half in powers[2:]:
                warps = _num_warps(q_heads, k_heads, half)
                assert 1 <= warps <= 8 and warps & (warps - 1) == 0, (q_heads, k_heads, half, warps)
