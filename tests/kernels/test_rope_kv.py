"""rope_and_store_kv and store_kv: the rotation is transformers' own, and the cache holds exactly the tokens
slot_mapping names.

Every cache starts NaN: a slot the kernel writes must hold exactly the token's (rotated) k or v, and every
other slot must still be NaN afterwards.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from error_bounds import DEVICE, assert_within_bound
from torch import Tensor
from transformers import GPTNeoXConfig, LlamaConfig
from transformers.models.gpt_neox import modeling_gpt_neox as gpt_neox
from transformers.models.gptj import modeling_gptj as gptj
from transformers.models.llama import modeling_llama as llama

from batchdecode import kernels
from batchdecode.kernels import reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MAX_POSITION = 64
BLOCK_SIZE = 4


@dataclass
class LeftPaddedBatch:
    position_ids: Tensor   # [B, L] as transformers' generate builds them: pads at position 1
    slot_mapping: Tensor   # [B * L] flat cache slot of each token, -1 for a pad
    num_blocks: int

    @property
    def positions(self) -> Tensor:
        return self.position_ids.flatten()


def left_padded_batch(lengths: list[int]) -> LeftPaddedBatch:
    """Rows of the given lengths, left-padded to the longest, their pages scattered over a larger cache."""
    max_len = max(lengths)
    pads = torch.tensor([max_len - n for n in lengths])
    index = torch.arange(max_len)
    real = index[None, :] >= pads[:, None]
    position_ids = (index[None, :] - pads[:, None]).masked_fill(~real, 1)
    pages_per_row = -(-max_len // BLOCK_SIZE)
    num_blocks = len(lengths) * pages_per_row + 3  # spare pages that nobody may touch
    block_table = torch.randperm(num_blocks)[: len(lengths) * pages_per_row].view(len(lengths), pages_per_row)
    page = block_table.gather(1, position_ids // BLOCK_SIZE)
    slots = (page * BLOCK_SIZE + position_ids % BLOCK_SIZE).masked_fill(~real, -1)
    return LeftPaddedBatch(position_ids.to(DEVICE), slots.flatten().to(DEVICE), num_blocks)


def nan_caches(num_blocks: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    shape = (num_blocks, BLOCK_SIZE, num_kv_heads, head_dim)
    return (torch.full(shape, float("nan"), dtype=dtype, device=DEVICE),
            torch.full(shape, float("nan"), dtype=dtype, device=DEVICE))


def assert_cache_holds(cache: Tensor, slot_mapping: Tensor, expected: Tensor) -> None:
    """cache holds expected[t] (bit for bit) at slot_mapping[t] >= 0, and NaN in every other slot."""
    flat = cache.view(-1, *cache.shape[2:])
    written = slot_mapping >= 0
    assert torch.equal(flat[slot_mapping[written]], expected[written])
    untouched = torch.ones(flat.shape[0], dtype=torch.bool, device=flat.device)
    untouched[slot_mapping[written]] = False
    assert flat[untouched].isnan().all(), "a slot outside slot_mapping was written"


def packed_qkv(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v [T, heads, D] as the strided views of one fused qkv projection a model hands over."""
    qkv = torch.cat([q, k, v], dim=1)
    h, kvh = q.shape[1], k.shape[1]
    return qkv[:, :h], qkv[:, h : h + kvh], qkv[:, h + kvh :]


def tokens(x: Tensor) -> Tensor:
    """transformers' [B, heads, L, D] -> packed [B * L, heads, D]."""
    return x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[3])


def run_kernel(q, k, v, batch: LeftPaddedBatch, cos_sin_cache: Tensor, rotary_dim: int, neox_style: bool):
    """The kernel on packed views of q, k, v [T, heads, D]; checks the in-place contract and the cache."""
    v_before = v.clone()
    q, k, v = packed_qkv(q, k, v)
    k_cache, v_cache = nan_caches(batch.num_blocks, k.shape[1], k.shape[2], k.dtype)
    q_out, k_out = kernels.rope_and_store_kv(q, k, v, batch.positions, cos_sin_cache, k_cache, v_cache,
                                             batch.slot_mapping, rotary_dim=rotary_dim, neox_style=neox_style)
    assert q_out is q and k_out is k
    assert torch.equal(v, v_before)
    assert_cache_holds(k_cache, batch.slot_mapping, k)
    assert_cache_holds(v_cache, batch.slot_mapping, v)
    return q, k


def cos_sin_cache_of(inv_freq: Tensor, attention_scaling: float) -> Tensor:
    """vLLM's table from a transformers rotary module's frequencies, computed in float32 as transformers does."""
    freqs = torch.arange(MAX_POSITION, dtype=torch.float32, device=DEVICE)[:, None] * inv_freq.float()[None, :]
    return torch.cat([freqs.cos() * attention_scaling, freqs.sin() * attention_scaling], dim=-1)


