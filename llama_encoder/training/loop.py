"""One small training loop for MNTP, SimCSE and supervised contrastive LoRA training.

Per optimizer step: the global batch (`batch_size` examples, in a per-epoch order drawn from the seed) is split into
`grad_accum` micro-batches, each shared out between the processes; the step's loss terms are counted over all of them
first, so that every micro-batch's share of the step's mean is back-propagated (the token mean of the whole global
batch for MNTP, whatever the accumulation); gradients are summed across processes, clipped, and AdamW steps with a
warmup + linear-decay learning rate. Randomness (dropout, MNTP masking, data order) is derived from (seed, step or
example), not from a running generator, so a run resumed from a checkpoint continues exactly as the uninterrupted run
would have.

Outputs: checkpoints in `<out>-checkpoints/step-NNNNNN/` (trained tensors, optimizer state, history; safetensors and
JSON only), and at the end the adapter folder `<out>` (peft's `adapter_config.json` + `adapter_model.safetensors`,
the pooling head and config for contrastive objectives, `training_args.json`, `training_summary.json`), each
written to a temporary sibling and renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..atomic import atomic_directory, check_destination
from ..dtypes import describe_compute_dtype, resolve_compute_dtype
from ..encoding.encode import Encoder
from ..encoding.evaluate import evaluate_sts
from ..errors import InputError, OutputExistsError
from ..readers import read_sts
from ..weights.lora import POOLING_CONFIG_NAME, POOLING_HEAD_NAME
from .arguments import TrainingArguments, resumable_fields, saved_arguments
from .data import ScoredPair, read_supervised, read_texts
from .distributed import Distributed
from .model import TrainingModel, load_training_model, resolve_mask_token
from .objectives import MNTP, SimCSE, Supervised, derive_seed

logger = logging.getLogger(__name__)

SUMMARY_NAME = "training_summary.json"
ARGS_NAME = "training_args.json"
_CHECKPOINT_PREFIX = "step-"


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
        raise InputError(f"Checkpoint {path} holds other trained tensors than this run trains; resume with the "
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
    if args.objective == "simcse":
        return SimCSE(tokenizer=model.tokenizer, max_length=args.max_length, temperature=args.temperature,
                      append_eos=append_eos)
    return Supervised(tokenizer=model.tokenizer, max_length=args.max_length,
                      instruction_template=model.encoder.config.instruction_template,
                      default_instruction=args.instruction, temperature=args.temperature,
                      cosent_scale=args.cosent_scale, append_eos=append_eos)


def _read_examples(args: TrainingArguments) -> list:
    if args.objective in ("mntp", "simcse"):
        return read_texts(args.data)
    data = read_supervised(args.data, data_format=args.data_format, positive_threshold=args.positive_threshold)
    if args.loss == "cosent" and not data.pairs:
        raise InputError("--loss cosent needs scored pairs (STS-style data with a score per pair); the data holds "
                         "query/positive triples, so use --loss infonce.")
    if args.loss == "infonce" and data.pairs:
        raise InputError("--loss infonce needs query/positive triples; the data holds scored pairs. Pass "
                         "--positive-threshold (e.g. 4.0) to keep the pairs scored at or above it as positives, or "
                         "use --loss cosent.")
    return data.pairs or data.triples


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_resumable(checkpoint: Path, args: TrainingArguments, compute_dtype: torch.dtype) -> None:
    """Refuse to resume from `checkpoint` with arguments that change the result, naming each changed option; read
    from its state.json alone, before any model is built or any tensor loaded. The dtype is compared as computed in
    (`auto` and the dtype it stands for are the same run)."""
    state = json.loads((checkpoint / "state.json").read_text())
    saved = asdict(saved_arguments(state["training_args"]))
    saved_dtype = state.get("compute_dtype") or (saved["dtype"] if saved["dtype"] != "auto" else None)
    current = asdict(args)
    skipped = (*resumable_fields(), "dtype")
    changes = [(key, saved.get(key), current[key]) for key in sorted(current)
               if key not in skipped and saved.get(key) != current[key]]
    if saved_dtype != _dtype_name(compute_dtype):
        changes.append(("dtype", saved_dtype, _dtype_name(compute_dtype)))
    if changes:
        details = "; ".join(f"{key}: {before!r} -> {after!r}" for key, before, after in changes[:5])
        raise InputError(f"Cannot resume from {checkpoint}: these arguments differ from the interrupted run "
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
        raise OutputExistsError(f"{folder} holds checkpoints of an earlier run ({found[-1].name}). Pass --resume to "
                              "continue it, or --overwrite to start over.")
    if found and dist.is_main:
        shutil.rmtree(folder)
    return None


def _autocast(device: str, dtype: torch.dtype):
    """Autocast to `dtype` for half-precision training; float32 needs none."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


