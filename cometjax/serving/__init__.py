"""Running models: KV caches, the jitted generate loop, the continuous-batching engine, tensor-parallel
sharding, and perplexity under a stated protocol.

- `kvcache`: `KVCache` (float), `KV4Cache` (paged INT4, one pool per layer), `create_cache`
- `generate`: `generate(model, prompts, max_new_tokens, ...)`, `SamplingConfig`, `forward_with_cache`
- `engine`: `Engine`, continuous batching over a shared page pool
- `sharding`: `shard_model(model, make_mesh())`
- `perplexity`: `perplexity(model, tokenizer, text, ...)`
"""
