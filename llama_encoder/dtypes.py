"""The weight dtypes the package accepts by name (`--dtype`, `Encoder.from_pretrained(dtype=...)`)."""

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