def check_rotate_half_model(rotary, apply_rotary_pos_emb, num_heads: int, num_kv_heads: int, head_dim: int,
                            dtype: torch.dtype) -> None:
    """Llama-style (rotate_half) rotary: kernel vs transformers' module and apply_rotary_pos_emb."""
    batch = left_padded_batch([2, 1, 3])
    b, seq = batch.position_ids.shape
    q = torch.randn(b, num_heads, seq, head_dim, device=DEVICE).to(dtype)
    k = torch.randn(b, num_kv_heads, seq, head_dim, device=DEVICE).to(dtype)
    v = torch.randn(b, num_kv_heads, seq, head_dim, device=DEVICE).to(dtype)
    # exact: transformers' formula in float64 on the module's own frequencies
    freqs = batch.position_ids[..., None].double() * rotary.inv_freq.double()
    emb = torch.cat([freqs, freqs], dim=-1)
    scale = rotary.attention_scaling
    q_exact, k_exact = apply_rotary_pos_emb(q.double(), k.double(), emb.cos() * scale, emb.sin() * scale)
    # transformers as it runs in dtype
    cos, sin = rotary(q, batch.position_ids)
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos, sin)

    rotary_dim = 2 * rotary.inv_freq.numel()
    cos_sin_cache = cos_sin_cache_of(rotary.inv_freq, scale)
    q_out, k_out = run_kernel(tokens(q), tokens(k), tokens(v), batch, cos_sin_cache, rotary_dim, neox_style=True)
    assert_within_bound(q_out, tokens(q_exact), tokens(q_hf), "q")
    assert_within_bound(k_out, tokens(k_exact), tokens(k_hf), "k")
    assert torch.equal(q_out[..., rotary_dim:], tokens(q)[..., rotary_dim:]), "features past rotary_dim changed"


LLAMA_ROPE = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16},
}


@pytest.mark.parametrize("rope,dtype", [("default", torch.float32), ("default", torch.float16),
                                        ("default", torch.bfloat16), ("llama3", torch.float32),
                                        ("llama3", torch.bfloat16), ("yarn", torch.float16)], ids=str)
def test_llama_rotary_matches_transformers(rope, dtype):
    config = LlamaConfig(hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=MAX_POSITION, rope_parameters=LLAMA_ROPE[rope])
    rotary = llama.LlamaRotaryEmbedding(config).to(DEVICE)
    if rope == "yarn":
        assert rotary.attention_scaling != 1.0  # the cache must carry the scaling
    check_rotate_half_model(rotary, llama.apply_rotary_pos_emb, 4, 2, 64, dtype)


@pytest.mark.parametrize("head_dim,partial,dtype", [(80, 0.25, torch.float32), (80, 0.25, torch.bfloat16),
                                                   (64, 0.5, torch.float16)], ids=str)
