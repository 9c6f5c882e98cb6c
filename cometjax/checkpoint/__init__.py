"""Reading and writing checkpoints, one module per format family.

- `loading`: `load(path)` for every LLM checkpoint kind below -> `LoadedModel`
- `hf`: Hugging Face directories (config.json + safetensors); `llama2c`: llama2.c `.bin` files
- `gguf`: llama.cpp `.gguf` files (llama architecture), read and dequantized with the `gguf` package
- `tokenizers`: AutoTokenizer, GGUF vocabularies, SentencePiece, llama2.c `tokenizer.bin` (one protocol)
- `gguf_vocab`: a `tokenizers.Tokenizer` from GGUF `tokenizer.ggml.*` metadata; `chat_template`: Jinja2
  chat templates rendered as transformers renders them
- `quantized`: quantized LLM directories (`save_quantized`, `load_quantized`)
- `diffusion`: the MNIST DiT / CNN checkpoints and quantized diffusion folders
- `io`: safetensors and GGUF reading with named errors, storable dtypes
"""

from cometjax.checkpoint.loaded import LoadedModel
from cometjax.checkpoint.loading import load

__all__ = ["LoadedModel", "load"]
