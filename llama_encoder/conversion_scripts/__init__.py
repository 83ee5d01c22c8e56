"""The checkpoint layer and the `convert` entry: write a checkpoint folder, verify it, record its manifest, push it.
The weights it holds come from `llama_encoder.weights`."""