def test_gpt_neox_partial_rotary_matches_transformers(head_dim, partial, dtype):
    config = GPTNeoXConfig(hidden_size=4 * head_dim, num_attention_heads=4, max_position_embeddings=MAX_POSITION,
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                            "partial_rotary_factor": partial})
    rotary = gpt_neox.GPTNeoXRotaryEmbedding(config).to(DEVICE)
    assert 2 * rotary.inv_freq.numel() == int(head_dim * partial)
    check_rotate_half_model(rotary, gpt_neox.apply_rotary_pos_emb, 4, 2, head_dim, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gptj_interleaved_partial_rotary_matches_transformers(dtype):
    num_heads, num_kv_heads, head_dim, rotary_dim = 4, 2, 64, 16
    batch = left_padded_batch([3, 1])
    b, seq = batch.position_ids.shape
    sin_cos = gptj.create_sinusoidal_positions(MAX_POSITION, rotary_dim).to(DEVICE)  # [sin | cos]
    q = torch.randn(b, seq, num_heads, head_dim, device=DEVICE).to(dtype)  # GPT-J rotates [B, L, heads, D]
    k = torch.randn(b, seq, num_kv_heads, head_dim, device=DEVICE).to(dtype)
    v = torch.randn(b * seq, num_kv_heads, head_dim, device=DEVICE).to(dtype)

    def gptj_rotary(x: Tensor, table: Tensor) -> Tensor:
        sin, cos = table[batch.position_ids].to(x.dtype).chunk(2, dim=-1)
        rotated = gptj.apply_rotary_pos_emb(x[..., :rotary_dim], sin, cos)
        return torch.cat([rotated, x[..., rotary_dim:]], dim=-1).flatten(0, 1)

    cos_sin_cache = torch.cat(sin_cos.chunk(2, dim=-1)[::-1], dim=-1)  # vLLM's [cos | sin]
    positions32 = LeftPaddedBatch(batch.position_ids.int(), batch.slot_mapping, batch.num_blocks)
    q_out, k_out = run_kernel(q.flatten(0, 1), k.flatten(0, 1), v, positions32, cos_sin_cache, rotary_dim,
                              neox_style=False)
    assert_within_bound(q_out, gptj_rotary(q.double(), sin_cos.double()), gptj_rotary(q, sin_cos), "q")
    assert_within_bound(k_out, gptj_rotary(k.double(), sin_cos.double()), gptj_rotary(k, sin_cos), "k")


# (heads, kv heads, head_dim, rotary_dim, neox): model layouts and odd ones (D=18, 40; rotary halves of 10)
SHAPES = [
    (9, 3, 64, 64, True), (8, 1, 256, 256, True), (4, 4, 80, 80, True), (4, 2, 96, 96, False),
    (2, 2, 128, 128, True), (4, 2, 128, 64, False), (3, 1, 40, 40, True), (2, 2, 18, 18, False),
    (2, 1, 80, 20, True), (5, 5, 64, 16, True),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,rotary_dim,neox_style", SHAPES)
def test_rope_and_store_kv_shapes(num_heads, num_kv_heads, head_dim, rotary_dim, neox_style, dtype):
    num_tokens = 4
    q = torch.randn(num_tokens, num_heads, head_dim, device=DEVICE).to(dtype)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, device=DEVICE).to(dtype)
    v = torch.randn(num_tokens, num_kv_heads, head_dim, device=DEVICE).to(dtype)
    positions = torch.randint(0, MAX_POSITION, (num_tokens,), device=DEVICE)
    cos_sin_cache = torch.randn(MAX_POSITION, rotary_dim, device=DEVICE)
    slot_mapping = torch.randperm(5 * BLOCK_SIZE, device=DEVICE)[:num_tokens]
    slot_mapping[2] = -1
    batch = LeftPaddedBatch(positions, slot_mapping, num_blocks=5)

    cos_sin = cos_sin_cache[positions]
    cos, sin = cos_sin.chunk(2, dim=-1)
    expected = {}
    for name, x in (("q", q), ("k", k)):
        exact = reference._rotate(x.double(), cos.double(), sin.double(), neox_style)
        expected[name] = exact, reference._rotate(x, cos.to(dtype), sin.to(dtype), neox_style)
    q_out, k_out = run_kernel(q, k, v, batch, cos_sin_cache, rotary_dim, neox_style)
    assert_within_bound(q_out, *expected["q"], "q")
    assert_within_bound(k_out, *expected["k"], "k")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_kv_heads,head_dim", [(3, 64), (8, 128), (1, 256), (2, 80), (4, 96), (2, 18)])
def test_store_kv_writes_exactly_the_mapped_slots(num_kv_heads, head_dim, dtype):
    num_tokens = 5
    k = torch.randn(num_tokens, num_kv_heads, head_dim, device=DEVICE).to(dtype)
    v = torch.randn(num_tokens, num_kv_heads, head_dim, device=DEVICE).to(dtype)
    _, k_view, v_view = packed_qkv(torch.randn_like(k), k, v)
    slot_mapping = torch.randperm(4 * BLOCK_SIZE, device=DEVICE)[:num_tokens]
    slot_mapping[[0, 3]] = -1
    k_cache, v_cache = nan_caches(4, num_kv_heads, head_dim, dtype)
    kernels.store_kv(k_view, v_view, k_cache, v_cache, slot_mapping)
    assert_cache_holds(k_cache, slot_mapping, k)
    assert_cache_holds(v_cache, slot_mapping, v)


def test_no_tokens_is_a_no_op():
    q = torch.randn(0, 4, 64, device=DEVICE)
    k = v = torch.randn(0, 2, 64, device=DEVICE)
    k_cache, v_cache = nan_caches(2, 2, 64, torch.float32)
    empty = torch.zeros(0, dtype=torch.long, device=DEVICE)
    cos_sin_cache = torch.randn(MAX_POSITION, 64, device=DEVICE)
    assert kernels.rope_and_store_kv(q, k, v, empty, cos_sin_cache, k_cache, v_cache, empty)[0] is q
    kernels.store_kv(k, v, k_cache, v_cache, empty)
    assert k_cache.isnan().all() and v_cache.isnan().all()


@pytest.mark.parametrize("rotary_dim", [63, 66, 0])
def test_bad_rotary_dim_is_refused(rotary_dim):
    q = torch.randn(2, 4, 64, device=DEVICE)
    k = v = torch.randn(2, 2, 64, device=DEVICE)
    k_cache, v_cache = nan_caches(2, 2, 64, torch.float32)
    positions = torch.zeros(2, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="rotary_dim"):
        kernels.rope_and_store_kv(q, k, v, positions, torch.randn(MAX_POSITION, 66, device=DEVICE), k_cache,
                                  v_cache, positions, rotary_dim=rotary_dim)


def test_cache_of_wrong_shape_is_refused():
    k = v = torch.randn(2, 2, 64, device=DEVICE)
    k_cache, v_cache = nan_caches(2, 2, 32, torch.float32)
    with pytest.raises(ValueError, match="k_cache"):
        kernels.store_kv(k, v, k_cache, v_cache, torch.zeros(2, dtype=torch.long, device=DEVICE))
