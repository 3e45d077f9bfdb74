"""ERL launched as a user would, in one process or several: a plain script, no rlnlp launch code.

    python tests/erl_ranks.py OUT                                              # one process
    torchrun --standalone --nproc_per_node 2 tests/erl_ranks.py OUT            # two CPU processes (gloo)

Both train the real policy (LoRA, SGD so that an update is proportional to its gradient) for two steps on the
same global batch of 3 json_key prompts × 4 completions: 12 rows in one process, 6 per process in two, so the
middle prompt's group is split between the processes. ``--scripted`` replaces the three samplers (y1, Δ, y2) by
texts chosen from each row's place in the global batch and its prompt, so that both launches see the same rows and
their updates can be compared; the rewards, feedback, gate, memory, advantages and loss are the real code.
Writes OUT/rank<k>.json (memory, examples, steps) on every process and OUT/weights.pt (the LoRA weights before
and after each step) on process 0.
"""
import json
import os
import re
import sys
import zlib
from pathlib import Path

import torch
from peft import LoraConfig
from transformers import TrainerCallback

import rlnlp.erl.trainer as erl_trainer
from rlnlp.envs import feedback_tasks as ft
from rlnlp.erl import ERLConfig, ERLTrainer
from rlnlp.models import load_policy
from rlnlp.sampling import Samples

GLOBAL_ROWS = 12  # 3 prompts × 4 completions


def answers(spec: dict) -> list[str]:
    """Three answers to a json_key prompt: right (reward 1), wrong key (0.5), no JSON (0)."""
    return [json.dumps({spec["key"]: spec["value"]}), json.dumps({"name": spec["value"]}),
            f"The {spec['key']} is {spec['value']}."]


def scripted(trainer):
    """Deterministic y1 (by global row and step), Δ and y2 (by prompt text) in place of sampling."""
    tok = trainer.processing_class
    eos = tok.eos_token_id

    def y1(prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        rank, step = trainer.accelerator.process_index, trainer.state.global_step
        out = []
        for i, ids in enumerate(prompt_ids):
            key, value = re.search(r'key \\?"(\w+)\\?" has the value \\?"([^"\\]+)', tok.decode(ids)).groups()
            row = rank * len(prompt_ids) + i  # the row's place in the global batch
            pick = zlib.crc32(f"{row}:{step}".encode()) % 3  # irregular: the two processes' rows score differently
            out.append(tok(answers({"key": key, "value": value})[pick], add_special_tokens=False)["input_ids"] + [eos])
        return out, None

    def later(model, tokenizer, texts, n=1, max_new_tokens=16, **kw):
        completions = []
        for text in texts:
            h = zlib.crc32(text.encode())
            if "say what to change" in text:  # a reflection
                completions.append(["Use the exact key.", "Output braces and quotes.", "Answer in JSON only."][h % 3])
            else:  # a retry: right or wrong, by the prompt (which holds the reflection)
                key, value = re.search(r'key "(\w+)" has the value "([^"]+)"', text).groups()
                completions.append(answers({"key": key, "value": value})[h % 2 * 2])
        p_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        c_ids = [tokenizer(c, add_special_tokens=False)["input_ids"][: max_new_tokens - 1] + [eos] for c in completions]
        P, C = max(map(len, p_ids)), max(map(len, c_ids))
        left = lambda s, w, v: [v] * (w - len(s)) + s
        right = lambda s, w, v: s + [v] * (w - len(s))
        return Samples(prompts=list(texts), prompt_texts=list(texts), prompt_index=torch.arange(len(texts)),
                       prompt_ids=torch.tensor([left(p, P, tok.pad_token_id) for p in p_ids]),
                       prompt_mask=torch.tensor([left([1] * len(p), P, 0) for p in p_ids]),
                       completion_ids=torch.tensor([right(c, C, tok.pad_token_id) for c in c_ids]),
                       completion_mask=torch.tensor([right([1] * len(c), C, 0) for c in c_ids]),
                       logprobs=torch.zeros(len(texts), C), texts=[tok.decode(c[:-1]) for c in c_ids],
                       stopped=[True] * len(texts))

    trainer._generate_single_turn = y1
    erl_trainer.sample = later


class Record(TrainerCallback):
    """The trainable weights at the start and after each step (process 0 writes them)."""

    def __init__(self, trainer, out: Path):
        self.trainer, self.out, self.weights = trainer, out, []

    def _snapshot(self):
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        self.weights.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})

    def on_train_begin(self, args, state, control, **kw):
        self._snapshot()

    def on_step_end(self, args, state, control, **kw):
        self._snapshot()
        if self.trainer.accelerator.is_main_process:
            torch.save(self.weights, self.out / "weights.pt")


def main(out: Path, script: bool):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    out.mkdir(parents=True, exist_ok=True)
    model, tok = load_policy(device="cpu", dtype=torch.float32)
    config = ERLConfig(output_dir=str(out / "run"), use_cpu=True, ddp_backend="gloo", bf16=False, seed=0,
                       per_device_train_batch_size=GLOBAL_ROWS // world, num_generations=4, max_steps=2,
                       max_completion_length=16, reflection_max_new_tokens=12, optim="sgd", learning_rate=0.5,
                       lr_scheduler_type="constant", max_grad_norm=0.0, logging_steps=1, report_to="none",
                       save_strategy="no", reflection_temperature=0.7, memory_top_k=2)
    torch.manual_seed(0)  # the LoRA initialisation: the same in every launch
    trainer = ERLTrainer(model=model, reward_funcs=ft.reward_func, args=config, processing_class=tok,
                         train_dataset=ft.load_split("train", "json_key", limit=GLOBAL_ROWS),
                         feedback_func=ft.feedback_func,
                         peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    if script:
        scripted(trainer)
    trainer.add_callback(Record(trainer, out))
    trainer.train()
    rank = trainer.accelerator.process_index
    (out / f"rank{rank}.json").write_text(json.dumps({
        "world": world, "global_step": trainer.state.global_step, "memory": list(trainer.memory.entries),
        "examples": trainer.examples, "logs": [h for h in trainer.state.log_history if "loss" in h]}, indent=1))


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if len(args) != 1:
        sys.exit("usage: erl_ranks.py OUT [--scripted]")
    main(Path(args[0]), "--scripted" in sys.argv)
