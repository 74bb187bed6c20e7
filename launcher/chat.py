"""`launch chat RUN`: talk to the run's model, base + adapter, in the prompt format it was trained
on: one answer for `--prompt` (only the answer on stdout), or a conversation on a terminal with
the tokens streamed as they come.

The format is the run's data.format, read with the runner's own formatters so a prompt is the
text training saw: chat runs use the tokenizer's chat template when it has one (the runner's
built-in `### User:` headers otherwise) and keep the conversation; instruction runs use
data.prompt_template or the runner's default; completion runs continue the text as typed. Using a
chat template on a model tuned in the instruction format would ask in a format it never learned.

The model is loaded 4-bit (the run's quantization) on a CUDA GPU, as it trained; on the CPU in
full precision (float32): bitsandbytes' CPU kernels are slow, and a laptop has no GPU to spare."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import IO, Any, Optional

from launcher.deploy import RunModel, require_packages
from launcher.paths import runner_module

DEFAULT_MAX_NEW_TOKENS = 256


@dataclass(frozen=True)
class Prompt:
    segments: list[Any]  # the runner's Segments: tokenized one by one, as in training
    kind: str  # which format was used, for the user: "chat template", "instruction template", ...

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.segments)


def build_prompt(job: Any, tokenizer: Any, user_text: str, history: list[dict[str, str]]) -> Prompt:
    """The prompt for `user_text` (after `history`, chat runs only) in the run's training format."""
    qr = runner_module()
    data = job.data
    if data.format == "chat":
        messages = [*history, {"role": "user", "content": user_text}]
        if getattr(tokenizer, "chat_template", None):
            # What render_chat takes as the prompt of an assistant turn: the template's generation prompt.
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return Prompt([qr.Segment(text, trained=False)], "chat template")
        # The built-in headers: render a conversation ending in an empty assistant turn, keep its prompt.
        segments = qr.render_chat([*messages, {"role": "assistant", "content": ""}], tokenizer)
        return Prompt([s for s in segments if not s.trained], "chat (### User:/### Assistant: headers)")
    if data.format == "completion":
        return Prompt([qr.Segment(user_text, trained=False)], "completion (the text continued)")
    record = {data.instruction_field: user_text, data.output_field: "-"}  # the output is not part of the prompt
    (example,) = qr.format_records([record], data, tokenizer, "prompt")
    kind = "instruction template (data.prompt_template)" if data.prompt_template else "instruction template"
    return Prompt(example.prompt, kind)


def load(model: RunModel, log: Any) -> tuple[Any, Any]:
    """(model with the adapter, tokenizer): 4-bit on a CUDA GPU, float32 on the CPU."""
    require_packages()
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"revision": model.revision, "trust_remote_code": model.trust_remote_code}
    if torch.cuda.is_available():
        dtype = torch.bfloat16 if torch.cuda.get_device_capability(0)[0] >= 8 else torch.float16  # a T4: fp16
        kwargs.update(dtype=dtype, device_map={"": 0})
        if model.job.model.quantization != "none":
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type=model.job.model.quantization,
                bnb_4bit_use_double_quant=model.job.model.double_quant, bnb_4bit_compute_dtype=dtype)
        where = f"{torch.cuda.get_device_name(0)}, {model.job.model.quantization}"
    else:
        kwargs.update(dtype=torch.float32, device_map={"": "cpu"})
        where = "the CPU, float32"
    log(f"loading {model.base} + the adapter of run {model.run_id} on {where}")
    try:
        base = AutoModelForCausalLM.from_pretrained(model.base, **kwargs)
    except Exception as e:  # noqa: BLE001
        from launcher.job import JobError

        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise JobError(f"model.base {model.base}: cannot load it ({type(e).__name__}: {first})", 5) from None
    tokenizer = AutoTokenizer.from_pretrained(str(model.adapter))  # the tokenizer the run trained with
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    peft_model = PeftModel.from_pretrained(base, str(model.adapter))
    peft_model.eval()
    return peft_model, tokenizer


def answer(peft_model: Any, tokenizer: Any, prompt: Prompt, max_new_tokens: int, stream: Optional[IO[str]]) -> str:
    """Greedy generation (the same prompt, the same answer: scriptable) of the answer to
    `prompt`, written to `stream` token by token as it comes; the answer's text."""
    import torch

    qr = runner_module()
    ids, _ = qr.encode_segments(tokenizer, prompt.segments, qr.adds_bos(tokenizer))
    device = next(p.device for p in peft_model.parameters())
    inputs = torch.tensor([ids], device=device)
    streamer = _StreamTo(tokenizer, stream) if stream is not None else None
    with torch.no_grad():
        out = peft_model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs),
                                  max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer,
                                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip()


def _StreamTo(tokenizer: Any, stream: IO[str]) -> Any:
    """transformers' TextStreamer, writing to `stream` instead of print()."""
    from transformers import TextStreamer

    class StreamTo(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            stream.write(text + ("\n" if stream_end else ""))
            stream.flush()

    return StreamTo(tokenizer, skip_prompt=True, skip_special_tokens=True)


def converse(peft_model: Any, tokenizer: Any, model: RunModel, max_new_tokens: int,
             stdin: IO[str] = sys.stdin, stdout: IO[str] = sys.stdout, stderr: IO[str] = sys.stderr) -> None:
    """A conversation until an empty line, EOF or Ctrl-D; a chat run keeps the history."""
    history: list[dict[str, str]] = []
    keeps_history = model.job.data.format == "chat"
    stderr.write("an empty line ends the chat" + ("" if keeps_history else
                 f" (each question stands alone: run {model.run_id} trained on single {model.job.data.format} "
                 "examples)") + "\n")
    while True:
        stderr.write("you> ")
        stderr.flush()
        line = stdin.readline()
        if not line.strip():
            return
        prompt = build_prompt(model.job, tokenizer, line.strip(), history)
        stdout.write("model> ")
        text = answer(peft_model, tokenizer, prompt, max_new_tokens, stdout)
        if keeps_history:
            history += [{"role": "user", "content": line.strip()}, {"role": "assistant", "content": text}]