def _evaluate(model: TrainingModel, pairs: list, args: TrainingArguments, device: str, dtype: torch.dtype) -> dict:
    encoder = Encoder(model.encoder, model.tokenizer, max_seq_length=args.max_length, name_or_path="training")
    with _autocast(device, dtype):
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
                pooling.update(config.latent_attention_settings())
            (tmp / POOLING_CONFIG_NAME).write_text(json.dumps(pooling, indent=2) + "\n")
        (tmp / ARGS_NAME).write_text(json.dumps(asdict(args), indent=2) + "\n")
        (tmp / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
    return out


def train(args: TrainingArguments) -> dict:
    """Run one training job and write the adapter folder `args.out`; returns the training summary.

    Raises a `LlamaEncoderError` (`InputError`, `MissingInputError`, `OutputExistsError`, `SlowDtypeError`, ...) for
    bad arguments, data or outputs before any training starts. The per-objective defaults are filled in first
    (`TrainingArguments.resolved`): what is trained and recorded is the same whether the run came from Python or
    the command line."""
    args.validate()
    args = args.resolved()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    compute_dtype = resolve_compute_dtype(args.dtype, device, allow_slow_dtype=args.allow_slow_dtype)
    dist = Distributed.from_environment(device)
    device = dist.device if dist.enabled else device
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    per_step = args.grad_accum * dist.world_size
    if args.batch_size % per_step:
        raise InputError(f"--batch-size {args.batch_size} must divide evenly into --grad-accum {args.grad_accum} x "
                         f"{dist.world_size} process(es); use a multiple of {per_step}.")
    micro = args.batch_size // per_step
    examples = _read_examples(args)
    steps_per_epoch = len(examples) // args.batch_size
    if steps_per_epoch == 0:
        raise InputError(f"The data holds {len(examples)} examples, fewer than one batch of {args.batch_size}; "
                         "lower --batch-size or add data.")
    eval_pairs = read_sts(args.eval_sts) if args.eval_sts else None
    resume_from = _prepare_output(args, dist)
    if resume_from is not None:
        _check_resumable(resume_from, args, compute_dtype)
    dist.barrier()
    logger.info("Training in %s (--dtype %s)", describe_compute_dtype(compute_dtype, device), args.dtype)

    model = load_training_model(
        base=args.base, gguf=args.gguf, adapters=args.adapters, pooling=args.pooling,
        with_lm_head=args.objective == "mntp", lora_r=args.lora_r, lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout, target_modules=tuple(args.target_modules),
        attention_dropout=args.attention_dropout, dtype=compute_dtype,
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
        start_step, history = state["step"], state["history"]
        tokens_seen, train_seconds, evaluations = state["tokens"], state["train_seconds"], state["evaluations"]
        logger.info("Resuming from %s (step %d of %d)", resume_from, start_step, total_steps)

    model.peft_model.train()
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
        batches = []
        for accumulation in range(args.grad_accum):
            begin = global_start + accumulation * micro * dist.world_size + dist.rank * micro
            ids = order[begin : begin + micro]
            batches.append(objective.collate([examples[i] for i in ids], ids, epoch))
        # The step's loss is the mean of its terms over every micro-batch and process (MNTP: the masked tokens).
        total = dist.sum_int(sum(objective.count(batch) for batch in batches))
        for batch in batches:
            with _autocast(device, compute_dtype):
                share, tokens = objective.loss(model.encoder, batch, dist, total)
            share.backward()
            step_loss += float(share.detach())
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
            result = {"step": step + 1, **_evaluate(model, eval_pairs, args, device, compute_dtype)}
            evaluations.append(result)
            logger.info("step %d: STS Spearman %.2f, Pearson %.2f", step + 1, result["spearman"], result["pearson"])
        if args.save_every and (step + 1) % args.save_every == 0 and not done:
            if dist.is_main:
                state = {"history": history, "tokens": tokens_seen, "train_seconds": train_seconds,
                         "evaluations": evaluations, "training_args": asdict(args),
                         "compute_dtype": _dtype_name(compute_dtype)}
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
        "dtype": _dtype_name(compute_dtype),
        "dtype_choice": describe_compute_dtype(compute_dtype, device),
        "command": args.command or " ".join(sys.argv),
        "history": history,
    }
    if dist.is_main:
        _write_adapter(args, model, summary)
        logger.info("Wrote adapter %s (%d steps, %.0f tok/s)", args.out, total_steps, summary["tokens_per_second"])
    dist.barrier()
    dist.close()
    return summary


__all__ = ["epoch_order", "learning_rate", "load_checkpoint", "save_checkpoint", "train"]
