"""One small training loop for MNTP, SimCSE and supervised contrastive LoRA training.

Per optimizer step: the global batch (`batch_size` examples, in a per-epoch order drawn from the seed) is split into
`grad_accum` micro-batches, each shared out between the processes; every micro-batch's loss share is
back-propagated, gradients are summed across processes, clipped, and AdamW steps with a warmup + linear-decay
learning rate. Randomness (dropout, MNTP masking, data order) is derived from (seed, step or example), not from a
running generator, so a run resumed from a checkpoint continues exactly as the uninterrupted run would have.

Outputs: checkpoints in `<out>-checkpoints/step-NNNNNN/` (trained tensors, optimizer state, history; safetensors and
JSON only), and at the end the adapter folder `<out>` (peft's `adapter_config.json` + `adapter_model.safetensors`,
the pooling head and config for contrastive objectives, `training_args.json`, `training_summary.json`), each
written to a temporary sibling and renamed into place.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..atomic import atomic_directory, check_destination
from ..configuration_llama_encoder import POOLING_MODES
from ..conversion_scripts.lora import POOLING_CONFIG_NAME, POOLING_HEAD_NAME
from ..encoding.encode import Encoder
from ..encoding.evaluate import evaluate_sts, read_sts
from .data import ScoredPair, read_supervised, read_texts
from .distributed import Distributed
from .model import DEFAULT_TARGET_MODULES, TrainingModel, load_training_model, resolve_mask_token
from .objectives import MNTP, SimCSE, Supervised, derive_seed

logger = logging.getLogger(__name__)

OBJECTIVES = ("mntp", "simcse", "supervised")
DEFAULT_TEMPERATURE = {"simcse": 0.05, "supervised": 0.02}
SUMMARY_NAME = "training_summary.json"
ARGS_NAME = "training_args.json"
_CHECKPOINT_PREFIX = "step-"
# Arguments that may change between an interrupted run and its resumption without changing the result.
# Gradient checkpointing recomputes the same arithmetic: a run that ran out of memory can resume with it.
_RESUMABLE_CHANGES = ("resume", "overwrite", "threads", "save_every", "eval_every", "eval_sts", "keep_checkpoints",
                      "log_every", "show_progress", "command", "gradient_checkpointing")


@dataclass
class TrainingArguments:
    """Everything that defines a training run (the CLI's options). `temperature` defaults per objective."""

    objective: str
    out: str
    data: list[str]
    base: str | None = None
    gguf: str | None = None
    adapters: list[str] = field(default_factory=list)
    max_steps: int | None = None
    epochs: float = 1.0
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 2e-4
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 128
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    pooling: str = "mean"
    bf16: bool = False
    gradient_checkpointing: bool = False
    attn_implementation: str = "auto"
    group_by_length: bool = False
    seed: int = 42
    device: str | None = None
    threads: int | None = None
    save_every: int = 0
    keep_checkpoints: int = 2
    eval_sts: str | None = None
    eval_every: int = 0
    log_every: int = 10
    resume: bool = False
    overwrite: bool = False
    show_progress: bool | None = None
    cache_dir: str | None = None
    command: str | None = None
    # MNTP
    mask_probability: float = 0.2
    mask_token: str | None = None
    # SimCSE and supervised
    attention_dropout: float = 0.0
    temperature: float | None = None
    # supervised
    loss: str = "auto"
    data_format: str = "auto"
    positive_threshold: float | None = None
    instruction: str | None = None
    cosent_scale: float = 20.0

    def validate(self) -> None:
        """Refuse impossible settings before any work, naming the option to change."""
        checks = [
            (self.objective in OBJECTIVES, f"objective must be one of {', '.join(OBJECTIVES)}"),
            (bool(self.data), "give at least one --data file"),
            (self.max_steps is None or self.max_steps >= 1, "--max-steps must be at least 1"),
            (self.epochs > 0, "--epochs must be positive"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "--batch-size and --grad-accum must be at least 1"),
            (self.lr > 0, "--lr must be positive"),
            (0 <= self.warmup_ratio < 1, "--warmup-ratio must be in [0, 1)"),
            (self.max_length >= 4, "--max-length must be at least 4"),
            (self.lora_r >= 1, "--lora-r must be at least 1"),
            (0 <= self.lora_dropout < 1 and 0 <= self.attention_dropout < 1, "dropouts must be in [0, 1)"),
            (0 < self.mask_probability < 1, "--mask-probability must be in (0, 1)"),
            (self.pooling in POOLING_MODES, f"--pooling must be one of {', '.join(POOLING_MODES)}"),
            (self.temperature is None or self.temperature > 0, "--temperature must be positive"),
            (self.loss in ("auto", "infonce", "cosent"), "--loss must be auto, infonce or cosent"),
            (self.save_every >= 0 and self.eval_every >= 0, "--save-every and --eval-every must be >= 0"),
            (self.keep_checkpoints >= 1, "--keep-checkpoints must be at least 1"),
            (not (self.base and self.gguf), "give --base or --gguf, not both"),
            (self.attn_implementation in ("auto", "eager", "sdpa", "flex_attention", "flash_attention_2"),
             "--attn-implementation must be auto, eager, sdpa, flex_attention or flash_attention_2"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"Invalid training arguments: {message}.")

    @property
    def checkpoint_dir(self) -> Path:
        out = Path(self.out).expanduser().absolute()
        return out.with_name(f"{out.name}-checkpoints")


def learning_rate(step: int, *, peak: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup to `peak` over `warmup_steps`, then linear decay to 0 at `total_steps` (step counts from 0)."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    return peak * max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def epoch_order(num_examples: int, seed: int, epoch: int, *, lengths: list[int] | None = None,
                batch_size: int = 1, pool: int = 32) -> list[int]:
    """The order examples are visited in during `epoch`: a permutation drawn from (seed, epoch).

    With `lengths`, batches are of similar length, which saves the padding: each run of `pool` batches of the
    shuffled order is sorted by length and cut into batches, and the batches are shuffled (an incomplete last
    batch stays last, where the loop drops it)."""
    rng = np.random.default_rng(derive_seed(seed, epoch))
    order = rng.permutation(num_examples).tolist()
    if lengths is None or batch_size <= 1:
        return order
    usable = num_examples - num_examples % batch_size
    batches = []
    for start in range(0, usable, batch_size * pool):
        chunk = sorted(order[start : min(start + batch_size * pool, usable)], key=lambda i: lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    shuffled = [batches[i] for i in rng.permutation(len(batches))]
    return [index for batch in shuffled for index in batch] + order[usable:]


def _example_length(example) -> int:
    """A cheap length for grouping: characters of the texts that share one padded batch row width."""
    if isinstance(example, str):
        return len(example)
    if isinstance(example, ScoredPair):
        return max(len(example.text1), len(example.text2))
    return max(len(example.query) + len(example.instruction or ""), len(example.positive),
               *(len(n) for n in example.negatives))


# ---- checkpoints -----------------------------------------------------------------------------------------------


def _checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints in `folder`, oldest first (temporary folders from an interrupted write are skipped)."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(_CHECKPOINT_PREFIX)
             and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(_CHECKPOINT_PREFIX):]))


