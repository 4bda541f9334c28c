"""The Python API, in the style transformers users know.

```python
from beectl import AutoDistributedModelForCausalLM
model = AutoDistributedModelForCausalLM.from_pretrained("smollm2-135m", initial_peers=["127.0.0.1:31340"])
ids = model.tokenizer("A cat", return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=20)
with model.inference_session(max_length=512) as session:   # multi-turn: the past stays cached
    out = model.generate(ids, max_new_tokens=20, session=session)
    out = model.generate(torch.cat([out, more_ids], 1), max_new_tokens=20, session=session)
```
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

import torch
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.modeling_outputs import CausalLMOutputWithPast

from beectl.config import ClientConfig
from beectl.distributed import (
    DistributedModel,
    DistributedModelForSequenceClassification,
    ignore_arguments,
)
from beectl.generation import GenerationOutput, SamplingConfig, generate, left_pad, until_eos
from beectl.model import RemoteModel
from beectl.runner import LoopThread
from beectl.session import InferenceSession
from beectl.speculative.adaptive import SpeculationConfig
from beectl.speculative.drafts import DraftModel
from beectl.training.tuned import check_generates, generate_prompted, strip_prompts
from beectl.verify import VerifyStats
from beed.dht.peers import parse_initial_peers
from beed.net.swarm_key import SwarmKey
from protocol.errors import BadRequestError

_UNSUPPORTED = {"num_beams": 1, "num_return_sequences": 1, "penalty_alpha": None}


class Session:
    """A synchronous handle on an InferenceSession that remembers the ids it has cached."""

    def __init__(self, model: DistributedModelForCausalLM, inner: InferenceSession) -> None:
        self._model = model
        self.inner = inner
        self.cached_ids: torch.Tensor | None = None

    @property
    def position(self) -> int:
        return self.inner.position

    def __enter__(self) -> Session:
        self._model._loop.run(self.inner.open())
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._model._loop.run(self.inner.aclose())


class DistributedModelForCausalLM(DistributedModel):
    """A causal LM whose blocks run in the swarm. `generate` takes the usual arguments;
    `model(input_ids=..., labels=...)` returns transformers' CausalLMOutputWithPast (with
    `.loss` when labels are given), differentiable through the servers."""

    def __init__(self, remote: RemoteModel, loop: LoopThread, **tuning: Any) -> None:
        super().__init__(remote, loop, **tuning)
        self.lm_head = remote.head.parts[2]
        self.generation_config = remote.generation_config

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.lm_head

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        ignore_arguments(kwargs)
        items = kwargs.get("num_items_in_batch")
        hidden = self._blocks_output(input_ids, attention_mask, inputs_embeds)
        logits = self._remote.head.project(hidden)
        loss = None
        if labels is not None:
            loss = ForCausalLMLoss(
                logits, labels.to(logits.device), self.config.vocab_size, num_items_in_batch=items
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    @property
    def verification(self) -> VerifyStats:
        """Spot checks of servers' results so far (beectl/verify.py): steps checked, servers
        caught answering wrong, steps that had no other server to check them on."""
        return self._remote.swarm.verifier.stats

    def inference_session(self, *, max_length: int, batch_size: int = 1) -> Session:
        """A session to reuse across `generate` calls (`with model.inference_session(...) as s`)."""
        return Session(
            self, self._remote.inference_session(max_length=max_length, batch_size=batch_size)
        )

    def _sampling(self, batch: int, kwargs: dict[str, Any]) -> SamplingConfig:
        for name, neutral in _UNSUPPORTED.items():
            if kwargs.pop(name, neutral) != neutral:
                raise BadRequestError(f"{name} is not supported by distributed generate yet")
        gc = self.generation_config
        eos = kwargs.pop("eos_token_id", gc.eos_token_id)
        eos_ids: tuple[int, ...] = (
            () if eos is None else tuple(eos) if isinstance(eos, Iterable) else (int(eos),)
        )
        pad = kwargs.pop("pad_token_id", gc.pad_token_id)
        if pad is None:
            pad = eos_ids[0] if eos_ids else 0
        stop = kwargs.pop("stop_strings", None) or ()

        def given(name: str, default: Any) -> Any:
            value = kwargs.pop(name, None)
            return default if value is None else value

        config = SamplingConfig(
            max_new_tokens=int(given("max_new_tokens", gc.max_new_tokens or 20)),
            do_sample=bool(given("do_sample", False)),
            temperature=float(given("temperature", 1.0)),
            top_k=int(given("top_k", 0)),
            top_p=float(given("top_p", 1.0)),
            repetition_penalty=float(given("repetition_penalty", 1.0)),
            seed=kwargs.pop("seed", None),
            eos_token_ids=eos_ids,
            pad_token_id=int(pad),
            stop_strings=(stop,) if isinstance(stop, str) else tuple(stop),
        )
        for ignored in ("use_cache", "return_dict_in_generate", "output_logits"):
            kwargs.pop(ignored, None)
        if kwargs:
            raise TypeError(f"generate() got unsupported arguments: {', '.join(sorted(kwargs))}")
        return config

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        session: Session | None = None,
        streamer: Any = None,
        **kwargs: Any,
    ) -> Any:
        """Generate after `input_ids`; returns the sequences tensor [batch, prompt + new].

        With `return_dict_in_generate=True` returns a GenerationOutput (sequences, logits when
        `output_logits=True`, timings, speculation counts). With `session=`, the session's
        cached past is reused and `input_ids` must start with everything that session has seen.
        `speculate="auto"|"off"|N` (default auto) drafts tokens to verify several per round
        trip, by prompt lookup or by `draft_model="NAME"` (a local model, same tokenizer).
        """
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        want_dict = bool(kwargs.get("return_dict_in_generate", False))
        output_logits = bool(kwargs.get("output_logits", False))
        draft_name = kwargs.pop("draft_model", None)
        speculation = SpeculationConfig.parse(kwargs.pop("speculate", "auto"))
        sampling = self._sampling(input_ids.shape[0], dict(kwargs))
        draft = None
        if speculation.enabled and draft_name is not None:

            async def load() -> DraftModel:  # on the loop's thread, which runs it later
                return self._remote.draft_model(draft_name)

            draft = self._loop.run(load())
        if streamer is not None:
            streamer.put(input_ids.cpu())

        def on_tokens(ids: torch.Tensor) -> None:
            if streamer is not None:
                streamer.put(ids.cpu())

        prompts = self.prompts
        if prompts is not None:
            check_generates(prompts)

        async def run(inner: InferenceSession, cached: torch.Tensor | None) -> GenerationOutput:
            options: dict[str, Any] = {
                "attention_mask": attention_mask,
                "cached_ids": cached,
                "on_tokens": on_tokens,
                "decode_text": lambda ids: str(
                    self.tokenizer.decode(ids, skip_special_tokens=True)
                ),
                "output_logits": output_logits,
                "speculation": speculation,
                "draft_model": draft,
            }
            self._bind_head()
            head = self._remote.head
            if prompts is not None:
                return await generate_prompted(head, inner, input_ids, sampling, prompts, **options)
            return await generate(head, inner, input_ids, sampling, **options)

        if session is not None:
            out = self._loop.run(run(session.inner, session.cached_ids))
            # The last generated token was never fed to the servers: it is not cached.
            session.cached_ids = out.sequences[:, : session.inner.position]
            if prompts is not None:
                out = strip_prompts(out, prompts)
        else:
            max_length = self.num_prompts + input_ids.shape[1] + sampling.max_new_tokens

            async def fresh() -> GenerationOutput:
                async with self._remote.inference_session(
                    max_length=max_length, batch_size=input_ids.shape[0]
                ) as inner:
                    return await run(inner, None)

            out = self._loop.run(fresh())
            if prompts is not None:
                out = strip_prompts(out, prompts)
        if streamer is not None:
            streamer.end()
        return out if want_dict else out.sequences

    def generate_batch(
        self, prompts: Sequence[str], *, apply_chat_template: bool = False, **kwargs: Any
    ) -> list[str]:
        """Generate for several prompts at once (left-padded into one batch); the new text of
        each, cut at its end-of-sequence token. Takes the usual generation arguments."""
        tok: Any = self.tokenizer
        if apply_chat_template:
            rows = [
                list(
                    tok.apply_chat_template(
                        [{"role": "user", "content": p}],
                        add_generation_prompt=True,
                        return_dict=True,
                    )["input_ids"]
                )
                for p in prompts
            ]
        else:
            rows = [list(tok(p).input_ids) for p in prompts]
        plain = {k: v for k, v in kwargs.items() if k not in ("speculate", "draft_model")}
        sampling = self._sampling(len(rows), plain)
        ids, mask = left_pad(rows, sampling.pad_token_id)
        out = self.generate(ids, mask, **kwargs)
        return [
            str(tok.decode(until_eos(row, sampling.eos_token_ids), skip_special_tokens=True))
            for row in out[:, ids.shape[1] :].tolist()
        ]


M = TypeVar("M", bound=DistributedModel)


def _from_pretrained(
    cls: type[M],
    model: str,
    initial_peers: Sequence[str] | str,
    dtype: torch.dtype,
    device: str,
    model_args: dict[str, Any],
    config: dict[str, Any],
) -> M:
    peers = [initial_peers] if isinstance(initial_peers, str) else list(initial_peers)
    key = config.get("swarm_key")
    if key is not None and not isinstance(key, SwarmKey):
        config["swarm_key"] = SwarmKey.load(key)
    client_config = dataclasses.replace(
        ClientConfig(initial_peers=tuple(parse_initial_peers(peers))), **config
    )
    loop = LoopThread()
    try:
        remote = loop.run(RemoteModel.load(model, client_config, dtype=dtype, device=device))
        if remote.head.device.type != "cpu":
            one_host_thread(loop)
        try:
            return cls(remote, loop, **model_args)
        except BaseException:
            loop.run(remote.aclose())
            raise
    except BaseException:
        loop.close()
        raise


_FACTORY_DOC = """Load the tokenizer and head of `model` locally and join the swarm at `initial_peers`.

        `dtype` and `device` are those of the local embeddings and LM head (e.g. "cuda").
        `tuning_mode="ptune" | "deep_ptune"` with `num_prompts=K` adds K trainable virtual
        tokens (deep: and a trainable prefix per block); `tuned_prompts=FILE` loads prompts
        saved by `beectl finetune` or `save_prompts`.

        Extra keyword arguments set ClientConfig fields (e.g. `step_timeout_s=30`);
        `swarm_key` may be the path of a private swarm's key file.
        """


class AutoDistributedModelForCausalLM:
    """Factory: `AutoDistributedModelForCausalLM.from_pretrained(model, initial_peers=[...])`."""

    @staticmethod
    def from_pretrained(
        model: str,
        initial_peers: Sequence[str] | str,
        *,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        tuning_mode: str | None = None,
        num_prompts: int = 0,
        tuned_prompts: Any = None,
        **config: Any,
    ) -> DistributedModelForCausalLM:
        tuning = {"tuning_mode": tuning_mode, "num_prompts": num_prompts}
        tuning["tuned_prompts"] = tuned_prompts
        return _from_pretrained(
            DistributedModelForCausalLM, model, initial_peers, dtype, device, tuning, config
        )

    from_pretrained.__doc__ = _FACTORY_DOC


class AutoDistributedModel:
    """Factory of the bare transformer (`last_hidden_state`, no head)."""

    @staticmethod
    def from_pretrained(
        model: str,
        initial_peers: Sequence[str] | str,
        *,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        tuning_mode: str | None = None,
        num_prompts: int = 0,
        tuned_prompts: Any = None,
        **config: Any,
    ) -> DistributedModel:
        tuning = {"tuning_mode": tuning_mode, "num_prompts": num_prompts}
        tuning["tuned_prompts"] = tuned_prompts
        return _from_pretrained(
            DistributedModel, model, initial_peers, dtype, device, tuning, config
        )

    from_pretrained.__doc__ = _FACTORY_DOC


class AutoDistributedModelForSequenceClassification:
    """Factory of a sequence classifier (`num_labels=`; the head on the client)."""

    @staticmethod
    def from_pretrained(
        model: str,
        initial_peers: Sequence[str] | str,
        *,
        num_labels: int = 2,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        tuning_mode: str | None = None,
        num_prompts: int = 0,
        tuned_prompts: Any = None,
        **config: Any,
    ) -> DistributedModelForSequenceClassification:
        args = {"tuning_mode": tuning_mode, "num_prompts": num_prompts, "num_labels": num_labels}
        args["tuned_prompts"] = tuned_prompts
        return _from_pretrained(
            DistributedModelForSequenceClassification,
            model,
            initial_peers,
            dtype,
            device,
            args,
            config,
        )

    from_pretrained.__doc__ = _FACTORY_DOC


def one_host_thread(loop: LoopThread) -> None:
    """With the head on a GPU, the loop thread's torch work on the host is checks and copies of
    activations: give it a team of one OpenMP thread (beed/server/server.py CUDA_HOST_THREADS
    says why), and leave the caller's threads as they were (libgomp's thread count is per
    thread; torch's setting also sets the default for threads that start later)."""

    async def one() -> None:
        torch.set_num_threads(1)

    keep = torch.get_num_threads()
    loop.run(one())
    torch.set_num_threads(keep)
