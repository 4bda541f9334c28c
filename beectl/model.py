"""RemoteModel: a model whose blocks run in the swarm, with the tokenizer and head held locally."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase

from beectl.config import ClientConfig
from beectl.head import LocalHead
from beectl.session import InferenceSession, ModelRef
from beectl.speculative.drafts import DraftModel
from beectl.swarm import Swarm
from beed.models.adapters import load_config, num_blocks
from beed.models.fingerprint import model_fingerprint
from beed.models.registry import cache_dir, resolve_model
from protocol.errors import BadRequestError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalModelFiles:
    """The model as the client sees it on disk."""

    name: str
    path: Path
    fingerprint: str
    num_blocks: int


def load_model_files(model: str) -> LocalModelFiles:
    """Resolve (and on first use convert) the model, and fingerprint it (blocking)."""
    source = resolve_model(model)
    fingerprint = model_fingerprint(source.path, cache_dir() / "fingerprints.json")
    return LocalModelFiles(
        source.name, source.path, fingerprint, num_blocks(load_config(source.path))
    )


class RemoteModel:
    """Tokenizer, embeddings and LM head locally; blocks through sessions in the swarm."""

    def __init__(
        self,
        files: LocalModelFiles,
        head: LocalHead,
        tokenizer: PreTrainedTokenizerBase,
        swarm: Swarm,
        config: ClientConfig,
    ) -> None:
        self.files = files
        self.head = head
        self.tokenizer = tokenizer
        self.swarm = swarm
        self.config = config
        self.ref = ModelRef(files.name, files.fingerprint, files.num_blocks)
        self._drafts: dict[str, DraftModel] = {}
        try:
            self.generation_config = GenerationConfig.from_pretrained(files.path)
        except OSError:
            self.generation_config = GenerationConfig()

    @classmethod
    async def load(
        cls,
        model: str,
        config: ClientConfig,
        *,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
    ) -> RemoteModel:
        """Resolve the model, load the head and tokenizer, and join the swarm."""
        # Model conversion and the head run torch on this (the event loop's) thread, the one that
        # computes logits later: a second thread doing torch work gets its own OpenMP team, and
        # more OpenMP threads than cores make libgomp stop spin-waiting (every op gets slower).
        files = load_model_files(model)
        head = LocalHead(files.path, dtype=dtype, device=device)
        tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, files.path)
        swarm = Swarm(config)
        try:
            await swarm.start()
        except BaseException:
            await swarm.aclose()
            raise
        return cls(files, head, tokenizer, swarm, config)

    def draft_model(self, name: str) -> DraftModel:
        """A local draft model (loaded once) for speculative decoding; it must share the
        model's tokenizer (BadRequestError otherwise)."""
        if name not in self._drafts:
            files = load_model_files(name)
            config = load_config(files.path)
            if int(config.vocab_size) != self.head.vocab_size:
                raise BadRequestError(
                    f"draft model {name} has a vocabulary of {config.vocab_size} tokens, "
                    f"{self.files.name} {self.head.vocab_size}: they must share the tokenizer"
                )
            self._drafts[name] = DraftModel(
                files.path, dtype=self.head.dtype, device=str(self.head.device)
            )
        return self._drafts[name]

    def inference_session(self, *, max_length: int, batch_size: int = 1) -> InferenceSession:
        return InferenceSession(
            self.swarm, self.ref, self.config, max_length=max_length, batch_size=batch_size
        )

    async def aclose(self) -> None:
        await self.swarm.aclose()