def save_checkpoint(folder: Path, step: int, model: TrainingModel, optimizer: torch.optim.Optimizer,
                    state: dict, keep: int) -> Path:
    """Write checkpoint `step` atomically (trained tensors, optimizer state, `state`), then prune old ones."""
    dest = folder / f"{_CHECKPOINT_PREFIX}{step:06d}"
    optimizer_state = optimizer.state_dict()
    tensors = {f"{index}.{key}": value for index, entry in optimizer_state["state"].items()
               for key, value in entry.items() if isinstance(value, torch.Tensor)}
    trained_bytes = sum(p.numel() * p.element_size() for _, p in model.trainable_parameters())
    with atomic_directory(dest, overwrite=True, needed_bytes=3 * trained_bytes) as tmp:  # + AdamW's two moments
        save_file({name: p.detach().cpu().contiguous() for name, p in model.trainable_parameters()},
                  tmp / "trainable.safetensors")
        save_file({k: v.cpu().contiguous() for k, v in tensors.items()}, tmp / "optimizer.safetensors")
        (tmp / "state.json").write_text(json.dumps({**state, "step": step,
                                                      "param_groups": optimizer_state["param_groups"]}, indent=1))
    for old in _checkpoints(folder)[:-keep]:
        doomed = old.with_name(f".tmp-{old.name}-old")  # renamed first: a kill mid-delete leaves no partial step
        os.rename(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    return dest


def load_checkpoint(path: Path, model: TrainingModel, optimizer: torch.optim.Optimizer) -> dict:
    """Restore trained tensors and optimizer state from checkpoint folder `path`; returns its state dict."""
    state = json.loads((path / "state.json").read_text())
    trained = load_file(path / "trainable.safetensors")
    params = dict(model.trainable_parameters())
    if set(trained) != set(params):
        raise ValueError(f"Checkpoint {path} holds other trained tensors than this run trains; resume with the "
                         "same arguments as the interrupted run.")
    with torch.no_grad():
        for name, value in trained.items():
            params[name].copy_(value)
    flat = load_file(path / "optimizer.safetensors")
    entries: dict[int, dict] = {}
    for key, value in flat.items():
        index, name = key.split(".", 1)
        entries.setdefault(int(index), {})[name] = value
    groups = [{**group, "betas": tuple(group["betas"])} if "betas" in group else group
              for group in state["param_groups"]]
    optimizer.load_state_dict({"state": entries, "param_groups": groups})
    return state


# ---- the loop --------------------------------------------------------------------------------------------------


def _attention_backend(name: str, device: str) -> str:
    # On CPU, sdpa's fused backward is slow for short bf16 rows: eager trained SmolLM2 1.4x faster (32 x 13 tokens).
    if name == "auto":
        return "sdpa" if device.startswith("cuda") else "eager"
    return name


def _objective(args: TrainingArguments, model: TrainingModel):
    append_eos = model.encoder.config.pooling_mode == "eos"
    if args.objective == "mntp":
        return MNTP(tokenizer=model.tokenizer, lm_head=model.lm_head, max_length=args.max_length,
                    mask_token_id=resolve_mask_token(model.tokenizer, args.mask_token),
                    probability=args.mask_probability, seed=args.seed)
    temperature = args.temperature or DEFAULT_TEMPERATURE[args.objective]
    if args.objective == "simcse":
        return SimCSE(tokenizer=model.tokenizer, max_length=args.max_length, temperature=temperature,
                      append_eos=append_eos)
    return Supervised(tokenizer=model.tokenizer, max_length=args.max_length,
                      instruction_template=model.encoder.config.instruction_template,
                      default_instruction=args.instruction, temperature=temperature,
                      cosent_scale=args.cosent_scale, append_eos=append_eos)


def _read_examples(args: TrainingArguments) -> list:
    if args.objective in ("mntp", "simcse"):
        return read_texts(args.data)
    data = read_supervised(args.data, data_format=args.data_format, positive_threshold=args.positive_threshold)
    if args.loss == "cosent" and not data.pairs:
        raise ValueError("--loss cosent needs scored pairs (STS-style data with a score per pair); the data holds "
                         "query/positive triples, so use --loss infonce.")
    if args.loss == "infonce" and data.pairs:
        raise ValueError("--loss infonce needs query/positive triples; the data holds scored pairs. Pass "
                         "--positive-threshold (e.g. 4.0) to keep the pairs scored at or above it as positives, or "
                         "use --loss cosent.")
    return data.pairs or data.triples


def _check_resumable(saved: dict, args: TrainingArguments, checkpoint: Path) -> None:
    current = asdict(args)
    changed = sorted(key for key in current if key not in _RESUMABLE_CHANGES and saved.get(key) != current[key])
    if changed:
        details = "; ".join(f"{key}: {saved.get(key)!r} -> {current[key]!r}" for key in changed[:5])
        raise ValueError(f"Cannot resume from {checkpoint}: these arguments differ from the interrupted run "
                         f"({details}). Resume with the same arguments, or pass --overwrite to start over.")


def _prepare_output(args: TrainingArguments, dist: Distributed) -> Path | None:
    """Check the output and checkpoint folders; returns the checkpoint to resume from, if any."""
    check_destination(args.out, overwrite=args.overwrite)
    folder = args.checkpoint_dir
    found = _checkpoints(folder)
    if args.resume:
        if dist.is_main and folder.is_dir():  # checkpoints whose writing was interrupted
            for leftover in folder.glob(".tmp-*"):
                shutil.rmtree(leftover, ignore_errors=True)
        if not found:
            logger.warning("--resume: no checkpoint in %s; starting from step 0.", folder)
        return found[-1] if found else None
    if found and not args.overwrite:
        raise FileExistsError(f"{folder} holds checkpoints of an earlier run ({found[-1].name}). Pass --resume to "
                              "continue it, or --overwrite to start over.")
    if found and dist.is_main:
        shutil.rmtree(folder)
    return None


def _evaluate(model: TrainingModel, pairs: list, args: TrainingArguments, device: str) -> dict:
    encoder = Encoder(model.encoder, model.tokenizer, max_seq_length=args.max_length, name_or_path="training")
    with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=args.bf16):
        result = evaluate_sts(encoder, pairs, show_progress=False)
    model.peft_model.train()
    return {"spearman": 100 * result["spearman"], "pearson": 100 * result["pearson"]}


