"""Reading and writing checkpoints, one module per format family.

- `loading`: `load(path)` for every LLM checkpoint kind below -> `LoadedModel`
- `hf`: Hugging Face directories (config.json + safetensors); `llama2c`: llama2.c `.bin` files
- `tokenizers`: AutoTokenizer, SentencePiece, llama2.c `tokenizer.bin`
- `quantized`: quantized LLM directories (`save_quantized`, `load_quantized`)
- `diffusion`: the MNIST DiT / CNN checkpoints and quantized diffusion folders
- `io`: safetensors reading with named errors, storable dtypes
"""

from cometjax.checkpoint.loaded import LoadedModel
from cometjax.checkpoint.loading import load

__all__ = ["LoadedModel", "load"]
