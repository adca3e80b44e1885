"""Where model weights come from besides a hub id or a `from_pretrained` folder: GGUF files
(`gguf.convert_gguf`: converted once to a plain folder every role can load) and models shipped in
Python packages (`packaged`: `smollm2()`, the alias `smollm2-135m-instruct`)."""
