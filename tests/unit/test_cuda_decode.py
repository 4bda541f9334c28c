"""The CUDA serving path: paged caches, decode steps replayed as CUDA graphs, offloaded weights.

Skipped without a CUDA device (CI has none); run on a GPU machine with
`pytest tests/unit/test_cuda_decode.py -s` (the bf16 match rate is printed).
Spans run in-process as BlockBackends, two of them split like two servers, with the local
model's own head: what the daemons run, without the network.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from beectl.head import LocalHead
from beed.server.backend import BlockBackend, StepRequest

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

PROMPT, NEW = 12, 40


@pytest.fixture(scope="module", autouse=True)
def no_tf32():
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def make_model(path: Path, family: str) -> Path:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if family == "llama":
        config = LlamaConfig(
            vocab_size=2000,
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=2,
            max_position_embeddings=1024,
        )
        model = LlamaForCausalLM(config)
    else:
        config = Gemma3TextConfig(
            vocab_size=2000,
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=32,
            sliding_window=16,
            max_position_embeddings=1024,
        )
        model = Gemma3ForCausalLM(config)
    # Larger weights than the default init: logits far apart, so greedy picks are not ties.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.eval().save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def model(request, tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp(request.param) / "m", request.param)


def servers(path: Path, dtype: str = "float32", **kw) -> list[tuple[BlockBackend, range]]:
    out = []
    for start, end in ((0, 4), (4, 8)):
        backend = BlockBackend(path, start, end, dtype=dtype, device="cuda", **kw)
        backend.allocate_kv(8192)
        out.append((backend, backend.blocks(start, end)))
    return out


def greedy(hops, head: LocalHead, ids: torch.Tensor, new: int = NEW, caches=None):
    """Greedy decoding through `hops` (prefill, then one-token steps): tokens on the host and
    logits on the head's device (where the head leaves them)."""
    caches = caches or [backend.new_cache() for backend, _ in hops]
    x, position, tokens, logits = head.embed(ids), 0, [], []
    for _ in range(new):
        h = x
        for (backend, blocks), cache in zip(hops, caches, strict=True):
            h = backend.step(cache, blocks, h, position)
        position += x.shape[1]
        step_logits = head.logits(h[:, -1])
        token = step_logits.argmax(-1, keepdim=True)
        tokens.append(token)
        logits.append(step_logits)
        x = head.embed(token)
    return torch.cat(tokens, 1).cpu(), logits, caches


def prompt(seed: int = 1, batch: int = 1) -> torch.Tensor:
    return torch.randint(3, 1900, (batch, PROMPT), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("compiled", [False, True], ids=["graphs", "compiled-graphs"])
def test_float32_graphs_equal_local_transformers(model, compiled):
    from transformers import AutoModelForCausalLM

    if compiled and "gemma3" in str(model):
        pytest.skip("one family is enough for the compiled path (a compile takes a minute)")
    local = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).cuda().eval()
    ids = prompt()
    ref = local.generate(
        ids.cuda(),
        max_new_tokens=NEW,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
        eos_token_id=None,
    )
    hops = servers(model, compile_step=compiled)
    tokens, logits, _ = greedy(hops, LocalHead(model, device="cuda"), ids)
    assert all(b.graphs is not None and b.graphs.replays >= NEW - 1 for b, _ in hops)
    assert all(b.graphs is not None and b.graphs.compiled == compiled for b, _ in hops)
    assert torch.equal(tokens, ref.sequences[:, PROMPT:].cpu())
    diff = max(
        (a.cpu() - b.float().cpu()).abs().max().item()
        for a, b in zip(logits, ref.logits, strict=True)
    )
    assert diff <= 1e-4, diff


def test_bfloat16_graphs_match_the_eager_path_on_most_tokens(model):
    head = LocalHead(model, dtype=torch.bfloat16, device="cuda")
    rates = []
    for seed in range(4):
        ids = prompt(seed)
        fast, _, _ = greedy(servers(model, "bfloat16"), head, ids)
        eager, _, _ = greedy(servers(model, "bfloat16", decode_graphs=False), head, ids)
        rates.append((fast == eager).float().mean().item())
    rate = sum(rates) / len(rates)
    print(f"\nbf16 graphs vs eager: {100 * rate:.1f}% of greedy tokens identical ({rates})")
    assert rate >= 0.9


