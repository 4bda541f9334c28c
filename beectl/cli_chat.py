"""`beectl chat`: a multi-turn chat in the terminal, its past kept cached on the servers."""

from __future__ import annotations

import sys
from typing import Any

import click

from beectl.cli_options import DEFAULT_MODEL, peers_option, quant_option, verify_option
from beed.net.swarm_key import SwarmKey, swarm_key_option
from protocol.errors import BeeError

HELP = "/reset starts over, /exit (or Ctrl-D) quits, Ctrl-C stops an answer."


class Conversation:
    """The messages so far and the session that holds their keys and values on the servers."""

    def __init__(self, model: Any, system: str | None, max_length: int) -> None:
        self.model = model
        self.tokenizer: Any = model.tokenizer
        self.system = system
        self.max_length = max_length
        self.messages: list[dict[str, str]] = []
        self.session: Any = None
        self.reset()

    def reset(self) -> None:
        self.close()
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None

    def _ids(self, messages: list[dict[str, str]]) -> Any:
        return self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]

    def reply(self, text: str, streamer: Any, **sampling: Any) -> tuple[str, int, int]:
        """Answer `text`, streaming it; (the answer, tokens reused from the cache, tokens sent).
        The whole conversation is re-rendered with the chat template; what the session holds
        already is a prefix of it, and only the rest goes to the servers."""
        messages = [*self.messages, {"role": "user", "content": text}]
        ids = self._ids(messages)
        new_tokens = int(sampling["max_new_tokens"])
        if ids.shape[1] + new_tokens > self.max_length:
            raise click.ClickException(
                f"the conversation ({ids.shape[1]} tokens) would pass --max-length "
                f"{self.max_length}; /reset to start over"
            )
        cached = self.session.cached_ids if self.session is not None else None
        if cached is not None and not (
            cached.shape[1] <= ids.shape[1] and bool((ids[:, : cached.shape[1]] == cached).all())
        ):
            self.close()  # the template renders the past differently: start a fresh session
            cached = None
        if self.session is None:
            self.session = self.model.inference_session(max_length=self.max_length)
            self.session.__enter__()
        reused = 0 if cached is None else int(cached.shape[1])
        try:
            out = self.model.generate(ids, session=self.session, streamer=streamer, **sampling)
        except BaseException:
            self.close()  # cut mid-step: its cache is not a known prefix any more
            raise
        new = out[0, ids.shape[1] :].tolist()
        eos = self.tokenizer.eos_token_id
        if eos in new:
            new = new[: new.index(eos)]
        answer = str(self.tokenizer.decode(new, skip_special_tokens=True))
        self.messages = [*messages, {"role": "assistant", "content": answer}]
        return answer, reused, int(ids.shape[1]) - reused


class _Printer:
    """Streams the new text of an answer to stdout (whole characters only)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.prompt = True
        self.ids: list[int] = []
        self.printed = 0

    def put(self, ids: Any) -> None:
        if self.prompt:  # the first put is the prompt
            self.prompt = False
            return
        self.ids += [int(i) for i in ids.reshape(-1).tolist()]
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        sys.stdout.write(text[self.printed :])
        sys.stdout.flush()
        self.printed = len(text)

    def end(self) -> None:
        sys.stdout.write("\n")
        sys.stdout.flush()


@click.command()
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Model name or path.")
@click.option("--system", default=None, help="A system message that starts the conversation.")
@click.option(
    "--max-new-tokens", type=click.IntRange(1), default=256, show_default=True, help="Per answer."
)
@click.option(
    "--max-length",
    type=click.IntRange(16),
    default=2048,
    show_default=True,
    help="Tokens the conversation may reach (the session's cache size on each server).",
)
@click.option(
    "--temperature",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Sample with this temperature (default: greedy).",
)
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=None)
@click.option("--seed", type=int, default=None, help="Seed for sampling (implies sampling).")
@click.option(
    "--verbose", is_flag=True, help="After each answer, print the tokens reused and sent."
)
@peers_option
@swarm_key_option
@verify_option
@quant_option
def chat(
    model: str,
    system: str | None,
    max_new_tokens: int,
    max_length: int,
    temperature: float | None,
    top_p: float | None,
    seed: int | None,
    verbose: bool,
    initial_peers: list[tuple[str, int]],
    swarm_key: SwarmKey | None,
    verify_rate: float,
    allow_quant: bool,
) -> None:
    """Chat with the model in this terminal: each turn streams, the past stays cached."""
    if not initial_peers:
        raise click.UsageError(
            "no --initial-peers given: pass the address printed by `beed bootstrap`"
        )
    from beectl import AutoDistributedModelForCausalLM

    sampling: dict[str, Any] = {"max_new_tokens": max_new_tokens}
    if temperature is not None or top_p is not None or seed is not None:
        sampling.update(do_sample=True, temperature=temperature, top_p=top_p, seed=seed)
    try:
        distributed = AutoDistributedModelForCausalLM.from_pretrained(
            model,
            initial_peers=[f"{h}:{p}" for h, p in initial_peers],
            swarm_key=swarm_key,
            verify_rate=verify_rate,
            allow_quant=allow_quant,
        )
    except BeeError as exc:
        raise click.ClickException(str(exc)) from None
    conversation = Conversation(distributed, system, max_length)
    click.echo(f"beectl chat with {model}. {HELP}")
    try:
        while True:
            try:
                line = input("you> ")
            except EOFError:
                click.echo()
                break
            except KeyboardInterrupt:
                click.echo()
                continue
            text = line.strip()
            if not text:
                continue
            if text == "/exit":
                break
            if text == "/reset":
                conversation.reset()
                click.echo("(conversation reset)")
                continue
            if text.startswith("/"):
                click.echo(f"unknown command {text.split()[0]}; {HELP}")
                continue
            sys.stdout.write("bot> ")
            sys.stdout.flush()
            printer = _Printer(distributed.tokenizer)
            try:
                _, reused, sent = conversation.reply(text, printer, **sampling)
            except KeyboardInterrupt:
                click.echo("\n(answer stopped)")
                continue
            except BeeError as exc:
                click.echo(f"\nerror: {exc}")
                continue
            if verbose:
                click.echo(f"(reused {reused} cached tokens, sent {sent})")
    finally:
        conversation.close()
        distributed.close()
