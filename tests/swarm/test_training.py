"""Training through the swarm: gradients through remote blocks (real daemons) equal local
transformers; prompt tuning, deep prompts, classification, failover between forward and
backward, and the server's refusals of malformed Backwards."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest
import torch
from transformers import AutoModelForSequenceClassification
from transformers.loss.loss_utils import ForCausalLMLoss

from beectl import (
    AutoDistributedModel,
    AutoDistributedModelForCausalLM,
    AutoDistributedModelForSequenceClassification,
)
from beectl.local_swarm import LocalSwarm
from tests.conftest import peers_of

MODEL = "smollm2-135m"
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Bees make honey in the hive"]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def swarm() -> Iterator[LocalSwarm]:
    with LocalSwarm(spans=[(0, 15), (15, 30)]) as s:
        yield s


@pytest.fixture(scope="module")
def batch(tokenizer):
    enc = tokenizer(TEXTS, return_tensors="pt", padding=True, padding_side="left")
    return enc.input_ids, enc.attention_mask


def local_loss(local_model, embeds, mask, labels, prompts=None, deep=None):
    """The reference: the whole local model with the prompts before the input and deep
    prompts added to each layer's input at their positions (hooks)."""
    k = 0 if prompts is None else prompts.shape[0]
    batch = embeds.shape[0]
    if prompts is not None:
        embeds = torch.cat([prompts.unsqueeze(0).expand(batch, -1, -1), embeds], 1)
        mask = torch.cat([torch.ones(batch, k, dtype=mask.dtype), mask], 1)
    handles = []
    if deep is not None:
        for i, layer in enumerate(local_model.model.layers):

            def add(module, args, kwargs, i=i):
                hidden = args[0] if args else kwargs["hidden_states"]
                hidden = torch.cat([hidden[:, :k] + deep[i], hidden[:, k:]], 1)
                if args:
                    return (hidden, *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": hidden}

            handles.append(layer.register_forward_pre_hook(add, with_kwargs=True))
    try:
        out = local_model(inputs_embeds=embeds, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
    logits = out.logits[:, k:].contiguous()
    return ForCausalLMLoss(logits, labels, local_model.config.vocab_size), logits


@pytest.mark.parametrize(
    "chunking",
    [{"train_pipeline_chunks": 1}, {"train_chunk_tokens": 12}],
    ids=["one-request", "a-row-per-request"],
)
def test_gradients_through_two_servers_equal_local(swarm, local_model, batch, chunking):
    """Prompts and input embeddings get the gradients local transformers gives them, whether
    the batch goes as one request per hop or in chunks of rows."""
    ids, mask = batch
    labels = ids.masked_fill(mask == 0, -100)
    with AutoDistributedModelForCausalLM.from_pretrained(
        MODEL, peers_of(swarm), tuning_mode="ptune", num_prompts=3, **chunking
    ) as model:
        assert model.prompts is not None
        prompts = model.prompts.prompt_embeddings
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        out = model(inputs_embeds=embeds, attention_mask=mask, labels=labels)
        out.loss.backward()
        want_chunks = 1 if "train_pipeline_chunks" in chunking else 2
        assert len(model.remote_blocks.chunks(2, ids.shape[1] + 3)) == want_chunks
        ref_prompts = prompts.detach().clone().requires_grad_(True)
        ref_embeds = embeds.detach().clone().requires_grad_(True)
        loss, logits = local_loss(local_model, ref_embeds, mask, labels, ref_prompts)
        loss.backward()
        assert abs(out.loss.item() - loss.item()) < 1e-5
        assert torch.allclose(out.logits, logits, atol=1e-4)
        assert relative(prompts.grad, ref_prompts.grad) < 1e-5
        assert relative(embeds.grad, ref_embeds.grad) < 1e-5
        # Frozen parts stay frozen: the embeddings get no gradient unless asked.
        assert model.get_input_embeddings().weight.grad is None


def test_deep_prompt_gradients_equal_local(swarm, local_model, batch):
    ids, mask = batch
    labels = ids.masked_fill(mask == 0, -100)
    with AutoDistributedModelForCausalLM.from_pretrained(
        MODEL, peers_of(swarm), tuning_mode="deep_ptune", num_prompts=2
    ) as model:
        tuning = model.prompts
        assert tuning is not None and tuning.deep_prompts is not None
        with torch.no_grad():  # nonzero deep prompts, so that they change the result
            tuning.deep_prompts.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        shallow = tuning.prompt_embeddings.detach().clone().requires_grad_(True)
        deep = tuning.deep_prompts.detach().clone().requires_grad_(True)
        embeds = local_model.get_input_embeddings()(ids)
        loss, logits = local_loss(local_model, embeds, mask, labels, shallow, deep)
        loss.backward()
        assert abs(out.loss.item() - loss.item()) < 1e-5
        assert torch.allclose(out.logits, logits, atol=1e-4)
        assert relative(tuning.deep_prompts.grad, deep.grad) < 1e-5
        assert relative(tuning.prompt_embeddings.grad, shallow.grad) < 1e-5


def test_sequence_classification_and_bare_model_equal_local(swarm, model_path, batch):
    """Classification logits (pooled at each row's last non-padding token, the batch padded on
    the left) and the bare model's last hidden states equal transformers' own classes."""
    ids, mask = batch
    local = AutoModelForSequenceClassification.from_pretrained(
        model_path, num_labels=3, dtype=torch.float32
    ).eval()
    with AutoDistributedModelForSequenceClassification.from_pretrained(
        MODEL, peers_of(swarm), num_labels=3
    ) as model:
        model.score.load_state_dict(local.score.state_dict())
        labels = torch.tensor([0, 2])
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        want = local(input_ids=ids, attention_mask=mask, labels=labels)
        assert out.logits.shape == (2, 3)
        assert torch.allclose(out.logits, want.logits, atol=1e-4)
        assert abs(out.loss.item() - want.loss.item()) < 1e-4
        out.loss.backward()  # the head trains: its weight gets a gradient
        assert model.score.weight.grad is not None and model.score.weight.grad.abs().sum() > 0
    with AutoDistributedModel.from_pretrained(MODEL, peers_of(swarm)) as bare:
        with torch.no_grad():
            hidden = bare(input_ids=ids, attention_mask=mask).last_hidden_state
        want = local.model(input_ids=ids, attention_mask=mask).last_hidden_state
        assert torch.allclose(hidden, want, atol=1e-4)


def test_prompt_tuning_lowers_the_loss_and_changes_generation(swarm, local_model, tokenizer):
    """30 Adam steps on one sentence bring its loss far down; generation after the tuned
    prompts equals local transformers with the same prompts before the input, and differs
    from generation without them."""
    text = "Our secret password is purple elephant seventeen."
    ids = tokenizer([text], return_tensors="pt").input_ids
    with AutoDistributedModelForCausalLM.from_pretrained(
        MODEL, peers_of(swarm), tuning_mode="ptune", num_prompts=4
    ) as model:
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
        assert [n for n, p in model.named_parameters() if p.requires_grad] == [
            "prompts.prompt_embeddings"
        ]
        losses = []
        for _ in range(30):
            optimizer.zero_grad()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert losses[-1] < 0.3 * losses[0], losses
        start = tokenizer(["Our secret password is"], return_tensors="pt").input_ids
        tuned = model.generate(start, max_new_tokens=8, speculate="off")
        prompts = model.prompts.prompt_embeddings.detach()
    embeds = torch.cat([prompts[None], local_model.get_input_embeddings()(start)], 1)
    want = local_model.generate(
        inputs_embeds=embeds, max_new_tokens=8, do_sample=False, pad_token_id=0
    )
    assert tuned[0, start.shape[1] :].tolist() == want[0].tolist()
    plain = local_model.generate(start, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert plain[0, start.shape[1] :].tolist() != want[0].tolist()


def test_a_server_killed_between_forward_and_backward_is_replaced(local_model, batch):
    """The server of the second half dies after the forward: the backward routes its blocks
    to the replica (recomputing its input there) and the gradient is the same."""
    ids, mask = batch
    labels = ids.masked_fill(mask == 0, -100)
    with LocalSwarm(spans=[(0, 15), (15, 30), (15, 30)]) as swarm:
        with AutoDistributedModelForCausalLM.from_pretrained(
            MODEL, peers_of(swarm), tuning_mode="ptune", num_prompts=2
        ) as model:
            grads = []
            for kill in (False, True):
                model.zero_grad()
                out = model(input_ids=ids, attention_mask=mask, labels=labels)
                if kill:
                    used = {h.peer_id for h in model.remote_blocks.last_route if h.start == 15}
                    victim = next(s for s in swarm.servers if s.peer_id in used)
                    victim.signal(signal.SIGKILL)
                    assert victim.process.wait(10) == -signal.SIGKILL
                out.loss.backward()
                grads.append(model.prompts.prompt_embeddings.grad.clone())
            assert model.remote_blocks.recoveries >= 1
            assert relative(grads[1], grads[0]) < 1e-6
            # and the next step goes on, through the replica
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()


def test_malformed_backwards_get_clear_errors_and_the_server_goes_on(swarm, model_path):
    """A Backward for blocks the server does not hold, with a gradient of the wrong shape,
    deep prompts of the wrong shape, or too many tokens: each a clear error on its stream;
    then a correct Backward on the same connection is answered."""
    from beed.models.fingerprint import model_fingerprint
    from beed.models.registry import cache_dir
    from protocol import encode_message_bytes
    from protocol.messages import Backward, BackwardResult, Error
    from tests.swarm.test_faults import RawPeer

    fingerprint = model_fingerprint(model_path, cache_dir() / "fingerprints.json")
    server = next(s for s in swarm.servers if "0:15" in " ".join(s.args))
    x, g = torch.randn(1, 4, 576), torch.randn(1, 4, 576)
    bad = [
        (Backward(1, fingerprint, 15, 30, x, g), 204, "not served"),
        (Backward(2, fingerprint, 0, 15, x, torch.randn(1, 3, 576)), 202, "grad_output"),
        (Backward(3, fingerprint, 0, 15, x, g, prompts=torch.zeros(14, 1, 2, 576)), 202, "prompts"),
        (Backward(4, fingerprint, 0, 15, x, g, prompts=torch.zeros(15, 1, 5, 576)), 202, "prompts"),
        (Backward(5, "0" * 16, 0, 15, x, g), 203, ""),
        (
            Backward(6, fingerprint, 0, 15, torch.randn(1, 1100, 576), torch.randn(1, 1100, 576)),
            209,
            "",
        ),
    ]
    peer = RawPeer(server.address)
    try:
        peer.hello()
        for msg, code, words in bad:
            peer.send(encode_message_bytes(msg))
            reply = peer.read()
            assert isinstance(reply, Error) and reply.stream_id == msg.stream_id, reply
            assert reply.code == code and words in reply.message, reply
        prompts = torch.randn(15, 1, 2, 576)
        peer.send(encode_message_bytes(Backward(9, fingerprint, 0, 15, x, g, prompts=prompts)))
        reply = peer.read()
        assert isinstance(reply, BackwardResult) and reply.grad_input.shape == x.shape
        assert reply.grad_prompts is not None and reply.grad_prompts.shape == prompts.shape
    finally:
        peer.close()


def test_beectl_finetune_then_generate_with_the_tuned_prompts(
    swarm, local_model, tokenizer, tmp_path
):
    """The documented commands: `beectl finetune` on the shipped example file logs JSON
    steps with a falling loss and saves prompts; `beectl generate --tuned-prompts` loads them
    and gives what local transformers gives with those prompts before the input."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from beectl.training.prompts import load_prompts

    data = Path(__file__).parents[2] / "docs" / "examples" / "sentiment.jsonl"
    out = tmp_path / "sentiment.safetensors"
    peers = ",".join(peers_of(swarm))
    cli = [sys.executable, "-m", "beectl.cli"]
    run = subprocess.run(
        [
            *cli,
            "finetune",
            str(data),
            "--out",
            str(out),
            "--steps",
            "12",
            "--lr",
            "0.05",
            "--num-prompts",
            "4",
            "--batch-size",
            "4",
            "--log-every",
            "3",
            "--json",
            "--initial-peers",
            peers,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    assert [line["step"] for line in lines] == [3, 6, 9, 12]
    assert lines[-1]["loss"] < lines[0]["loss"], lines
    saved = load_prompts(out)
    assert saved.prompts.shape == (4, 576) and saved.mode == "ptune"
    prompt = "Review: What a lovely, happy film. Sentiment:"
    run = subprocess.run(
        [
            *cli,
            "generate",
            prompt,
            "--raw",
            "--tuned-prompts",
            str(out),
            "--max-new-tokens",
            "3",
            "--speculate",
            "off",
            "--json",
            "--initial-peers",
            peers,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout)["token_ids"]
    ids = tokenizer([prompt], return_tensors="pt").input_ids
    embeds = torch.cat([saved.prompts[None], local_model.get_input_embeddings()(ids)], 1)
    want = local_model.generate(
        inputs_embeds=embeds, max_new_tokens=3, do_sample=False, pad_token_id=0
    )
    # the CLI stops at the end-of-sequence token (the local fixture never does)
    assert got == want[0].tolist()[: len(got)] and got[-1] == tokenizer.eos_token_id
    assert json.loads(run.stdout)["text"].strip() == "positive"  # what it was tuned to say
    # a file that is not prompts is refused clearly
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    run = subprocess.run(
        [*cli, "generate", prompt, "--raw", "--tuned-prompts", str(bad), "--initial-peers", peers],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode != 0 and "not a prompts file" in run.stderr


def test_transformers_trainer_trains_the_prompts(swarm, tokenizer, tmp_path):
    """transformers.Trainer drives the distributed model like any model: its optimizer gets
    the trainable prompts only, and they change."""
    from transformers import Trainer, TrainingArguments

    rows = [tokenizer(t).input_ids[:6] for t in TEXTS * 2]
    data = [{"input_ids": r, "labels": r} for r in rows]
    with AutoDistributedModelForCausalLM.from_pretrained(
        MODEL, peers_of(swarm), tuning_mode="ptune", num_prompts=2
    ) as model:
        before = model.prompts.prompt_embeddings.detach().clone()
        args = TrainingArguments(
            output_dir=str(tmp_path),
            max_steps=3,
            per_device_train_batch_size=2,
            learning_rate=0.05,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            logging_steps=1,
            remove_unused_columns=False,
        )
        trainer = Trainer(model=model, args=args, train_dataset=data)
        result = trainer.train()
        assert result.global_step == 3 and result.training_loss > 0
        assert not torch.equal(model.prompts.prompt_embeddings.detach(), before)


def test_lora_on_the_client_head_through_peft(swarm, local_model, batch):
    """peft's LoRA layers on the client's own LM head: their gradients through the swarm equal
    the same adapters on local transformers, and generation uses the adapted head."""
    import copy

    peft = pytest.importorskip("peft")
    ids, mask = batch
    labels = ids.masked_fill(mask == 0, -100)

    def lora() -> object:  # B random, not zero: the adapter changes the logits from the start
        return peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["lm_head"], init_lora_weights=False
        )

    local = peft.get_peft_model(copy.deepcopy(local_model), lora())
    with AutoDistributedModelForCausalLM.from_pretrained(MODEL, peers_of(swarm)) as model:
        plain = model.generate(ids[:1, -6:], max_new_tokens=6, eos_token_id=None)
        tuned = peft.get_peft_model(model, lora())
        trainable = {n for n, p in tuned.named_parameters() if p.requires_grad}
        assert trainable and all("lora_" in n for n in trainable)
        peft.set_peft_model_state_dict(local, peft.get_peft_model_state_dict(tuned))
        out = tuned(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        ref = local(input_ids=ids, attention_mask=mask, labels=labels)
        ref.loss.backward()
        assert abs(out.loss.item() - ref.loss.item()) < 1e-5
        assert torch.allclose(out.logits, ref.logits.float(), atol=1e-4)
        grads = {n: p.grad for n, p in tuned.named_parameters() if p.requires_grad}
        for name, p in local.named_parameters():
            if p.requires_grad:
                assert relative(grads[name], p.grad) < 1e-5, name
        # Generation goes through the adapted head: the local adapted model's tokens.
        got = model.generate(ids[:1, -6:], max_new_tokens=6, eos_token_id=None)
        want = local.base_model.model.generate(
            ids[:1, -6:], max_new_tokens=6, do_sample=False, attention_mask=torch.ones(1, 6)
        )
        assert got.tolist() == want.tolist()
        assert got.tolist() != plain.tolist()