@pytest.mark.parametrize("matmul", ["shared", "per-session"])
def test_merged_decode_steps_through_graphs_give_each_session_what_it_gets_alone(model, matmul):
    (backend, blocks), _ = servers(model, batch_matmul=matmul)
    head = LocalHead(model, device="cuda")
    sessions = [prompt(seed, batch) for seed, batch in ((1, 1), (2, 3), (3, 1), (4, 2))]
    alone_caches = [backend.new_cache() for _ in sessions]
    merged_caches = [backend.new_cache() for _ in sessions]
    lengths = [PROMPT + 7 * i for i in range(len(sessions))]  # different lengths, one bucket
    inputs = []
    for ids, length, a, m in zip(sessions, lengths, alone_caches, merged_caches, strict=True):
        x = head.embed(ids.repeat(1, 1 + length // PROMPT)[:, :length])
        backend.step(a, blocks, x, 0)
        backend.step(m, blocks, x, 0)
        inputs.append(head.embed(ids[:, :1]))
    for step in range(5):
        requests = [
            StepRequest(m, blocks, x, length + step)
            for m, x, length in zip(merged_caches, inputs, lengths, strict=True)
        ]
        merged = backend.step_many(requests)
        for i, (a, x) in enumerate(zip(alone_caches, inputs, strict=True)):
            alone = backend.step(a, blocks, x, lengths[i] + step)
            out = merged[i]
            assert isinstance(out, torch.Tensor)
            if matmul == "per-session":
                assert torch.equal(out, alone)  # one replay per session: its own products
            else:
                assert (out - alone).abs().max().item() <= 1e-4
    assert backend.batch_fallbacks == 0


def test_rollback_and_a_replay_on_another_server_use_the_paged_cache(model):
    head = LocalHead(model, device="cuda")
    ids = prompt(5)
    hops = servers(model)
    tokens, logits, caches = greedy(hops, head, ids, new=20)
    # Roll both spans back by 10 positions and decode again: the same tokens, bit for bit.
    (a, a_blocks), (b, b_blocks) = hops
    position = PROMPT + 9
    for (backend, blocks), cache in zip(hops, caches, strict=True):
        backend.truncate(cache, blocks, position)
    x = head.embed(tokens[:, 9:10])
    for i in range(10, 20):
        h = b.step(caches[1], b_blocks, a.step(caches[0], a_blocks, x, position), position)
        assert torch.equal(head.logits(h[:, -1]), logits[i])
        position += 1
        x = head.embed(head.logits(h[:, -1]).argmax(-1, keepdim=True))
    # Failover: a fresh second server gets the history replayed as one prefill, then decodes.
    spare = servers(model)[1][0]
    history = torch.cat([ids, tokens[:, :9]], 1)
    cache = spare.new_cache()
    h = spare.step(cache, b_blocks, a.forward(a_blocks, head.embed(history)), 0)
    position = history.shape[1]
    x = head.embed(tokens[:, 9:10])
    for i in range(10, 20):
        mid = a.forward(a_blocks, head.embed(torch.cat([history, tokens[:, 9:i]], 1)))[:, -1:]
        h = spare.step(cache, b_blocks, mid, position)
        step_logits = head.logits(h[:, -1])
        assert step_logits.argmax(-1).item() == tokens[0, i].item()
        assert (step_logits - logits[i]).abs().max().item() <= 1e-4
        position += 1
    del x


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_an_offloaded_span_equals_the_resident_one_bit_for_bit(model, dtype):
    head = LocalHead(model, dtype=getattr(torch, dtype), device="cuda")
    ids = prompt(6, batch=2)
    resident = servers(model, dtype, decode_graphs=False)
    offloaded = servers(model, dtype, offload_weights=1.0)
    assert all(b.streamer is not None and b.graphs is None for b, _ in offloaded)
    tokens, logits, _ = greedy(resident, head, ids, new=16)
    tokens2, logits2, _ = greedy(offloaded, head, ids, new=16)
    assert torch.equal(tokens, tokens2)
    assert all(torch.equal(x, y) for x, y in zip(logits, logits2, strict=True))
    (backend, blocks), _ = offloaded
    x = head.embed(ids).float().cpu()
    assert torch.equal(backend.forward(blocks, x), resident[0][0].forward(blocks, x))
    assert backend.streamer.loads >= 16 * 4
