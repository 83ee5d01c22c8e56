"""One training step's loss and gradients, as one process or as one of several under torchrun (used by
tests/test_training_ddp.py). Usage: python tests/ddp_worker.py OBJECTIVE BASE_FOLDER OUT_FILE"""

import sys

import torch
from safetensors.torch import save_file

from llama_encoder.training.data import ScoredPair, Triple
from llama_encoder.training.distributed import Distributed
from llama_encoder.training.model import load_training_model
from llama_encoder.training.objectives import MNTP, SimCSE, Supervised

TEXTS = ["The cat sat on the mat.", "A dog ran in the park.", "Plants make sugar from light.", "The cat ran.",
         "A dog sat on the mat in the park.", "Light.", "Sugar from plants is sweet.", "Where is the cat?"]


def examples(objective: str) -> list:
    if objective in ("mntp", "simcse"):
        return TEXTS
    if objective == "infonce":
        return [Triple(TEXTS[i], TEXTS[(i + 1) % 8], (TEXTS[(i + 3) % 8],), "Find it" if i % 2 else None)
                for i in range(8)]
    return [ScoredPair(TEXTS[i], TEXTS[(i + 2) % 8], float(i % 5)) for i in range(8)]


def main() -> None:
    objective_name, base, out = sys.argv[1:4]
    dist = Distributed.from_environment("cpu")
    model = load_training_model(base=base, pooling="latent_attention" if objective_name == "simcse" else "mean",
                                with_lm_head=objective_name == "mntp", lora_dropout=0.0, init_seed=0)
    torch.manual_seed(5)
    with torch.no_grad():  # LoRA B starts at zero, which would leave A without gradient: give it values
        for name, param in model.trainable_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    tokenizer = model.tokenizer
    if objective_name == "mntp":
        objective = MNTP(tokenizer=tokenizer, lm_head=model.lm_head, mask_token_id=3, max_length=32, probability=0.3)
    elif objective_name == "simcse":
        objective = SimCSE(tokenizer=tokenizer, max_length=32)
    else:
        objective = Supervised(tokenizer=tokenizer, max_length=48, instruction_template="Instruct: {instruction}\n")
    data = examples(objective_name)
    share = len(data) // dist.world_size
    ids = list(range(dist.rank * share, (dist.rank + 1) * share))
    batch = objective.collate([data[i] for i in ids], ids, 0)
    loss, _ = objective.loss(model.encoder, batch, dist)
    loss.backward()
    params = model.trainable_parameters()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for _, p in params]
    dist.sum_tensors(grads)
    total = torch.tensor([float(loss.detach())])
    if dist.enabled:
        torch.distributed.all_reduce(total)
    if dist.is_main:
        save_file({"loss": total, **{name: g.contiguous() for (name, _), g in zip(params, grads, strict=True)}}, out)
    dist.close()


if __name__ == "__main__":
    main()