def _write_adapter(args: TrainingArguments, model: TrainingModel, summary: dict) -> Path:
    out = Path(args.out).expanduser().absolute()
    needed = sum(p.numel() * 4 for _, p in model.trainable_parameters())
    with atomic_directory(out, overwrite=args.overwrite or args.resume, needed_bytes=needed) as tmp:
        model.peft_model.save_pretrained(tmp)
        (tmp / "README.md").unlink(missing_ok=True)  # peft's placeholder card; the checkpoint gets a real one
        config = model.encoder.config
        if args.objective != "mntp":
            pooling = {"pooling_mode": config.pooling_mode}
            if config.pooling_mode == "latent_attention":
                head = {f"latent_attention.{k}": v.detach().float().cpu().contiguous()
                        for k, v in model.encoder.latent_attention.state_dict().items()}
                save_file(head, tmp / POOLING_HEAD_NAME)
                pooling.update({k: getattr(config, k) for k in (
                    "latent_attention_num_latents", "latent_attention_num_heads", "latent_attention_head_dim",
                    "latent_attention_mlp_dim")})
            (tmp / POOLING_CONFIG_NAME).write_text(json.dumps(pooling, indent=2) + "\n")
        (tmp / ARGS_NAME).write_text(json.dumps(asdict(args), indent=2) + "\n")
        (tmp / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
    return out


def train(args: TrainingArguments) -> dict:
    """Run one training job and write the adapter folder `args.out`; returns the training summary.

    Raises `ValueError`/`FileNotFoundError`/`FileExistsError` for bad arguments, data or outputs before any
    training starts."""
    args.validate()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dist = Distributed.from_environment(device)
    device = dist.device if dist.enabled else device
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    per_step = args.grad_accum * dist.world_size
    if args.batch_size % per_step:
        raise ValueError(f"--batch-size {args.batch_size} must divide evenly into --grad-accum {args.grad_accum} x "
                         f"{dist.world_size} process(es); use a multiple of {per_step}.")
    micro = args.batch_size // per_step
    examples = _read_examples(args)
    steps_per_epoch = len(examples) // args.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"The data holds {len(examples)} examples, fewer than one batch of {args.batch_size}; "
                         "lower --batch-size or add data.")
    eval_pairs = read_sts(args.eval_sts) if args.eval_sts else None
    resume_from = _prepare_output(args, dist)
    dist.barrier()

    model = load_training_model(
        base=args.base, gguf=args.gguf, adapters=args.adapters, pooling=args.pooling,
        with_lm_head=args.objective == "mntp", lora_r=args.lora_r, lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout, target_modules=tuple(args.target_modules),
        attention_dropout=args.attention_dropout, dtype=torch.bfloat16 if args.bf16 else torch.float32,
        device=device, gradient_checkpointing=args.gradient_checkpointing, cache_dir=args.cache_dir,
        attn_implementation=_attention_backend(args.attn_implementation, device),
        init_seed=args.seed,
    )
    objective = _objective(args, model)
    params = [p for _, p in model.trainable_parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    total_steps = args.max_steps or max(1, math.ceil(args.epochs * steps_per_epoch))
    warmup_steps = int(args.warmup_ratio * total_steps)

    start_step, history, tokens_seen, train_seconds, evaluations = 0, [], 0, 0.0, []
    if resume_from is not None:
        state = load_checkpoint(resume_from, model, optimizer)
        _check_resumable(state["training_args"], args, resume_from)
        start_step, history = state["step"], state["history"]
        tokens_seen, train_seconds, evaluations = state["tokens"], state["train_seconds"], state["evaluations"]
        logger.info("Resuming from %s (step %d of %d)", resume_from, start_step, total_steps)

    model.peft_model.train()
    autocast = torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=args.bf16)
    show = dist.is_main and (args.show_progress if args.show_progress is not None else True)
    progress = tqdm(total=total_steps, initial=start_step, desc=f"train {args.objective}", disable=not show,
                    unit="step")
    order, order_epoch = None, None
    lengths = [_example_length(example) for example in examples] if args.group_by_length else None
    for step in range(start_step, total_steps):
        started = time.perf_counter()
        epoch, position = divmod(step, steps_per_epoch)
        if order_epoch != epoch:
            order = epoch_order(len(examples), args.seed, epoch, lengths=lengths, batch_size=args.batch_size)
            order_epoch = epoch
        torch.manual_seed(derive_seed(args.seed, dist.rank, step))  # dropout of this step, the same after a resume
        lr = learning_rate(step, peak=args.lr, warmup_steps=warmup_steps, total_steps=total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        step_loss, step_tokens = 0.0, 0
        global_start = position * args.batch_size
        for accumulation in range(args.grad_accum):
            begin = global_start + accumulation * micro * dist.world_size + dist.rank * micro
            ids = order[begin : begin + micro]
            batch = objective.collate([examples[i] for i in ids], ids, epoch)
            with autocast:
                share, tokens = objective.loss(model.encoder, batch, dist)
            (share / args.grad_accum).backward()
            step_loss += float(share.detach()) / args.grad_accum
            step_tokens += tokens
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        dist.sum_tensors(grads)
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm))
        optimizer.step()
        step_tokens = dist.sum_int(step_tokens)
        if dist.enabled:
            loss_tensor = torch.tensor([step_loss], device=dist.device)
            torch.distributed.all_reduce(loss_tensor)
            step_loss = float(loss_tensor)
        elapsed = time.perf_counter() - started
        tokens_seen += step_tokens
        train_seconds += elapsed
        history.append({"step": step + 1, "loss": step_loss, "lr": lr, "grad_norm": grad_norm,
                        "tokens": step_tokens, "seconds": round(elapsed, 4)})
        progress.update(1)
        progress.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tokens_seen / max(train_seconds, 1e-9):.0f}")
        if args.log_every and (step + 1) % args.log_every == 0:
            logger.info("step %d/%d loss %.4f lr %.2e %.0f tok/s", step + 1, total_steps, step_loss, lr,
                        tokens_seen / max(train_seconds, 1e-9))
        done = step + 1 == total_steps
        eval_now = done or (args.eval_every and (step + 1) % args.eval_every == 0)
        if eval_pairs is not None and dist.is_main and eval_now:
            result = {"step": step + 1, **_evaluate(model, eval_pairs, args, device)}
            evaluations.append(result)
            logger.info("step %d: STS Spearman %.2f, Pearson %.2f", step + 1, result["spearman"], result["pearson"])
        if args.save_every and (step + 1) % args.save_every == 0 and not done:
            if dist.is_main:
                state = {"history": history, "tokens": tokens_seen, "train_seconds": train_seconds,
                         "evaluations": evaluations, "training_args": asdict(args)}
                save_checkpoint(args.checkpoint_dir, step + 1, model, optimizer, state, args.keep_checkpoints)
            dist.barrier()
    progress.close()

    last = history[-10:]
    summary = {
        "objective": args.objective,
        "steps": total_steps,
        "examples": len(examples),
        "batch_size": args.batch_size,
        "tokens": tokens_seen,
        "wall_seconds": round(train_seconds, 2),
        "tokens_per_second": round(tokens_seen / max(train_seconds, 1e-9), 1),
        "final_loss": sum(h["loss"] for h in last) / max(1, len(last)),
        "evaluations": evaluations,
        "base": model.base.name,
        "merged_adapters": model.merged_adapters,
        "world_size": dist.world_size,
        "device": device,
        "threads": torch.get_num_threads(),
        "bf16": args.bf16,
        "command": args.command or " ".join(sys.argv),
        "history": history,
    }
    if dist.is_main:
        _write_adapter(args, model, summary)
        logger.info("Wrote adapter %s (%d steps, %.0f tok/s)", args.out, total_steps, summary["tokens_per_second"])
    dist.barrier()
    dist.close()
    return summary


__all__ = ["OBJECTIVES", "TrainingArguments", "epoch_order", "learning_rate", "load_checkpoint", "save_checkpoint",
           "train"]
